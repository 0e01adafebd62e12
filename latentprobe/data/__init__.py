"""The data stage: instances (one question each), procedural tasks with ground truth (`tasks/`) and published
benchmarks read in their own formats (`benchmarks/`); `loading.load_instances` dispatches between them.

Imports nothing but the shared utilities. Instances never import their loaders: `instances` is at the bottom,
the loaders build Instances, and `loading` sits above both.

The names below are importable from ``latentprobe.data`` itself (loaded on first use):

>>> from latentprobe.data import Instance, builtin_instances
>>> len(builtin_instances(2))
2
"""

from importlib import import_module

_HOMES = ("latentprobe.data.instances", "latentprobe.data.loading")


def __getattr__(name: str):
    for home in _HOMES:
        module = import_module(home)
        if name in vars(module) and not name.startswith("__"):
            value = getattr(module, name)
            globals()[name] = value
            return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()).union(*(vars(import_module(home)) for home in _HOMES)))
