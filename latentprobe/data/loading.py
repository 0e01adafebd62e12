"""Instances from any source: the built-in images, a JSONL file, or a benchmark in its own published format.

This dispatch sits above both `latentprobe.data.instances` (the `Instance` noun and its JSONL form) and
`latentprobe.data.benchmarks` (the loaders, which build Instances), so neither imports the other's caller.
"""

from __future__ import annotations

import os

from pathlib import Path
from typing import Any

from ..errors import LatentProbeError
from .benchmarks import load_benchmark
from .instances import Instance, builtin_instances, builtin_text_instances, load_jsonl


# The one rule for how many instances a command runs when none are named: with no --data, every command (trace,
# intervene, patch, ground, lens, demo) takes the first DEFAULT_INSTANCES of the subject's default data (an
# organism's own held-out split, else the 8 built-in images) unless --limit says otherwise; with --data it takes
# every instance of the file unless --limit. 80 is the demo's count: 0 answer changes in n give an exact 95% upper
# bound below the default margin 0.05 from n = 72 on, so an organism without a latent route can reach `disconnect`.
DEFAULT_INSTANCES = 80
# The hops task's held-out split as the text organisms were trained and evaluated on it (8 names, 2 hops, seed 0).
BUILTIN_HOPS, BUILTIN_HOPS_N = "builtin-hops", 600


def default_limit(data: str | None, limit: int | None) -> int | None:
    """The number of instances a command takes: ``limit`` when given, else DEFAULT_INSTANCES of a subject's
    default data (``data`` None) and every instance of a given file (None)."""
    if limit is not None:
        return limit
    return DEFAULT_INSTANCES if data is None else None


def load_instances(source: str | os.PathLike | None, limit: int | None = None, split: str | None = None,
                   benchmark_options: dict[str, Any] | None = None) -> tuple[list[Instance], str]:
    """Instances from ``source``: None (the built-in images), ``builtin-text`` (the built-in text set, for
    text-only subjects), ``builtin-hops`` (the held-out 2-hop lookups the text organisms are evaluated on: 600,
    `latentprobe.data.tasks.hops`), a JSONL file, or ``BENCHMARK:FOLDER`` for a
    benchmark in its own published format (``benchmark_options`` go to its loader). Returns (instances, a label
    of the source for the manifest)."""
    if isinstance(source, os.PathLike):  # a file given as a Path
        source = os.fspath(source)
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise LatentProbeError(f"limit must be a positive integer, got {limit!r}", "pass --limit 1 or more")
    if source is None:
        instances = builtin_instances()
        return (instances[:limit] if limit else instances), "builtin"
    if source == "builtin-text":  # the text set, for text-only subjects (Coconut, CODI)
        instances = builtin_text_instances()
        return (instances[:limit] if limit else instances), "builtin-text"
    if source == BUILTIN_HOPS:  # the text organisms' held-out 2-hop lookups (generated in memory)
        from .tasks.hops import hops_instances

        if split not in (None, "test"):  # the organisms' training questions are theirs, never a probe's data
            raise LatentProbeError(f"builtin-hops has only the held-out (test) split; --split {split!r} was asked",
                                   "leave --split out, or pass --split test")
        return hops_instances(min(limit or BUILTIN_HOPS_N, BUILTIN_HOPS_N), seed=0, split="test"), BUILTIN_HOPS
    name, sep, folder = source.partition(":")
    if sep and not Path(source).exists():
        return load_benchmark(name, folder, limit=limit, split=split, **(benchmark_options or {})), source
    path = Path(source)
    if path.is_dir():
        raise LatentProbeError(f"data source {path} is a folder",
                               "pass a JSONL file, or BENCHMARK:FOLDER for a benchmark in its own format")
    return load_jsonl(path, limit=limit, split=split), str(path)
