"""HR-Bench 4K and 8K: four-choice questions about fine detail in 4K and 8K images.

Reads the release of ``DreamMr/HR-Bench`` (Hugging Face) in either of its file forms:

* **TSV** (the authors' VLMEvalKit format): ``hr_bench_4k.tsv`` / ``hr_bench_8k.tsv`` (VLMEvalKit's own copies are
  named ``HRBench4K.tsv`` / ``HRBench8K.tsv``) with columns ``index``, ``question``, ``A``..``D``, ``answer``
  (the gold letter), ``category`` (``single`` = fine-grained single-instance perception, ``cross`` = cross-instance
  perception), ``cycle_category`` and ``image`` (base64). As in every VLMEvalKit TSV, a row whose ``image`` cell
  is a short index re-uses the image of that row.
* **Parquet**: ``hr_bench_4k.parquet`` / ``hr_bench_8k.parquet`` with the same columns.

Pass the folder holding the files (or one file). ``split`` selects ``single`` or ``cross`` (the ``task``).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from ..instances import Instance
from ...errors import LatentProbeError
from .common import (ImageCache, SplitFilter, VLMEvalImages, default_cache_dir, files_matching, finish, full,
                     iter_table_rows, letter_options, option_for_letter, parse_letter, require_columns,
                     require_path, table_columns, wrong_format)

TITLE = "HR-Bench"
RESOLUTIONS = ("4k", "8k")
DOWNLOAD_HINT = ("download the dataset DreamMr/HR-Bench from the Hugging Face Hub (`huggingface-cli download "
                 "DreamMr/HR-Bench --repo-type dataset --local-dir DIR`) and pass DIR")
REQUIRED_COLUMNS = ("index", "question", "A", "B", "answer", "image")


def file_patterns(resolution: str) -> list[str]:
    return [f"hr_bench_{resolution}.tsv", f"hr_bench_{resolution}.parquet", f"hrbench{resolution}.tsv",
            f"hr_bench_{resolution}*.parquet"]


def looks_like(path: Path, resolution: str) -> bool:
    return bool(files_matching(path, file_patterns(resolution))) if path.exists() else False


def load(folder: str | Path, limit: int | None = None, split: str | None = None,
         cache_dir: str | Path | None = None, resolution: str = "4k") -> list[Instance]:
    """Load HR-Bench at ``resolution`` ("4k" or "8k") from the folder holding its TSV or parquet file."""
    resolution = resolution.lower()
    if resolution not in RESOLUTIONS:
        raise LatentProbeError(f"{TITLE}: unknown resolution {resolution!r}", "use 4k or 8k")
    name, title = f"hrbench-{resolution}", f"{TITLE} {resolution.upper()}"
    path = require_path(folder, title, DOWNLOAD_HINT)
    tables = files_matching(path, file_patterns(resolution))
    if not tables:
        expected = " or ".join(f"'{p}'" for p in file_patterns(resolution)[:3])
        raise wrong_format(title, path, f"a file named {expected}", DOWNLOAD_HINT, name)
    # The TSV and the parquet hold the same questions: read one, preferring the TSV the authors evaluate with.
    table = sorted(tables, key=lambda p: p.suffix.lower() != ".tsv")[0]
    require_columns(title, table, table_columns(table), REQUIRED_COLUMNS, DOWNLOAD_HINT)
    cache = ImageCache(cache_dir or default_cache_dir(path, name))
    images = VLMEvalImages(cache, table)
    split_filter = SplitFilter(split)
    instances: list[Instance] = []
    for row in iter_table_rows(table):
        category = str(row.get("category") or "").strip()
        if not split_filter.keeps(category or None):
            continue
        options = letter_options(row)
        index = str(row["index"]).strip()
        attributes = {"resolution": resolution, "category": category, "cycle_category": row.get("cycle_category")}
        instances.append(Instance(
            id=index, question=str(row["question"]).strip(),
            answer=option_for_letter(parse_letter(row["answer"]), options) or str(row["answer"]).strip(),
            images=images.paths(row, f"{resolution}_{index}"), options=options,
            attributes={k: v for k, v in attributes.items() if v not in (None, "")},
            split="test", task=category or None))
        if full(instances, limit):
            break
    images.resolve(instances)
    return finish(instances, title, path, split_filter)


load_4k = partial(load, resolution="4k")
load_8k = partial(load, resolution="8k")
