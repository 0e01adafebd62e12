"""Deprecated: moved to `latentprobe.runs.trace`; this module forwards to it for one release."""

from .runs._moved import forward

__getattr__, __dir__ = forward(__name__, ("latentprobe.runs.trace", "latentprobe.runs.common"),
                               "import from latentprobe.runs.trace (and latentprobe.runs.common for the shared "
                               "record and failure helpers)")
