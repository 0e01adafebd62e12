"""V*Bench: 191 multiple-choice questions about small details in high-resolution images.

Reads any of these published layouts of a local copy:

* **Hugging Face release** ``craigwu/vstar_bench`` (the default): ``test_questions.jsonl``, one object per line
  with ``image`` (path relative to the folder), ``text`` (the question, one ``(A) option`` line per choice, then an
  instruction line), ``category`` (``direct_attributes`` or ``relative_position``), ``question_id`` and ``label``
  (the gold letter). The per-split folders below sit beside it and add ``target_object`` and ``bbox``.
* **Original per-split folders** alone: ``direct_attributes/`` and ``relative_position/``, each with
  ``<name>.jpg`` + ``<name>.json`` pairs; the JSON holds ``question``, ``options`` (the gold option listed first:
  the authors' script scores every option by likelihood, so order does not matter there), ``target_object`` and
  ``bbox`` (``[x, y, w, h]`` per target). A generative evaluation must not always put the gold at A: when
  ``test_questions.jsonl`` is beside the folders its labels and option order are used; otherwise each instance's
  options are shuffled by a permutation seeded by (``option_seed``, instance id), recorded in
  ``attributes["option_order"]`` (the release's option index shown at each letter).
* **lmms-eval parquet dump** ``lmms-lab/vstar-bench``: ``*.parquet`` with columns ``question_id``, ``image``
  (embedded bytes), ``text``, ``label``, ``category``.
* **VLMEvalKit TSV** ``VStarBench.tsv``: ``index``, ``image`` (base64), ``question``, ``A``..``D``, ``answer``,
  ``category``.

``split`` selects ``direct_attributes`` or ``relative_position`` (the instance's ``task``).

Example::

    >>> from latentprobe.data.benchmarks import load_benchmark
    >>> instances = load_benchmark("vstar", "data/vstar_bench", split="relative_position")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..instances import Instance
from ...errors import LatentProbeError
from .common import (IMAGE_SUFFIXES, ImageCache, SplitFilter, VLMEvalImages, default_cache_dir, files_matching,
                     finish, full, iter_table_rows, letter_options, natural_key, option_for_letter, parse_letter,
                     require_columns, require_path, table_columns, tables_with_columns, wrong_format)

NAME = "vstar"
TITLE = "V*Bench"
SPLITS = ("direct_attributes", "relative_position")
DOWNLOAD_HINT = ("download the dataset craigwu/vstar_bench from the Hugging Face Hub (for example "
                 "`huggingface-cli download craigwu/vstar_bench --repo-type dataset --local-dir DIR`) and pass DIR")
EXPECTED = ("test_questions.jsonl, or direct_attributes/ and relative_position/ folders of image + .json pairs, "
            "or a parquet/TSV with columns text+label+category (lmms-eval) or question+A..D+answer (VLMEvalKit)")
QUESTIONS_FILE = "test_questions.jsonl"
LMMS_COLUMNS = ("text", "label", "category", "image")
_OPTION_LINE = re.compile(r"^\s*\(([A-Z])\)\s*(.*?)\s*$")
_INLINE_OPTION = re.compile(r"\(([A-Z])\)\s*(.+?)(?=\s*\([A-Z]\)|$)", re.DOTALL)
_INSTRUCTION = re.compile(r"\s*answer with the option'?s letter.*$", re.IGNORECASE | re.DOTALL)


def looks_like(path: Path) -> bool:
    if path.is_file():
        return path.name.lower() in (QUESTIONS_FILE, "vstarbench.tsv")
    return ((path / QUESTIONS_FILE).exists() or any((path / split).is_dir() for split in SPLITS)
            or bool(files_matching(path, ["vstarbench.tsv"])))


def load(folder: str | Path, limit: int | None = None, split: str | None = None,
         cache_dir: str | Path | None = None, option_seed: int = 0) -> list[Instance]:
    """Load V*Bench from a local copy in any published layout (see the module docstring).

    ``option_seed`` seeds the per-instance option shuffle of the per-split folders (used only without
    ``test_questions.jsonl``)."""
    path = require_path(folder, TITLE, DOWNLOAD_HINT)
    cache = ImageCache(cache_dir or default_cache_dir(path, NAME))
    split_filter = SplitFilter(split)
    root = path.parent if path.is_file() else path
    if (root / QUESTIONS_FILE).exists():
        instances = _from_questions_jsonl(root, limit, split_filter)
    elif path.is_dir() and any((path / s).is_dir() for s in SPLITS):
        instances = _from_split_folders(path, limit, split_filter, option_seed)
    else:
        # The lmms-eval dump keeps its parquet under data/; VLMEvalKit names its TSV VStarBench.tsv.
        tables = (tables_with_columns(files_matching(path, ["*.parquet"], depth=1), LMMS_COLUMNS)
                  + files_matching(path, ["vstarbench*.tsv"], depth=1))
        if not tables:
            raise wrong_format(TITLE, path, EXPECTED, DOWNLOAD_HINT, NAME)
        instances = _from_tables(tables, cache, limit, split_filter)
    return finish(instances, TITLE, path, split_filter)


def parse_question_text(text: str) -> tuple[str, list[str]]:
    """Split the release's ``text`` field into the question and its option texts (letters and instruction dropped)."""
    lines = str(text).splitlines()
    question_lines: list[str] = []
    options: list[str] = []
    for line in lines:
        match = _OPTION_LINE.match(line)
        if match:
            options.append(match.group(2))
        elif _INSTRUCTION.match(line):  # the release's trailing "Answer with the option's letter ..." line
            continue
        elif not options:
            question_lines.append(line)
    if not options:
        # Some copies put the options on the question's line: "What colour? (A) red (B) blue".
        head, _, tail = str(text).partition("(A)")
        options = [o.strip() for _, o in _INLINE_OPTION.findall("(A)" + tail)] if tail else []
        question_lines = [head]
        options = [_INSTRUCTION.sub("", o).strip() for o in options]
    return "\n".join(question_lines).strip(), options


