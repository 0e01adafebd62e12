"""BLINK: 14 perception sub-tasks (Jigsaw, Counting, Relative_Reflectance, Spatial_Relation, ...) as multiple choice.

Reads the Hugging Face release ``BLINK-Benchmark/BLINK`` as downloaded: one folder per sub-task holding
``val-00000-of-00001.parquet`` and ``test-00000-of-00001.parquet`` (the Hub's converted layout
``<Sub_task>/val/0000.parquet`` works too). Columns: ``idx`` (``val_Jigsaw_1``), ``question``, ``sub_task``,
``image_1``..``image_4`` (embedded ``{"bytes", "path"}``, unused ones empty), ``choices`` (list of option texts),
``answer`` (``"(A)"``), ``prompt`` (question with the choices spelled out) and ``explanation``.

Only the ``val`` split carries gold answers (the test answers are withheld by the authors), so the ``val`` files
are read. ``split`` selects sub-tasks by name, comma-separated (``"Jigsaw,Counting"``); the instance's ``task``
is the sub-task.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..instances import Instance
from ...errors import LatentProbeError
from .common import (ImageCache, SplitFilter, default_cache_dir, files_matching, finish, full, iter_table_rows,
                     normalise_name, option_for_letter, parse_letter, require_path, tables_with_columns,
                     wrong_format)

NAME = "blink"
TITLE = "BLINK"
SUBTASKS = ("Art_Style", "Counting", "Forensic_Detection", "Functional_Correspondence", "IQ_Test", "Jigsaw",
            "Multi-view_Reasoning", "Object_Localization", "Relative_Depth", "Relative_Reflectance",
            "Semantic_Correspondence", "Spatial_Relation", "Visual_Correspondence", "Visual_Similarity")
DOWNLOAD_HINT = ("download the dataset BLINK-Benchmark/BLINK from the Hugging Face Hub (`huggingface-cli download "
                 "BLINK-Benchmark/BLINK --repo-type dataset --local-dir DIR`) and pass DIR")
EXPECTED = "sub-task folders (Jigsaw/, Counting/, ...) holding val-*.parquet files"
REQUIRED_COLUMNS = ("idx", "question", "choices", "answer", "image_1")
IMAGE_COLUMNS = ("image_1", "image_2", "image_3", "image_4")
_SUBTASK_BY_KEY = {normalise_name(s): s for s in SUBTASKS}


def looks_like(path: Path) -> bool:
    if not path.is_dir():
        return False
    return any((path / subtask).is_dir() and files_matching(path / subtask, ["*.parquet"], depth=1)
               for subtask in SUBTASKS)


def load(folder: str | Path, limit: int | None = None, split: str | None = None,
         cache_dir: str | Path | None = None) -> list[Instance]:
    """Load the BLINK val split (all sub-tasks present, or those named in ``split``)."""
    path = require_path(folder, TITLE, DOWNLOAD_HINT)
    # Sub-task folders hold val-*.parquet (release) or val/0000.parquet (the Hub's converted layout).
    parquet_files = tables_with_columns(files_matching(path, ["*.parquet"], depth=2), REQUIRED_COLUMNS)
    val_files = [p for p in parquet_files if _data_split(p) == "val"]
    if not val_files:
        if any(_data_split(p) == "test" for p in parquet_files):
            raise LatentProbeError(f"{TITLE}: {path} holds only test files, whose gold answers are withheld",
                                   "download the val files too (val-*.parquet in each sub-task folder)")
        raise wrong_format(TITLE, path, EXPECTED, DOWNLOAD_HINT, NAME)
    cache = ImageCache(cache_dir or default_cache_dir(path, NAME))
    split_filter = SplitFilter(split)
    instances: list[Instance] = []
    for table in val_files:
        folder_subtask = _subtask_from_path(table, path)
        if folder_subtask and not split_filter.keeps(folder_subtask):
            continue  # skip the whole file without reading it
        for row in iter_table_rows(table):
            subtask = folder_subtask or _canonical_subtask(str(row.get("sub_task") or "unknown"))
            if not folder_subtask and not split_filter.keeps(subtask):
                continue
            instances.append(_instance(row, subtask, cache, table))
            if full(instances, limit):
                return finish(instances, TITLE, path, split_filter)
    return finish(instances, TITLE, path, split_filter)


def _instance(row: dict[str, Any], subtask: str, cache: ImageCache, table: Path) -> Instance:
    idx = str(row["idx"])
    options = [str(c) for c in (row["choices"] or [])]
    gold = option_for_letter(parse_letter(row["answer"]), options)
    if gold is None:
        raise LatentProbeError(f"{TITLE}: row {idx} of {table} has answer {row['answer']!r}, not one of its "
                               f"{len(options)} choices", "re-download the file; only val files carry answers")
    images = [cache.store(row.get(column), f"{idx}_{column[-1]}") for column in IMAGE_COLUMNS]
    attributes = {"sub_task": subtask, "n_images": sum(p is not None for p in images)}
    if row.get("explanation"):
        attributes["explanation"] = str(row["explanation"])
    return Instance(id=idx, question=str(row["question"]).strip(), answer=gold,
                    images=[p for p in images if p is not None], options=options, attributes=attributes,
                    split="val", task=subtask)


def _data_split(table: Path) -> str | None:
    for name in (table.stem.lower(), table.parent.name.lower()):
        for split in ("val", "test"):
            if name == split or name.startswith(split + "-"):
                return split
    return None


def _subtask_from_path(table: Path, root: Path) -> str | None:
    """The sub-task named by the folder the file sits in, when that folder is a BLINK sub-task."""
    for part in table.relative_to(root).parts[:-1] if table != root else ():
        if normalise_name(part) in _SUBTASK_BY_KEY:
            return _SUBTASK_BY_KEY[normalise_name(part)]
    if normalise_name(root.name) in _SUBTASK_BY_KEY:  # a single sub-task folder was passed
        return _SUBTASK_BY_KEY[normalise_name(root.name)]
    return None


def _canonical_subtask(name: str) -> str:
    return _SUBTASK_BY_KEY.get(normalise_name(name), name.replace(" ", "_"))
