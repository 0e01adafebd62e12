"""Text latent-CoT tasks in the JSON their studies release: ProsQA and GSM8k-Aug (Coconut, CODI).

* **ProsQA** (facebookresearch/coconut ``data/prosqa_{train,valid,test}.json``): a JSON list of objects with
  ``question`` (the facts, then "Is X a A or B?"), ``answer`` (a sentence, "X is a B.") and ``steps`` (the
  reasoning chain); Coconut scores an exact match of the answer sentence (run.py). The two named concepts are kept
  as ``attributes["choices"]`` and the chain as ``attributes["steps"]``; ``task="prosqa"``.
* **GSM8k-Aug** (Coconut's ``preprocessing/gsm_icot.py`` output ``gsm_{split}.json``: ``question``, ``steps``
  like ``"<<4*2=8>>"``, ``answer`` "18"; or CODI's zen-E/GSM8k-Aug rows with ``cot`` instead of ``steps``, and
  GSM8k's own ``answer`` ending "#### 18"): the answer is the number; ``task="gsm8k-aug"``.

A path may be the JSON (or JSONL) file itself or a folder holding one; ``split`` picks ``test``/``valid``/``train``
by file name in a folder. Nothing is downloaded. Instances have no images and no options (both studies score
free text), so run them with a text subject (Coconut, CODI or a text organism).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..instances import Instance
from ...errors import LatentProbeError
from .common import require_path, wrong_format

PROSQA, GSM8K_AUG = "prosqa", "gsm8k-aug"
PROSQA_HINT = "pass the folder (or file) holding Coconut's data/prosqa_test.json (facebookresearch/coconut)"
GSM_HINT = ("pass Coconut's gsm_test.json (preprocessing/gsm_icot.py) or a JSON/JSONL file with question and "
            "answer fields (CODI's zen-E/GSM8k-Aug rows)")
_PROSQA_CHOICE = re.compile(r"Is (\w+) an? (\w+) or (?:an? )?(\w+)\?\s*$")
_SPLITS = ("test", "valid", "val", "train")


def _json_file(folder: str | Path, stem: str, split: str | None, hint: str, title: str, registry_name: str) -> Path:
    path = require_path(folder, title, hint)
    if path.is_file():
        return path
    wanted = (split,) if split else _SPLITS
    for name in wanted:
        for candidate in (f"{stem}_{name}.json", f"{stem}_{name}.jsonl", f"{name}.json", f"{name}.jsonl"):
            if (path / candidate).exists():
                return path / candidate
    raise wrong_format(title, path, f"{stem}_{{{','.join(wanted)}}}.json", hint, registry_name)


def _rows(path: Path, title: str, hint: str) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    try:
        rows = json.loads(text)
    except ValueError:
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as exc:
            raise LatentProbeError(f"{title}: {path} is neither JSON nor JSONL ({exc})", hint) from None
    if isinstance(rows, dict):
        rows = [rows]
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise LatentProbeError(f"{title}: {path} does not hold a list of JSON objects", hint)
    return rows


def _require(row: dict, fields: tuple[str, ...], where: str, hint: str) -> None:
    missing = [f for f in fields if row.get(f) in (None, "")]
    if missing:
        raise LatentProbeError(f"{where}: missing field(s) {', '.join(missing)}", hint)


def load_prosqa(folder: str | Path, limit: int | None = None, split: str | None = None,
                cache_dir: str | Path | None = None) -> list[Instance]:
    """ProsQA from Coconut's JSON (see the module docstring)."""
    path = _json_file(folder, "prosqa", split, PROSQA_HINT, "ProsQA", PROSQA)
    instances = []
    for i, row in enumerate(_rows(path, "ProsQA", PROSQA_HINT)):
        _require(row, ("question", "answer"), f"ProsQA {path.name} row {i}", PROSQA_HINT)
        question = str(row["question"])
        match = _PROSQA_CHOICE.search(question)
        attributes: dict[str, Any] = {"steps": list(row.get("steps") or [])}
        if match:
            attributes["entity"], attributes["choices"] = match.group(1), [match.group(2), match.group(3)]
        instances.append(Instance(id=f"prosqa-{row.get('idx', i)}", question=question, answer=str(row["answer"]),
                                  attributes=attributes, task=PROSQA, split=split or path.stem.split("_")[-1]))
        if limit is not None and len(instances) >= limit:
            break
    if not instances:
        raise LatentProbeError(f"ProsQA: {path} holds no instances", PROSQA_HINT)
    return instances


def gsm_answer(value: Any) -> str:
    """The number of a GSM8k answer: after "####" when present, commas removed ("2,000" -> "2000")."""
    text = str(value)
    if "####" in text:
        text = text.split("####")[-1]
    return text.replace(",", "").strip()


def load_gsm8k_aug(folder: str | Path, limit: int | None = None, split: str | None = None,
                   cache_dir: str | Path | None = None) -> list[Instance]:
    """GSM8k-Aug from Coconut's or CODI's JSON (see the module docstring)."""
    path = _json_file(folder, "gsm", split, GSM_HINT, "GSM8k-Aug", GSM8K_AUG)
    instances = []
    for i, row in enumerate(_rows(path, "GSM8k-Aug", GSM_HINT)):
        _require(row, ("question", "answer"), f"GSM8k-Aug {path.name} row {i}", GSM_HINT)
        steps = row.get("steps")
        if steps is None and row.get("cot") is not None:
            steps = str(row["cot"]).split()
        instances.append(Instance(id=f"gsm8k-aug-{row.get('idx', i)}", question=str(row["question"]),
                                  answer=gsm_answer(row["answer"]), attributes={"steps": list(steps or [])},
                                  task=GSM8K_AUG, split=split or path.stem.split("_")[-1]))
        if limit is not None and len(instances) >= limit:
            break
    if not instances:
        raise LatentProbeError(f"GSM8k-Aug: {path} holds no instances", GSM_HINT)
    return instances


def looks_like_prosqa(path: Path) -> bool:
    return path.name.startswith("prosqa") if path.is_file() else any(path.glob("prosqa_*.json"))


def looks_like_gsm(path: Path) -> bool:
    return path.name.startswith("gsm") if path.is_file() else any(path.glob("gsm_*.json"))
