"""Atomic file writes: a reader never sees a half-written file, an interrupted run never leaves one."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)``, then rename the temporary file onto ``path`` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; results should be as readable as any file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    def _write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)

    return atomic_write(path, _write)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def describe_os_error(exc: OSError) -> str:
    """One line for an operating-system error: what failed, on which file, and what to do."""
    import errno

    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    fixes = {
        errno.ENOSPC: "the disk is full: free space or write to another --out folder, then run again with --resume",
        errno.EDQUOT: "the disk quota is exhausted: free space, then run again with --resume",
        errno.EACCES: "no permission: choose a folder you can write to (or fix its permissions)",
        errno.EPERM: "not permitted: choose a folder you can write to",
        errno.EROFS: "the file system is read-only: choose a writable --out folder",
        errno.ELOOP: "a symbolic link loop: point at a real folder",
        errno.ENOENT: "the file does not exist: check the path",
        errno.EISDIR: "a folder was given where a file is needed",
        errno.ENOTDIR: "a file was given where a folder is needed",
    }
    reason = exc.strerror or type(exc).__name__
    fix = fixes.get(exc.errno, "check the file and the disk, then run again")
    return f"{reason}{where} -- {fix}"


# -- output folders: never overwritten without being asked ---------------------------------------------------
def refuse_existing(out, what: str = "--out", allow_overwrite: bool = False) -> None:
    """Refuse an output folder that exists and holds anything (before any model runs or file is written)."""
    from .errors import LatentProbeError

    folder = Path(out)
    if folder.is_dir() and any(folder.iterdir()):
        fix = "choose a new folder" + (", or pass --overwrite to replace it (the old one is removed only once the "
                                       "new one is complete)" if allow_overwrite else ", or delete it first")
        raise LatentProbeError(f"{what} {out} exists and is not empty", fix)


class fresh_output:
    """``with fresh_output(out, overwrite, inputs) as staging:`` write into ``staging``; on success it becomes
    ``out`` in one rename (an existing ``out`` is moved aside first and deleted after), so ``out`` never holds a
    mix of an old and a new result and a failed run leaves the old one untouched. Refuses a non-empty ``out``
    unless ``overwrite``, and an ``out`` that is or contains one of ``inputs`` (replacing it would delete them)."""

    def __init__(self, out, overwrite: bool, inputs=()):
        from .errors import LatentProbeError

        self.out = Path(out)
        target = self.out.resolve()
        for given in inputs:
            source = Path(given).resolve()
            if source == target or target in source.parents:
                raise LatentProbeError(f"--out {out} holds the input {given}",
                                       "write the result to a folder outside the runs it reads")
        if not overwrite:
            refuse_existing(out, allow_overwrite=True)

    def __enter__(self):
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.new-", dir=self.out.parent))
        return self.staging

    def __exit__(self, kind, value, traceback):
        import shutil

        if kind is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            return False
        os.chmod(self.staging, 0o777 & ~_umask())  # mkdtemp makes 0700 folders; results are as readable as any
        if self.out.exists():
            aside = tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent)
            os.rmdir(aside)
            os.rename(self.out, aside)
            os.rename(self.staging, self.out)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(self.staging, self.out)
        return False


