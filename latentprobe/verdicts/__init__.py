"""Verdict rules: one calibrated decision per finding and subject (rendering lives in report.py)."""

from .base import FINDINGS, INCONCLUSIVE, NOT_MEASURED, VOCABULARY, Verdict

__all__ = ["FINDINGS", "INCONCLUSIVE", "NOT_MEASURED", "VOCABULARY", "Verdict"]
