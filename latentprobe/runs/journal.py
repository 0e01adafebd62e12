"""Resumable runs of the commands that write tables, not shards (`patch`, `ground`, `lens`).

Their work is cut into chunks of instances at fixed boundaries (the full instance list in data order, cut every
``batch_size``); each finished chunk's rows are written atomically to ``journal/<key>.parquet``. A run killed at
any moment (kill -9 included) loses at most the chunk it was computing; ``--resume`` checks that every setting
that changes a row is the same (``journal/settings.json``), reads the finished chunks back, computes only the
others, and writes the tables as an uninterrupted run would: the same chunks, so the same rows, none twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import LatentProbeError
from ..fileio import atomic_write, atomic_write_json

JOURNAL = "journal"


class ChunkJournal:
    """Finished chunks of one run folder, keyed by the chunk's first instance index."""

    def __init__(self, out_dir: str | Path, kind: str, settings: dict[str, Any], resume: bool):
        from .store import _differences

        self.folder = Path(out_dir) / JOURNAL
        self.kind = kind
        settings = json.loads(json.dumps({"kind": kind, **settings}, sort_keys=True, default=str))
        path = self.folder / "settings.json"
        if resume and path.exists():
            try:
                previous = json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                raise LatentProbeError(f"{path} is damaged (not valid JSON)",
                                       "start again in a new --out folder") from None
            for where, old, new in _differences(previous, settings, "settings"):
                raise LatentProbeError(f"cannot resume {out_dir}: its {where} is {old!r} but this run's is {new!r}",
                                       "resume with the same settings as the original run, or write to a new "
                                       "--out folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, settings)
        self.resumed = sorted(p.stem for p in self.folder.glob("chunk-*.parquet")) if resume else []

    def _path(self, start: int, table: str) -> Path:
        return self.folder / f"chunk-{start:07d}-{table}.parquet"

    def load(self, start: int, tables: tuple[str, ...]) -> dict[str, pd.DataFrame] | None:
        """The chunk's tables when all were written (a chunk killed half-way is computed again)."""
        paths = [self._path(start, t) for t in tables]
        if not all(p.exists() for p in paths):
            return None
        try:
            return {t: pd.read_parquet(p) for t, p in zip(tables, paths)}
        except Exception:  # noqa: BLE001 - a damaged part: compute the chunk again
            return None

    def save(self, start: int, frames: dict[str, pd.DataFrame]) -> None:
        for table, frame in frames.items():
            atomic_write(self._path(start, table), lambda tmp, f=frame: f.to_parquet(tmp, index=False))


def prepare_resumable_folder(out_dir: str | Path, kind: str, resume: bool) -> Path:
    """A new folder, or with ``resume`` this command's own unfinished (or finished) run; anything else refused."""
    from .folders import describe_folder, require_new_folder

    out_dir = Path(out_dir)
    if not resume:
        return require_new_folder(out_dir, kind)
    settings = out_dir / JOURNAL / "settings.json"
    if settings.exists():
        try:
            own = json.loads(settings.read_text(encoding="utf-8")).get("kind") == kind
        except (OSError, ValueError, AttributeError):
            own = False
        if own:
            return out_dir
    from .folders import is_empty_folder

    if is_empty_folder(out_dir):
        return out_dir
    raise LatentProbeError(f"output folder {out_dir} holds {describe_folder(out_dir)}, not a {kind} run that "
                           "--resume could continue", "choose a new --out folder")
