"""Runs of the "where and when" readouts that write a folder: `ground_run` and `lens_run`.

Each decodes its instances with `run_with_cache` (a few at a time, nothing kept but the tables), then writes::

    manifest.json                 kind ("ground" / "lens"), subject, data source, instances, layers, seed, versions
    grounding.parquet             the grounding table (latentprobe.where.grounding.GROUNDING_COLUMNS)
    grounding-summary.csv         hit rate / mass vs chance per (subject, measure, layer, latent step)
    figures/grounding-hit-rate.png, figures/overlays/<instance>.png
  or
    lens.parquet, nearest.parquet lens and nearest-embedding tables (latentprobe.where.lens)
    lens-summary.csv              median gold rank and MRR per (layer, latent step)
    figures/lens-gold-rank.png

`default_instances` gives what ``--subject S`` runs on with no ``--data``: an organism's own held-out split
(the data it was trained beside, test instances only), else the built-in images.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from ..errors import LatentProbeError
from ..fileio import atomic_write, atomic_write_json

from ..data.loading import DEFAULT_INSTANCES as DEFAULT_LIMIT  # the one rule for default instance counts


def default_instances(subject_name: str, limit: int | None = DEFAULT_LIMIT) -> tuple[list, str]:
    """(instances, source label) for a subject run with no data given: `latentprobe.runs.common.default_instances`
    with this module's default limit."""
    from ..runs.common import default_instances as _default_instances

    return _default_instances(subject_name, limit)


def _prepare_out(out_dir: str | Path, command: str, resume: bool = False):
    """A new output folder (or, with ``resume``, this command's own run), locked against a second writer:
    (folder, lock to release when done)."""
    from ..runs.folders import RunFolderLock
    from ..runs.journal import prepare_resumable_folder

    out_dir = prepare_resumable_folder(out_dir, command, resume)
    lock = RunFolderLock(out_dir)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    return out_dir, lock


def _journal_settings(subject, instances, config, batch_size, seed, **fields) -> dict:
    """What a resumed ground or lens run must share with the original: every setting that changes a row, and the
    batches (the instance list and the batch size), so the finished batches are the ones this run would make."""
    return {"subject_fingerprint": subject.fingerprint(), "instance_ids": [i.id for i in instances],
            "batch_size": batch_size, "seed": seed, "decoding": vars(config) if config is not None else None,
            **fields}


def _manifest(kind: str, subject, instances, source: str, config, **fields) -> dict:
    from ..runs.store import package_versions

    return {"format": f"latentprobe-{kind}", "version": 1, "kind": kind, "created": time.time(),
            "subject": subject.describe(), "subject_fingerprint": subject.fingerprint(),
            "data": {"source": source, "n_instances": len(instances), "instance_ids": [i.id for i in instances]},
            "decoding": vars(config) if config is not None else None, "packages": package_versions(), **fields}


def ground_run(subject, instances, out_dir: str | Path, *, source: str = "given", config=None,
               layers: Sequence[int] | None = None, image_layer: int | None = None, n_random: int = 100,
               batch_size: int = 16, n_boot: int = 2000, seed: int = 0, resume: bool = False) -> dict:
    """Grounding maps and scores for ``instances`` written to ``out_dir`` (see module docstring).

    Returns a dict with the summary DataFrame and the paths written. Input is checked before the model runs.
    ``resume`` continues an interrupted run in ``out_dir`` (the same settings; finished batches are kept).
    """
    from ..runs.journal import ChunkJournal
    from .grounding import check_grounding_input, grounding_summary, run_grounding

    check_grounding_input(subject, instances, layers, image_layer)
    if not (n_boot >= 1 and float(n_boot).is_integer()):
        raise LatentProbeError(f"n_boot must be an integer >= 1, got {n_boot}", "pass a positive bootstrap count")
    out_dir, lock = _prepare_out(out_dir, "ground", resume)
    with lock:
        journal = ChunkJournal(out_dir, "ground", _journal_settings(subject, instances, config, batch_size, seed,
                                                                    layers=layers, image_layer=image_layer,
                                                                    n_random=n_random), resume)
        started = time.time()
        table = run_grounding(subject, instances, config=config, layers=layers, image_layer=image_layer,
                              n_random=n_random, batch_size=batch_size, seed=seed, journal=journal)
        summary = grounding_summary(table, n_boot=n_boot, seed=seed)
        atomic_write(out_dir / "grounding.parquet", lambda tmp: table.to_parquet(tmp, index=False))
        atomic_write(out_dir / "grounding-summary.csv", lambda tmp: summary.to_csv(tmp, index=False))
        manifest = _manifest("ground", subject, instances, source, config, seed=seed, n_random=n_random,
                             layers=sorted(table["layer"].unique().tolist()), image_layer=image_layer,
                             seconds=time.time() - started)
        atomic_write_json(out_dir / "manifest.json", manifest)
    return {"summary": summary, "table": out_dir / "grounding.parquet", "figures": [], "out_dir": out_dir}


def lens_run(subject, instances, out_dir: str | Path, *, source: str = "given", config=None,
             layers: Sequence[int] | None = None, top_k: int = 5, batch_size: int = 16, seed: int = 0,
             resume: bool = False) -> dict:
    """Logit lens and nearest input embeddings for ``instances`` written to ``out_dir`` (module docstring);
    ``resume`` continues an interrupted run in ``out_dir``."""
    from ..model.sites import Site, check_sites
    from ..runs.journal import ChunkJournal
    from .lens import check_lens_subject, gold_rank_summary, run_lens

    check_lens_subject(subject)
    if layers is not None:
        check_sites([Site("latent", layer) for layer in layers], subject.num_layers)
    if not instances:
        raise LatentProbeError("the lens got no instances", "pass a data file with at least one instance")
    out_dir, lock = _prepare_out(out_dir, "lens", resume)
    with lock:
        journal = ChunkJournal(out_dir, "lens", _journal_settings(subject, instances, config, batch_size, seed,
                                                                  layers=layers, top_k=top_k), resume)
        started = time.time()
        lens, nearest = run_lens(subject, instances, config=config, layers=layers, top_k=top_k,
                                 batch_size=batch_size, seed=seed, journal=journal)
        summary = gold_rank_summary(lens)
        atomic_write(out_dir / "lens.parquet", lambda tmp: lens.to_parquet(tmp, index=False))
        atomic_write(out_dir / "nearest.parquet", lambda tmp: nearest.to_parquet(tmp, index=False))
        atomic_write(out_dir / "lens-summary.csv", lambda tmp: summary.to_csv(tmp, index=False))
        manifest = _manifest("lens", subject, instances, source, config, seed=seed, top_k=top_k,
                             layers=sorted(lens["layer"].unique().tolist()), seconds=time.time() - started)
        atomic_write_json(out_dir / "manifest.json", manifest)
    return {"summary": summary, "table": out_dir / "lens.parquet", "figures": [], "out_dir": out_dir}
