"""Shared pieces of the benchmark loaders: folder checks, table reading, option parsing, the image cache.

Loaders only record image paths. Images that a benchmark ships as bytes or base64 text are written, undecoded,
to a cache folder so that every ``Instance.images`` entry is a file path; a file that later fails to decode is
reported per instance by :func:`latentprobe.data.load_images`, never at load time.
"""

from __future__ import annotations

import ast
import base64
import binascii
import hashlib
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..instances import Instance
from ...errors import LatentProbeError
from ...fileio import atomic_write

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CACHE_FOLDER_NAME = ".latentprobe_images"
# VLMEvalKit TSVs store each distinct image once; rows repeating it hold the index of the row that has it.
# Its own reader treats any cell of at most 64 characters as such a reference, and so do we.
VLMEVAL_REFERENCE_MAX_CHARS = 64


# ---------------------------------------------------------------- folders and errors


def require_path(folder: str | Path, benchmark: str, download_hint: str) -> Path:
    """The benchmark's folder (or file) as a Path; a missing one is a LatentProbeError saying what to do."""
    path = Path(folder).expanduser()
    if not path.exists():
        from ...fileio import why_missing

        raise LatentProbeError(f"{benchmark}: data folder {path} {why_missing(path)}", download_hint)
    return path


def wrong_format(benchmark: str, path: Path, expected: str, download_hint: str, registry_name: str
                 ) -> LatentProbeError:
    """The error for a folder that holds none of the benchmark's published layouts."""
    from . import detect  # late import: the registry imports every loader module

    others = [name for name in detect(path) if name != registry_name]
    fix = download_hint
    if others:
        fix += f"; this folder looks like {', '.join(others)} (pass that benchmark name instead)"
    return LatentProbeError(f"{benchmark}: {path} is not a copy of this benchmark: expected {expected}, found none",
                            fix)


def missing_columns_error(benchmark: str, path: Path, missing: Iterable[str], found: Iterable[str],
                          download_hint: str) -> LatentProbeError:
    return LatentProbeError(
        f"{benchmark}: {path} lacks column(s) {', '.join(sorted(missing))} (it has: {', '.join(sorted(found))})",
        f"{download_hint}; the file may be from another benchmark or an edited copy")


def require_columns(benchmark: str, path: Path, columns: Iterable[str], required: Iterable[str],
                    download_hint: str) -> None:
    present = set(columns)
    missing = [name for name in required if name not in present]
    if missing:
        raise missing_columns_error(benchmark, path, missing, present, download_hint)


def files_matching(folder: Path, patterns: Iterable[str], depth: int = 0) -> list[Path]:
    """Files whose names match a glob pattern (case-insensitively), in ``folder`` and up to ``depth`` levels below.

    ``folder`` may itself be a matching file. The depth is bounded so that pointing a loader at a large folder by
    mistake costs a directory listing, not a crawl.
    """
    regexes = [re.compile(_glob_to_regex(p), re.IGNORECASE) for p in patterns]
    if folder.is_file():
        return [folder] if any(r.fullmatch(folder.name) for r in regexes) else []
    found: list[Path] = []
    level = [folder]
    for _ in range(depth + 1):
        below: list[Path] = []
        for directory in level:
            try:
                entries = list(directory.iterdir())
            except OSError:
                continue
            for entry in entries:
                if entry.name == CACHE_FOLDER_NAME:
                    continue
                if entry.is_dir():
                    below.append(entry)
                elif any(r.fullmatch(entry.name) for r in regexes):
                    found.append(entry)
        level = below
    return sorted(found)


def _glob_to_regex(pattern: str) -> str:
    return "".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern)


