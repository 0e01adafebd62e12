"""Forwarding for a module that moved: the deprecated shims `latentprobe.tracing` and `latentprobe.intervening`."""

from __future__ import annotations

import warnings
from importlib import import_module


def forward(old: str, homes: tuple[str, ...], advice: str):
    """Warn once that ``old`` is deprecated; return the module ``__getattr__`` and ``__dir__`` that read ``homes``."""
    warnings.warn(f"{old} is deprecated: {advice}", DeprecationWarning, stacklevel=3)

    def __getattr__(name: str):
        for home in homes:
            module = import_module(home)
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(f"module {old!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set().union(*(dir(import_module(home)) for home in homes)))

    return __getattr__, __dir__
