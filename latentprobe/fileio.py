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
