"""Output folders: one writer at a time (an exclusive lock), and never into a folder that is not the writer's own.

Two processes writing one run folder were safe only by luck (identical shard names, start-up removing the other
writer's temporaries); `run_folder_lock` takes an exclusive lock (``filelock``, an operating-system lock that a
killed process releases at once) and a second writer stops with one line. `require_new_folder` refuses a
non-empty ``--out`` for the commands that cannot resume (or were not asked to), so that e.g. ``patch --out`` never
writes into a finished trace.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import LatentProbeError

LOCK_NAME = ".latentprobe.lock"


def _lock_names(folder: Path) -> set[str]:
    return {p.name for p in folder.glob(f"{LOCK_NAME}*")}


def is_empty_folder(folder: str | Path) -> bool:
    """True when ``folder`` does not exist or holds nothing but lock files."""
    folder = Path(folder)
    if not folder.exists():
        return True
    locks = _lock_names(folder)
    return not any(p.name not in locks for p in folder.iterdir())


def describe_folder(folder: Path) -> str:
    """What a non-empty folder holds, in a few words, for the refusal."""
    for name, what in (("manifest.json", None), ("patching_manifest.json", "a patch run"),
                       ("report.md", "a report"), ("verdicts.csv", "a report")):
        path = folder / name
        if path.exists():
            if what is None:
                try:
                    kind = json.loads(path.read_text(encoding="utf-8")).get("kind", "latentprobe")
                except (OSError, ValueError, AttributeError):
                    kind = "latentprobe"
                what = f"a {kind} run"
            return what
    journal = folder / "journal" / "settings.json"  # patch, ground, lens: chunks of a run not yet finished
    if journal.exists():
        try:
            kind = json.loads(journal.read_text(encoding="utf-8")).get("kind", "latentprobe")
        except (OSError, ValueError, AttributeError):
            kind = "latentprobe"
        return f"an unfinished {kind} run: `{kind} --resume` with the same settings continues it"
    return "other files"


def require_new_folder(out_dir: str | Path, command: str) -> Path:
    """Refuse an ``--out`` that exists and is not empty (naming what it holds), or that is a file."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LatentProbeError(f"--out {out_dir} is a file, not a folder", "choose a new --out folder")
    if not is_empty_folder(out_dir):
        if _journal_kind(out_dir) == command:  # its own run, interrupted or finished: --resume continues it
            raise LatentProbeError(f"output folder {out_dir} already holds a {command} run",
                                   "pass --resume to continue it (with the same settings), or choose a new --out "
                                   "folder")
        replace = command in ("report", "similarity", "probe")  # these rebuild from their inputs, so may replace
        raise LatentProbeError(f"output folder {out_dir} exists and is not empty (it holds "
                               f"{describe_folder(out_dir)}); `{command}` writes only into a new folder, never into "
                               "another run's",
                               "choose a new --out folder" + (", or pass --overwrite to replace it (the old one is "
                                                              "removed only once the new one is complete)"
                                                              if replace else ""))
    return out_dir


def _journal_kind(folder: Path) -> str | None:
    try:
        return json.loads((folder / "journal" / "settings.json").read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


class RunFolderLock:
    """An exclusive lock on a run folder, held from the writer's start to its close.

    ``name`` distinguishes the ranks of one distributed run, which write side by side under their own names.
    """

    def __init__(self, folder: str | Path, name: str = LOCK_NAME):
        from filelock import FileLock, Timeout

        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.folder / name), timeout=0)
        try:
            self._lock.acquire()
        except Timeout:
            raise LatentProbeError(f"another latentprobe process is writing to {self.folder} (it holds "
                                   f"{self.folder / name})",
                                   "wait for it to finish (then --resume if it was interrupted), or write to "
                                   "another --out folder") from None

    def release(self):
        if self._lock.is_locked:
            self._lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