def natural_key(path: Path) -> tuple:
    """Sort ``img/10.png`` after ``img/9.png``."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name))


# ---------------------------------------------------------------- splits and limits


def normalise_name(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", str(name).strip().lower())


class SplitFilter:
    """Keeps instances whose task equals, or sits under (``task/...``), one of the comma-separated names."""

    def __init__(self, split: str | None):
        self.split = split
        self.wanted = [normalise_name(s) for s in split.split(",") if s.strip()] if split else []
        self.seen_tasks: set[str] = set()

    def keeps(self, task: str | None) -> bool:
        if task is not None:
            self.seen_tasks.add(task)
        if not self.wanted:
            return True
        name = normalise_name(task or "")
        return any(name == w or name.startswith(w + "/") for w in self.wanted)


def finish(instances: list[Instance], benchmark: str, path: Path, split_filter: SplitFilter) -> list[Instance]:
    """Return the instances, or raise when none were found (naming the splits that do exist)."""
    if instances:
        return instances
    if split_filter.split:
        available = ", ".join(sorted(split_filter.seen_tasks)) or "none"
        raise LatentProbeError(f"{benchmark}: no instances in split {split_filter.split!r} under {path}",
                               f"pass one of the splits present ({available}) or omit --split")
    raise LatentProbeError(f"{benchmark}: {path} holds no instances", "check that the download is complete")


def full(instances: list[Instance], limit: int | None) -> bool:
    return limit is not None and len(instances) >= limit


# ---------------------------------------------------------------- options and answers

_LETTER = re.compile(r"^\s*\(?\s*([A-Za-z])\s*\)?\s*[.:]?\s*$")
_OPTION_PREFIX = re.compile(r"^\s*\(?([A-Z])\)\s*|^\s*([A-Z])[.:]\s+")


def parse_letter(text: Any) -> str | None:
    """``"(A)"``, ``"a"``, ``"B."`` -> the upper-case letter; anything else -> None."""
    match = _LETTER.match(str(text)) if text is not None else None
    return match.group(1).upper() if match else None


def strip_option_prefix(text: str) -> str:
    """``"(A) red"`` or ``"A. red"`` -> ``"red"``."""
    return _OPTION_PREFIX.sub("", str(text), count=1).strip()


def option_for_letter(letter: str | None, options: list[str]) -> str | None:
    """The option text a gold letter points at, or None when the letter is absent or out of range."""
    if letter is None:
        return None
    position = ord(letter.upper()) - ord("A")
    return options[position] if 0 <= position < len(options) else None


def letter_options(row: dict[str, Any], letters: str = "ABCDEFGH") -> list[str]:
    """Option texts from VLMEvalKit-style ``A``, ``B``, ... columns, stopping at the first empty one."""
    options = []
    for letter in letters:
        value = row.get(letter)
        if value is None or (isinstance(value, float) and value != value) or str(value).strip() == "":
            break
        options.append(str(value).strip())
    return options


def literal_list(value: Any) -> list[str]:
    """A list cell that may arrive as a real list or as its Python/JSON text (``"['(A) x', '(B) y']"``)."""
    if value is None:
        return []
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return [value]
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


# ---------------------------------------------------------------- tables


def table_columns(path: Path) -> list[str]:
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.ParquetFile(path).schema_arrow.names)
    import pandas as pd

    return [str(c).strip() for c in pd.read_csv(path, sep=_separator(path), nrows=0).columns]


def tables_with_columns(tables: Iterable[Path], required: Iterable[str]) -> list[Path]:
    """The tables whose header holds every required column (unreadable files are skipped, not fatal)."""
    required = set(required)
    keep = []
    for table in tables:
        try:
            columns = set(table_columns(table))
        except Exception:  # noqa: BLE001 - pyarrow and pandas raise many types for a file that is not a table
            continue
        if required <= columns:
            keep.append(table)
    return keep


def iter_table_rows(path: Path, batch_rows: int = 64) -> Iterator[dict[str, Any]]:
    """Rows of a parquet, TSV or CSV file as dicts, read in small batches so ``limit`` stops early."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
            yield from batch.to_pylist()
        return
    import pandas as pd

    # Strings throughout: option texts such as "3" must stay text, and empty cells stay "" rather than NaN.
    for chunk in pd.read_csv(path, sep=_separator(path), dtype=str, keep_default_na=False, chunksize=batch_rows):
        chunk.columns = [str(c).strip() for c in chunk.columns]
        yield from chunk.to_dict("records")


def _separator(path: Path) -> str:
    return "\t" if path.suffix.lower() == ".tsv" else ","


