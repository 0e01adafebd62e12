"""MME-RealWorld-Lite: the subset of MME-RealWorld (up to 50 questions per task), five choices each.

Reads any of the three published forms of a local copy:

* **Original release** ``yifanzhang114/MME-RealWorld-Lite`` (``data.zip`` unpacked): ``MME-RealWorld-Lite.json``
  (a list of objects with ``Question_id``, ``Image`` (path under ``imgs/``), ``Text``, ``Answer choices``
  (``["(A) ...", ..., "(E) ..."]``), ``Ground truth`` (letter), ``Task`` (Perception / Reasoning), ``Subtask``
  (e.g. ``Autonomous_Driving``) and ``Category``) beside an ``imgs/`` folder; the folder may also be ``data/``.
* **Base64 TSV** ``yifanzhang114/MME-RealWorld-Base64`` file ``mme_realworld_lite.tsv`` (VLMEvalKit names it
  ``MME-RealWorld-Lite.tsv``): ``index``, ``image`` (base64), ``question``, ``multi-choice options`` (the list
  as text), ``answer``, ``category`` (``Perception/Monitoring``), ``l2-category``.
* **lmms-eval parquet** ``yifanzhang114/MME-RealWorld-lite-lmms-eval``: ``data/*.parquet`` with ``index``,
  ``question``, ``bytes`` (base64 image), ``multi-choice options`` (a list), ``answer``, ``category``,
  ``l2-category``.

The instance's ``task`` is ``<Task>/<Subtask>`` (for example ``Perception/Monitoring``); ``split`` selects a task
or everything under it (``perception`` or ``reasoning/diagram_and_table``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from ..instances import Instance
from ...errors import LatentProbeError
from .common import (ImageCache, SplitFilter, VLMEvalImages, default_cache_dir, files_matching, finish,
                     first_existing, full, iter_table_rows, literal_list, option_for_letter, parse_letter,
                     require_columns, require_path, strip_option_prefix, table_columns, tables_with_columns,
                     wrong_format)

NAME = "mme-realworld-lite"
TITLE = "MME-RealWorld-Lite"
DOWNLOAD_HINT = ("download yifanzhang114/MME-RealWorld-Lite from the Hugging Face Hub and unzip its data.zip "
                 "(or download mme_realworld_lite.tsv from yifanzhang114/MME-RealWorld-Base64) and pass that folder")
EXPECTED = ("MME-RealWorld-Lite.json with an imgs/ folder, mme_realworld_lite.tsv, or parquet files with columns "
            "question, multi-choice options, answer, bytes")
JSON_NAMES = ("MME-RealWorld-Lite.json", "MME_RealWorld_Lite.json")
TSV_PATTERNS = ("mme_realworld_lite*.tsv", "mme-realworld-lite*.tsv")
JSON_FIELDS = ("Question_id", "Image", "Text", "Answer choices", "Ground truth")
TABLE_COLUMNS = ("question", "multi-choice options", "answer", "category")


def looks_like(path: Path) -> bool:
    if not path.exists():
        return False
    return _find_json(path) is not None or bool(files_matching(path, TSV_PATTERNS)) or bool(_lmms_parquets(path))


def load(folder: str | Path, limit: int | None = None, split: str | None = None,
         cache_dir: str | Path | None = None) -> list[Instance]:
    """Load MME-RealWorld-Lite from its JSON + images release, its base64 TSV, or the lmms-eval parquet."""
    path = require_path(folder, TITLE, DOWNLOAD_HINT)
    split_filter = SplitFilter(split)
    cache = ImageCache(cache_dir or default_cache_dir(path, NAME))
    json_path = _find_json(path)
    if json_path is not None:
        instances = _from_json(json_path, limit, split_filter)
    else:
        tables = files_matching(path, TSV_PATTERNS) or _lmms_parquets(path)
        if not tables:
            raise wrong_format(TITLE, path, EXPECTED, DOWNLOAD_HINT, NAME)
        instances = _from_tables(tables, cache, limit, split_filter)
    return finish(instances, TITLE, path, split_filter)


def _find_json(path: Path) -> Path | None:
    if path.is_file():
        return path if path.suffix.lower() == ".json" else None
    return first_existing(base / name for base in (path, path / "data") for name in JSON_NAMES)


def _lmms_parquets(path: Path) -> list[Path]:
    return tables_with_columns(files_matching(path, ["*.parquet"], depth=1), ["multi-choice options", "bytes"])


def _options(raw: Iterable[str]) -> list[str]:
    return [strip_option_prefix(option) for option in raw]


def _from_json(json_path: Path, limit: int | None, split_filter: SplitFilter) -> list[Instance]:
    try:
        records = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LatentProbeError(f"{TITLE}: {json_path} is not valid JSON ({exc.msg})", "re-download it") from exc
    if not isinstance(records, list) or not records:
        raise LatentProbeError(f"{TITLE}: {json_path} should hold a list of questions", DOWNLOAD_HINT)
    require_columns(TITLE, json_path, records[0], JSON_FIELDS, DOWNLOAD_HINT)
    image_root = _image_root(json_path, [str(r["Image"]) for r in records[:20]])
    instances: list[Instance] = []
    for record in records:
        task = f"{record.get('Task', '')}/{record.get('Subtask', '')}".strip("/")
        if not split_filter.keeps(task):
            continue
        options = _options(record["Answer choices"])
        letter = parse_letter(record["Ground truth"])
        attributes = {"task_type": record.get("Task"), "subtask": record.get("Subtask"),
                      "category": record.get("Category"), "source_dataset": record.get("Dataset")}
        instances.append(Instance(
            id=str(record["Question_id"]), question=str(record["Text"]).strip(),
            answer=option_for_letter(letter, options) or str(record["Ground truth"]).strip(),
            images=[str(image_root / record["Image"])], options=options,
            attributes={k: v for k, v in attributes.items() if v not in (None, "")},
            split="test", task=task or None))
        if full(instances, limit):
            break
    return instances


def _image_root(json_path: Path, sample_images: list[str]) -> Path:
    """The folder the JSON's image paths are relative to: ``imgs/`` beside it in the release, else the JSON's own."""
    candidates = [json_path.parent / "imgs", json_path.parent, json_path.parent.parent / "imgs"]
    for candidate in candidates:
        if any((candidate / image).exists() for image in sample_images):
            return candidate
    return candidates[0]  # images missing: each instance fails when opened, with the path in the message


def _from_tables(tables: list[Path], cache: ImageCache, limit: int | None,
                 split_filter: SplitFilter) -> list[Instance]:
    instances: list[Instance] = []
    for table in tables:
        columns = table_columns(table)
        require_columns(TITLE, table, columns, TABLE_COLUMNS, DOWNLOAD_HINT)
        image_column = "bytes" if "bytes" in columns else "image"
        if image_column not in columns:
            require_columns(TITLE, table, columns, ["image"], DOWNLOAD_HINT)
        images = VLMEvalImages(cache, table)
        for row in iter_table_rows(table):
            task = str(row["category"]).strip()
            if not split_filter.keeps(task):
                continue
            index = str(row.get("index", len(instances)))
            options = _options(literal_list(row["multi-choice options"]))
            paths = images.paths({"index": index, "image": row[image_column]}, f"{task}_{index}")
            attributes = {"task_type": task.split("/")[0], "subtask": task.split("/")[-1],
                          "category": row.get("l2-category")}
            instances.append(Instance(
                id=index, question=str(row["question"]).strip(),
                answer=option_for_letter(parse_letter(row["answer"]), options) or str(row["answer"]).strip(),
                images=paths, options=options, attributes={k: v for k, v in attributes.items() if v},
                split="test", task=task or None))
            if full(instances, limit):
                break
        images.resolve(instances)
        if full(instances, limit):
            break
    return instances

