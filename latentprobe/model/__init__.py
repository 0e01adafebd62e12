"""The model stage: what runs a model. Protocols, subjects and their families, the latent decoder, answer slots and
parsers, sites and the recorder, `run_with_cache`, conditions.

Imports only `latentprobe.data` and the shared utilities (errors, fileio, cli_types); nothing here imports runs,
statistics, verdicts or reports. The organisms register their subjects from above (see
`latentprobe.model.subjects.SUBJECT_PROVIDERS`).
"""
