"""Benchmark loaders: read a local copy of a benchmark in its own published format and return Instances.

Each loader takes the folder of a local copy (nothing is downloaded) and returns ``list[Instance]`` with
``task`` set to the sub-task, ``options`` to the option texts, ``answer`` to the gold option text, and
``attributes`` to the ground truth the benchmark provides. Images shipped inside parquet/TSV files are written,
undecoded, to a cache folder (default: ``.latentprobe_images/<benchmark>/`` beside the data), so ``images``
always holds file paths; a file that does not decode fails only its own instance, later.

==================== ==========================================================================================
name                 formats read (see each module's docstring)
==================== ==========================================================================================
vstar                craigwu/vstar_bench (test_questions.jsonl + per-split folders), original per-split
                     image+JSON folders, lmms-lab/vstar-bench parquet, VLMEvalKit VStarBench.tsv
mmvp                 MMVP/MMVP (Questions.csv + "MMVP Images/"), parquet dumps with an image column
hrbench-4k, -8k      DreamMr/HR-Bench hr_bench_4k/8k.tsv (base64, VLMEvalKit layout) or .parquet
blink                BLINK-Benchmark/BLINK per-sub-task val parquet files
mme-realworld-lite   MME-RealWorld-Lite.json + imgs/, mme_realworld_lite.tsv (base64), lmms-eval parquet
vsp                  UCSB-NLP-Chang/Visual-Spatial-Planning maze task-main (planning) and task4 (reasoning)
prosqa               facebookresearch/coconut data/prosqa_{train,valid,test}.json (text only)
gsm8k-aug            Coconut's gsm_{split}.json (preprocessing/gsm_icot.py), CODI's GSM8k-Aug JSON/JSONL (text)
==================== ==========================================================================================

Example::

    >>> from latentprobe.data.benchmarks import load_benchmark, detect
    >>> detect("data/MMVP")                                         # doctest: +SKIP
    ['mmvp']
    >>> instances = load_benchmark("blink", "data/BLINK", limit=20, split="Jigsaw")  # doctest: +SKIP
    >>> instances[0].task                                            # doctest: +SKIP
    'Jigsaw'
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable

from ..instances import Instance
from ...errors import LatentProbeError
from . import blink, hrbench, mme_realworld, mmvp, textcot, vsp, vstar

BENCHMARKS: dict[str, Callable[..., list[Instance]]] = {
    vstar.NAME: vstar.load,
    mmvp.NAME: mmvp.load,
    "hrbench-4k": hrbench.load_4k,
    "hrbench-8k": hrbench.load_8k,
    blink.NAME: blink.load,
    mme_realworld.NAME: mme_realworld.load,
    vsp.NAME: vsp.load,
    textcot.PROSQA: textcot.load_prosqa,
    textcot.GSM8K_AUG: textcot.load_gsm8k_aug,
}

# Other spellings people type, mapped to the registry names.
ALIASES = {
    "v*": "vstar", "vstarbench": "vstar", "vstar-bench": "vstar", "v*bench": "vstar",
    "hrbench4k": "hrbench-4k", "hr-bench-4k": "hrbench-4k", "hrbench8k": "hrbench-8k", "hr-bench-8k": "hrbench-8k",
    "mme-realworld": "mme-realworld-lite", "mmerealworld-lite": "mme-realworld-lite",
    "mme-realworld-lite": "mme-realworld-lite",
    "gsm8k": "gsm8k-aug", "gsm-aug": "gsm8k-aug", "gsm8kaug": "gsm8k-aug",
}

_DETECTORS: dict[str, Callable[[Path], bool]] = {
    vstar.NAME: vstar.looks_like,
    mmvp.NAME: mmvp.looks_like,
    "hrbench-4k": partial(hrbench.looks_like, resolution="4k"),
    "hrbench-8k": partial(hrbench.looks_like, resolution="8k"),
    blink.NAME: blink.looks_like,
    mme_realworld.NAME: mme_realworld.looks_like,
    vsp.NAME: vsp.looks_like,
    textcot.PROSQA: textcot.looks_like_prosqa,
    textcot.GSM8K_AUG: textcot.looks_like_gsm,
}


def canonical_name(name: str) -> str:
    """The registry name for ``name`` (case, underscores and common aliases forgiven)."""
    key = str(name).strip().lower().replace("_", "-")
    key = ALIASES.get(key, key)
    if key not in BENCHMARKS:
        raise LatentProbeError(f"unknown benchmark {name!r}", f"use one of: {', '.join(BENCHMARKS)}")
    return key


def detect(folder: str | Path) -> list[str]:
    """Names of the benchmarks whose published layout ``folder`` matches (cheap checks of file names)."""
    path = Path(folder).expanduser()
    if not path.exists():
        return []
    found = []
    for name, looks_like in _DETECTORS.items():
        try:
            if looks_like(path):
                found.append(name)
        except OSError:  # an unreadable file is no match; the loader reports it properly if asked
            continue
    return found


def looks_like(folder: str | Path, name: str) -> bool:
    """Whether ``folder`` looks like a local copy of benchmark ``name``."""
    return canonical_name(name) in detect(folder)


def load_benchmark(name: str, folder: str | Path, limit: int | None = None, split: str | None = None,
                   cache_dir: str | Path | None = None, **options) -> list[Instance]:
    """Load benchmark ``name`` from the local copy in ``folder``.

    ``limit`` keeps the first N instances (after ``split`` filtering); ``split`` names a sub-task (comma-separated
    for several; see each loader); ``cache_dir`` receives images that the benchmark embeds in its files.
    ``options`` go to the loader (e.g. VSP's ``levels`` and ``plan_rule``; a subject family's evaluation settings
    come from `latentprobe.model.subjects.benchmark_options`).
    """
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise LatentProbeError(f"limit must be a positive integer, got {limit!r}", "pass --limit N with N >= 1")
    loader = BENCHMARKS[canonical_name(name)]
    import inspect

    accepted = set(inspect.signature(loader).parameters)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise LatentProbeError(f"the {canonical_name(name)} loader takes no option(s) {', '.join(unknown)}",
                               f"its options are {', '.join(sorted(accepted - {'folder', 'limit', 'split', 'cache_dir'})) or 'none'}")
    from ..instances import check_options

    instances = loader(folder, limit=limit, split=split, cache_dir=cache_dir, **options)
    for instance in instances:  # a gold answer outside the options would be scored wrong on every run
        check_options(instance, f"{canonical_name(name)} instance {instance.id!r}")
    return instances


__all__ = ["BENCHMARKS", "canonical_name", "detect", "load_benchmark", "looks_like"]