def _from_questions_jsonl(root: Path, limit: int | None, split_filter: SplitFilter) -> list[Instance]:
    questions_path = root / QUESTIONS_FILE
    instances: list[Instance] = []
    with open(questions_path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LatentProbeError(f"{TITLE}: {questions_path}:{line_no} is not valid JSON ({exc.msg})",
                                       "re-download the file") from exc
            require_columns(TITLE, questions_path, row, ("image", "text", "category", "label"), DOWNLOAD_HINT)
            category = str(row["category"])
            if not split_filter.keeps(category):
                continue
            question, options = parse_question_text(row["text"])
            image_path = root / row["image"]
            stem = Path(row["image"]).stem
            # raw_text: the release's own question text (options and instruction included), which LVR's
            # evaluation feeds as is (see the lvr family's prompt style)
            attributes = {"category": category, "question_id": row.get("question_id"), "raw_text": str(row["text"]),
                          **_annotation_attributes(image_path.with_suffix(".json"))}
            letter = parse_letter(row["label"])
            instances.append(Instance(
                id=f"{category}/{stem}", question=question,
                answer=option_for_letter(letter, options) or str(row["label"]).strip(),
                images=[str(image_path)], options=options or None, attributes=attributes,
                split="test", task=category))
            if full(instances, limit):
                break
    return instances


def _annotation_attributes(json_path: Path) -> dict[str, Any]:
    """Ground truth from the per-image JSON of the original release (target objects and their boxes)."""
    if not json_path.exists():
        return {}
    try:
        annotation = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return {key: annotation[key] for key in ("target_object", "bbox") if key in annotation}


def shuffled_option_order(instance_id: str, n_options: int, seed: int = 0) -> list[int]:
    """A permutation of ``range(n_options)`` fixed by (seed, instance id): the same on every machine and run.

    >>> shuffled_option_order("direct_attributes/sa_1", 4) == shuffled_option_order("direct_attributes/sa_1", 4)
    True
    """
    import hashlib

    import numpy as np

    digest = hashlib.sha256(f"vstar-options:{seed}:{instance_id}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return [int(i) for i in rng.permutation(n_options)]


def _from_split_folders(root: Path, limit: int | None, split_filter: SplitFilter,
                        option_seed: int = 0) -> list[Instance]:
    instances: list[Instance] = []
    for category in SPLITS:
        folder = root / category
        if not folder.is_dir() or not split_filter.keeps(category):
            continue
        images = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=natural_key)
        for image_path in images:
            json_path = image_path.with_suffix(".json")
            if not json_path.exists():
                raise LatentProbeError(f"{TITLE}: {image_path.name} in {folder} has no {json_path.name} beside it",
                                       f"every image needs its annotation file; {DOWNLOAD_HINT}")
            annotation = json.loads(json_path.read_text(encoding="utf-8"))
            require_columns(TITLE, json_path, annotation, ("question", "options"), DOWNLOAD_HINT)
            listed = [str(o) for o in annotation["options"]]
            instance_id = f"{category}/{image_path.stem}"
            # The release lists the gold option first; shuffle so the gold letter is not always A.
            order = shuffled_option_order(instance_id, len(listed), option_seed)
            instances.append(Instance(
                id=instance_id, question=str(annotation["question"]),
                answer=listed[0], images=[str(image_path)], options=[listed[i] for i in order],
                attributes={"category": category, "option_order": order, "option_seed": option_seed,
                            **_annotation_attributes(json_path)},
                split="test", task=category))
            if full(instances, limit):
                return instances
    return instances


def _from_tables(tables: list[Path], cache: ImageCache, limit: int | None,
                 split_filter: SplitFilter) -> list[Instance]:
    instances: list[Instance] = []
    for table in tables:
        columns = table_columns(table)
        lmms_layout = set(LMMS_COLUMNS) <= set(columns)
        if not lmms_layout:
            require_columns(TITLE, table, columns, ("index", "image", "question", "A", "B", "answer"), DOWNLOAD_HINT)
        vlmeval_images = VLMEvalImages(cache, table)
        for row in iter_table_rows(table):
            category = str(row.get("category") or "")
            if not split_filter.keeps(category):
                continue
            if lmms_layout:
                question, options = parse_question_text(row["text"])
                raw_text = str(row["text"])
                image_cell = row["image"]
                name = image_cell.get("path") if isinstance(image_cell, dict) else None
                stem = Path(name).stem if name else str(row.get("question_id"))
                images = [p for p in [cache.store(image_cell, f"{category}_{stem}")] if p]
                gold = row["label"]
            else:
                question, options = str(row["question"]), letter_options(row)
                raw_text = None
                stem = str(row["index"])
                images = vlmeval_images.paths(row, f"{category}_{stem}")
                gold = row["answer"]
            instances.append(Instance(
                id=f"{category}/{stem}" if category else stem, question=question,
                answer=option_for_letter(parse_letter(gold), options) or str(gold).strip(),
                images=images, options=options or None,
                attributes={"category": category, "question_id": row.get("question_id", row.get("index")),
                            **({"raw_text": raw_text} if raw_text else {})},
                split="test", task=category or None))
            if full(instances, limit):
                break
        vlmeval_images.resolve(instances)
        if full(instances, limit):
            break
    return instances