# ---------------------------------------------------------------- image cache


def default_cache_dir(path: Path, benchmark: str) -> Path:
    base = path.parent if path.is_file() else path
    return base / CACHE_FOLDER_NAME / benchmark


class ImageCache:
    """Writes embedded images to files, atomically and once, named by the instance and a content hash."""

    def __init__(self, cache_dir: str | Path):
        self.cache_dir = Path(cache_dir)

    def store(self, cell: Any, stem: str) -> str | None:
        """Write one image cell (bytes, base64 text, or a ``{"bytes", "path"}`` dict); None for an empty cell."""
        data = image_bytes(cell)
        if data is None:
            return None
        digest = hashlib.sha1(data).hexdigest()[:10]
        target = self.cache_dir / f"{_safe_stem(stem)}-{digest}{_sniff_suffix(data)}"
        # The hash is in the name, so an existing file of the right size already holds these bytes.
        if not (target.exists() and target.stat().st_size == len(data)):
            atomic_write(target, lambda tmp: Path(tmp).write_bytes(data))
        return str(target)


def image_bytes(cell: Any) -> bytes | None:
    if cell is None:
        return None
    if isinstance(cell, dict):
        return image_bytes(cell.get("bytes"))
    if isinstance(cell, (bytes, bytearray, memoryview)):
        return bytes(cell) or None
    if isinstance(cell, str):
        text = cell.strip()
        if not text:
            return None
        try:
            return base64.b64decode(text, validate=False)
        except (binascii.Error, ValueError):
            # Not base64 after all: keep the raw text, so the failure shows up when this instance's image is opened.
            return text.encode()
    return None


def _safe_stem(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._")[:80] or "image"


def _sniff_suffix(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return ".png"
    if data.startswith(b"\xff\xd8"):
        return ".jpg"
    if data.startswith(b"GIF8"):
        return ".gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    if data.startswith(b"BM"):
        return ".bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return ".tif"
    return ".bin"


class VLMEvalImages:
    """Resolves the ``image`` column of a VLMEvalKit-style TSV, including cells that refer to another row."""

    PENDING_PREFIX = "<pending image of row "

    def __init__(self, cache: ImageCache, table: Path):
        self.cache = cache
        self.table = table
        self.path_by_index: dict[str, list[str]] = {}

    def paths(self, row: dict[str, Any], stem: str) -> list[str]:
        cell = row.get("image")
        if isinstance(cell, str) and 0 < len(cell.strip()) <= VLMEVAL_REFERENCE_MAX_CHARS:
            referenced = cell.strip()
            return self.path_by_index.get(referenced, [f"{self.PENDING_PREFIX}{referenced}>"])
        cells = literal_list(cell) if isinstance(cell, str) and cell.lstrip().startswith("[") else [cell]
        stored = [self.cache.store(c, stem if len(cells) == 1 else f"{stem}_{i + 1}") for i, c in enumerate(cells)]
        paths = [p for p in stored if p is not None]
        self.path_by_index[str(row.get("index"))] = paths
        return paths

    def resolve(self, instances: list[Instance]) -> None:
        """Fill in references to rows read after the referring one (or beyond ``limit``) with a second scan."""
        wanted = {self._referenced(p) for inst in instances for p in inst.images} - {None}
        wanted -= set(self.path_by_index)
        if wanted:
            for row in iter_table_rows(self.table):
                if str(row.get("index")) in wanted:
                    self.paths(row, f"row{row.get('index')}")
        for inst in instances:
            resolved: list[str] = []
            for p in inst.images:
                referenced = self._referenced(p)
                # An unresolvable reference keeps a path that does not exist: that instance fails, the rest run.
                resolved.extend([p] if referenced is None else self.path_by_index.get(referenced, [p]))
            inst.images = resolved

    def _referenced(self, path: str) -> str | None:
        return path[len(self.PENDING_PREFIX):-1] if path.startswith(self.PENDING_PREFIX) else None


def first_existing(candidates: Iterable[Path]) -> Path | None:
    for candidate in candidates:
        if candidate.exists():
            return candidate
    return None


