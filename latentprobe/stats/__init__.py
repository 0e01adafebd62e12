"""The statistics stage: pure functions from arrays and tables to tidy DataFrames with intervals -- causal effects
(`effects`), the instance bootstrap, similarity and collapse measures (`similarity`), linear probes (`probes`).

Imports numpy, scipy, scikit-learn, statsmodels and pandas, and nothing that runs a model (no model, runs,
report or torch-driven code).
"""
