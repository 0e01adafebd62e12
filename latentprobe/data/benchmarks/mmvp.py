"""MMVP: 300 two-choice questions on 150 "CLIP-blind" image pairs (consecutive rows form a pair).

Reads either published layout of a local copy:

* **Original release** (GitHub ``tsb0601/MMVP``, Hugging Face ``MMVP/MMVP``): ``Questions.csv`` with columns
  ``Index``, ``Question``, ``Options`` (``"(a) Open (b) Closed"``) and ``Correct Answer`` (``"(a)"``), plus a folder
  ``MMVP Images/`` holding ``<Index>.jpg``.
* **Parquet dump** (``lmms-lab-eval/MMVP`` style): ``*.parquet`` with the same four columns (or their lower-case
  ``index``/``question``/``options``/``answer`` forms) and an ``image`` column of embedded bytes.

The gold answers are those of the files. Rows 99/100 and 279/280 (1-based) are known to have swapped labels
(lmms-eval issue 1018); they are kept as published and flagged with ``attributes["label_disputed"] = True``.
MMVP has no sub-tasks: every instance has ``task="mmvp"``, and ``split`` may only be ``"mmvp"``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..instances import Instance
from .common import (IMAGE_SUFFIXES, ImageCache, SplitFilter, default_cache_dir, files_matching, finish, full,
                     iter_table_rows, missing_columns_error, option_for_letter, parse_letter, require_path,
                     table_columns, wrong_format)

NAME = "mmvp"
TITLE = "MMVP"
TASK = "mmvp"
DOWNLOAD_HINT = ("download the dataset MMVP/MMVP from the Hugging Face Hub (`huggingface-cli download MMVP/MMVP "
                 "--repo-type dataset --local-dir DIR`) and pass DIR, the folder holding Questions.csv")
EXPECTED = "Questions.csv (columns Index, Question, Options, Correct Answer) beside an 'MMVP Images' folder"
QUESTIONS_FILE = "Questions.csv"
# The authors' own script misspells the folder, so copies made with it may carry that name.
IMAGE_FOLDER_NAMES = ("MMVP Images", "MMVP Imgaes", "images", "Images")
DISPUTED_LABEL_ROWS = frozenset({99, 100, 279, 280})
# Column name -> the names it goes by in the original CSV and in parquet dumps.
COLUMN_ALIASES = {"index": ("Index", "index", "idx"), "question": ("Question", "question"),
                  "options": ("Options", "options"), "answer": ("Correct Answer", "answer")}
_OPTION = re.compile(r"\(([a-z])\)\s*(.*?)(?=\s*\([a-z]\)\s|\s*\([a-z]\)$|$)", re.IGNORECASE | re.DOTALL)


def looks_like(path: Path) -> bool:
    return (path / QUESTIONS_FILE).exists() if path.is_dir() else path.name == QUESTIONS_FILE


def load(folder: str | Path, limit: int | None = None, split: str | None = None,
         cache_dir: str | Path | None = None) -> list[Instance]:
    """Load MMVP from its original CSV + images release or a parquet dump."""
    path = require_path(folder, TITLE, DOWNLOAD_HINT)
    split_filter = SplitFilter(split)
    root = path.parent if path.is_file() else path
    if (root / QUESTIONS_FILE).exists():
        rows, image_for = _csv_rows(root)
    else:
        tables = [t for t in files_matching(path, ["*.parquet"], depth=1) if _has_mmvp_columns(table_columns(t))]
        if not tables:
            raise wrong_format(TITLE, path, EXPECTED, DOWNLOAD_HINT, NAME)
        rows, image_for = _parquet_rows(tables, ImageCache(cache_dir or default_cache_dir(path, NAME)))
    instances: list[Instance] = []
    if not split_filter.keeps(TASK):
        return finish(instances, TITLE, path, split_filter)
    for row in rows:
        instances.append(_instance(row, image_for(row)))
        if full(instances, limit):
            break
    return finish(instances, TITLE, path, split_filter)


def parse_options(text: str) -> list[str]:
    """``"(a) Open (b) Closed"`` -> ``["Open", "Closed"]``."""
    return [option.strip() for _, option in _OPTION.findall(str(text))]


def _instance(row: dict[str, Any], image: str) -> Instance:
    index = str(row["index"]).strip()
    options = parse_options(row["options"])
    gold = str(row["answer"]).strip()
    number = int(index) if index.isdigit() else None
    attributes: dict[str, Any] = {"index": number if number is not None else index}
    if number is not None:
        attributes["pair_id"] = (number - 1) // 2  # rows 1-2, 3-4, ... ask one question of a CLIP-blind pair
        attributes["label_disputed"] = number in DISPUTED_LABEL_ROWS
    return Instance(id=index, question=str(row["question"]).strip(),
                    answer=option_for_letter(parse_letter(gold), options) or gold,
                    images=[image] if image else [], options=options or None, attributes=attributes,
                    split="test", task=TASK)


def _canonical(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    for canonical, aliases in COLUMN_ALIASES.items():
        for alias in aliases:
            if alias in row:
                out[canonical] = row[alias]
                break
    return out


def _missing_columns(columns: list[str]) -> list[str]:
    return [aliases[0] for aliases in COLUMN_ALIASES.values() if not any(a in columns for a in aliases)]


def _has_mmvp_columns(columns: list[str]) -> bool:
    return not _missing_columns(columns) and "image" in columns


def _check_columns(table: Path, columns: list[str]) -> None:
    missing = _missing_columns(columns)
    if missing:
        raise missing_columns_error(TITLE, table, missing, columns, DOWNLOAD_HINT)


def _csv_rows(root: Path):
    csv_path = root / QUESTIONS_FILE
    _check_columns(csv_path, table_columns(csv_path))
    image_folder = next((root / name for name in IMAGE_FOLDER_NAMES if (root / name).is_dir()), None)
    if image_folder is None:
        image_folder = next((d for d in sorted(root.iterdir()) if d.is_dir() and (d / "1.jpg").exists()), None)
    if image_folder is None:
        raise wrong_format(TITLE, root, f"an image folder ('MMVP Images') beside {QUESTIONS_FILE}",
                           DOWNLOAD_HINT, NAME)

    def image_for(row: dict[str, Any]) -> str:
        index = str(row["index"]).strip()
        default = image_folder / f"{index}.jpg"
        if default.exists():
            return str(default)
        other = next((image_folder / f"{index}{s}" for s in IMAGE_SUFFIXES if (image_folder / f"{index}{s}").exists()),
                     default)
        return str(other)  # may not exist: that instance then fails when its image is opened

    return (_canonical(row) for row in iter_table_rows(csv_path)), image_for


def _parquet_rows(tables: list[Path], cache: ImageCache):
    def rows():
        for table in tables:
            for row in iter_table_rows(table):
                yield _canonical(row)

    def image_for(row: dict[str, Any]) -> str:
        return cache.store(row["image"], f"mmvp_{row['index']}") or ""  # empty cell: no image to record

    return rows(), image_for
