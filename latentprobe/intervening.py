"""Deprecated: moved to `latentprobe.runs.intervene`; this module forwards to it for one release."""

from .runs._moved import forward

__getattr__, __dir__ = forward(__name__, ("latentprobe.runs.intervene", "latentprobe.runs.common"),
                               "import from latentprobe.runs.intervene")
