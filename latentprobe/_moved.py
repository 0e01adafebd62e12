"""Old import paths of modules that moved into the stage packages in round three, kept for one release.

``import latentprobe.decoding`` (or ``from latentprobe.patching import patch_map``) still works: a finder placed
first on ``sys.meta_path`` answers every old name with the module at its new home -- the same module object, so
state, classes and monkeypatches are shared -- and warns once per old name with a DeprecationWarning.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings
from importlib import import_module

# old path (under latentprobe) -> new path; a package maps its submodules too (subjects.tiny -> model.subjects.tiny)
MOVED = {
    "protocol": "model.protocol", "subject": "model.subject", "subjects": "model.subjects",
    "subjects.organisms": "organisms.subjects",
    "decoding": "model.decoding", "answer_slot": "model.answer_slot", "answers": "model.answers",
    "sites": "model.sites", "recording": "model.recording", "cache": "model.cache",
    "conditions": "model.conditions", "tasks": "data.tasks", "benchmarks": "data.benchmarks",
    "knockout": "interventions.knockout", "store": "runs.store", "distributed": "runs.distributed",
    "conformance": "runs.conformance", "effects": "stats.effects", "instance_bootstrap": "stats.instance_bootstrap",
    "similarity": "stats.similarity", "probes": "stats.probes", "simulation": "verdicts.simulation",
    "planning": "verdicts.planning", "patching": "where.patching", "attribution": "where.attribution",
    "grounding": "where.grounding", "lens": "where.lens", "where_runs": "where.runs", "analysis": "report.build",
    "figures": "report.figures", "patch_figures": "report.patch_figures", "where_figures": "report.where_figures",
    "where_report": "report.where_report", "demo": "study.demo",
}
PREFIX = "latentprobe."


def new_name(fullname: str) -> str | None:
    """The new home of an old ``latentprobe.X`` module name, or None when ``fullname`` did not move."""
    if not fullname.startswith(PREFIX):
        return None
    parts = fullname[len(PREFIX):].split(".")
    for i in range(len(parts), 0, -1):
        head = ".".join(parts[:i])
        if head in MOVED:
            return PREFIX + ".".join([MOVED[head], *parts[i:]])
    return None


class _Alias(importlib.abc.Loader):
    def __init__(self, old: str, new: str):
        self.old, self.new = old, new

    def create_module(self, spec):
        warnings.warn(f"{self.old} moved to {self.new}; the old path works for one release: import from "
                      f"{self.new}", DeprecationWarning, stacklevel=2)
        return import_module(self.new)

    def exec_module(self, module):  # the module at its new home is already executed
        pass


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = new_name(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias(fullname, new))


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())
