"""The report stage: `build` reads run folders into the tables the verdicts and figures need; `render` writes the
Markdown + HTML report; `figures`, `patch_figures`, `where_figures` and `where_report` draw and render from tables.

Reads tables and run folders, never runs a model. ``latentprobe.report`` was one module before round three; its
names still resolve here, with a deprecation warning, for one release (import from `latentprobe.report.render`).
"""

import warnings
from importlib import import_module

_WARNED: set[str] = set()


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    module = import_module("latentprobe.report.render")
    if hasattr(module, name):
        if name not in _WARNED:
            _WARNED.add(name)
            warnings.warn(f"latentprobe.report.{name} moved to latentprobe.report.render.{name}",
                          DeprecationWarning, stacklevel=2)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
