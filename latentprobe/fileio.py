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


# -- file names derived from data ------------------------------------------------------------------------------
# Instance ids, subject names, attribute names and labels come from the user's data and checkpoints. Every file
# name built from them goes through `safe_name`, so that no value can leave the output folder (``../x``, ``/etc``),
# make folders (``a/b``), hide a file (``.x``), exceed a file system's name limit or clash with another value's name.
MAX_NAME_LENGTH = 96  # well under the 255-byte limit of common file systems, leaving room for suffixes


def safe_name(value: object, max_length: int = MAX_NAME_LENGTH) -> str:
    """A file name for ``value``: readable (ASCII letters, digits, ``-``, ``_``, ``.``), never a path, never hidden.

    A value that is already such a name is returned unchanged; any other value is transliterated (accents
    dropped), its other characters replaced by ``_``, shortened, and suffixed with 8 hex digits of its SHA-256,
    so two different values never share a name (``a/b`` and ``a_b`` differ).

    >>> safe_name("q1"), safe_name("../../etc/passwd"), safe_name("café") != safe_name("cafe")
    ('q1', 'etc_passwd-3754d6cb', True)
    """
    import hashlib
    import re
    import unicodedata

    text = str(value)
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", ascii_text)
    readable = re.sub(r"_+", "_", readable).strip("._-")  # no leading dot: no hidden files, no '.' or '..'
    if readable == text and 0 < len(text) <= max_length:
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{readable[:max_length - 9]}-{digest}" if readable else f"x-{digest}"


class NameBook:
    """Unique safe file names inside one folder: the same value always gets the same name, and two values never
    share one, even on a case-insensitive file system (``Q1`` and ``q1``).

    >>> book = NameBook()
    >>> book.name("Q1"), book.name("q1"), book.name("Q1")
    ('Q1', 'q1-2', 'Q1')
    """

    def __init__(self):
        self._by_value: dict[str, str] = {}
        self._taken: set[str] = set()

    def name(self, value: object) -> str:
        key = str(value)
        if key not in self._by_value:
            base = candidate = safe_name(key)
            n = 2
            while candidate.casefold() in self._taken:
                candidate, n = f"{base}-{n}", n + 1
            self._taken.add(candidate.casefold())
            self._by_value[key] = candidate
        return self._by_value[key]


def path_inside(folder: str | Path, *names: object, suffix: str = "") -> Path:
    """``folder / safe_name(n1) / ... + suffix``, checked to resolve inside ``folder`` (a last guard for names
    that did not come through `safe_name`, e.g. a symbolic link planted in the output folder)."""
    folder = Path(folder)
    path = folder.joinpath(*(safe_name(n) for n in names))
    path = path.with_name(path.name + suffix)
    root = folder.resolve()
    target = path.resolve()
    if target != root and root not in target.parents:
        import errno  # an OSError: the commands print it in one line (fileio sits below errors in the layers)

        raise PermissionError(errno.EPERM, f"it would be written outside the output folder {folder} (it resolves "
                                           f"to {target}; a symbolic link in the folder?)", str(path))
    return path


def why_missing(path: str | Path) -> str:
    """Why ``Path.exists()`` said no, in words: a symbolic link loop and a broken link are not "does not exist".

    >>> why_missing("/no/such/file")
    'does not exist'
    """
    path = Path(path)
    if path.is_symlink():
        try:
            os.stat(path)
        except OSError as exc:
            import errno

            if exc.errno == errno.ELOOP:
                return "is a symbolic link loop"
            return f"is a broken symbolic link (to {os.readlink(path)})"
    return "does not exist"
