"""Deprecated: moved to `latentprobe.runs.intervene`; this module forwards to it for one release."""

from __future__ import annotations

import warnings
from importlib import import_module

warnings.warn("latentprobe.intervening is deprecated: import from latentprobe.runs.intervene",
              DeprecationWarning, stacklevel=2)

_HOMES = ("latentprobe.runs.intervene", "latentprobe.runs.common")


def __getattr__(name: str):
    for home in _HOMES:
        module = import_module(home)
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set().union(*(dir(import_module(home)) for home in _HOMES)))
