"""Write a generated task to disk: PNGs under images/, one data.jsonl in the Instance schema, and task.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image

from ..instances import Instance, write_jsonl
from ...errors import LatentProbeError
from ...fileio import atomic_write, atomic_write_json
from . import digits, path, transform
from .common import GeneratedInstance

TASKS = {"transform": transform.generate, "path": path.generate, "digits": digits.generate}
GENERATOR_VERSIONS = {"transform": transform.VERSION, "path": path.VERSION, "digits": digits.VERSION}
DATA_FILE, META_FILE, IMAGE_DIR = "data.jsonl", "task.json", "images"


def make_task(name: str, n: int, seed: int, out_dir: str | Path, test_fraction: float = 0.25,
              image_size: int = 56, overwrite: bool = False, **task_options: Any) -> Path:
    """Generate `n` instances of task `name`, split into train/test, and write them under `out_dir`.

    Returns the path of `out_dir/data.jsonl`. The test split is generated after the train split and excludes
    every (image, question) pair the train split holds, so the splits never share an item. Extra keyword
    arguments go to the task's generator (e.g. `grid_size=4` for transform).

    >>> import tempfile
    >>> data = make_task("transform", n=8, seed=0, out_dir=tempfile.mkdtemp())
    >>> data.name, len(data.read_text().splitlines())
    ('data.jsonl', 8)
    """
    if name not in TASKS:
        raise LatentProbeError(f"unknown task {name!r}", f"choose one of {', '.join(sorted(TASKS))}")
    if not isinstance(n, int) or n < 1:
        raise LatentProbeError(f"n must be a positive integer, got {n!r}", "pass e.g. n=200")
    if not 0 <= test_fraction < 1:
        raise LatentProbeError(f"test_fraction must be in [0, 1), got {test_fraction}", "pass e.g. 0.25")
    n_test = int(n * test_fraction + 0.5)
    n_train = n - n_test
    if n_train < 1:
        raise LatentProbeError(f"n={n} with test_fraction={test_fraction} leaves no training instance",
                               "raise n or lower test_fraction")
    out_dir = Path(out_dir)
    data_path = out_dir / DATA_FILE
    if data_path.exists():
        if not overwrite:
            raise LatentProbeError(f"{data_path} already exists",
                                   "choose another --out folder (from Python: make_task(..., overwrite=True) "
                                   "replaces it)")
        _remove_previous_images(out_dir)

    generate = TASKS[name]
    train = generate(n_train, seed, image_size, split="train", **task_options)
    train_keys = frozenset(item.dedup_key() for item in train)
    test = generate(n_test, seed, image_size, split="test", exclude=train_keys, **task_options) if n_test else []

    instances = []
    for split, items in (("train", train), ("test", test)):
        for number, item in enumerate(items):
            instances.append(_save(item, f"{name}-{split}-{number:05d}", split, name, out_dir / IMAGE_DIR))
    write_jsonl(instances, data_path)
    atomic_write_json(out_dir / META_FILE, {
        "task": name, "n": n, "n_train": n_train, "n_test": n_test, "seed": seed, "image_size": image_size,
        "test_fraction": test_fraction, "generator_version": GENERATOR_VERSIONS[name],
        "task_options": task_options, "data": DATA_FILE,
    })
    return data_path


def chance_accuracy(instances: Iterable[Instance | GeneratedInstance]) -> float:
    """Expected accuracy of guessing uniformly among each instance's options.

    >>> chance_accuracy(transform.generate(4, seed=0))
    0.25
    """
    inverse_counts = []
    for item in instances:
        if not item.options:
            raise LatentProbeError("chance_accuracy needs options on every instance",
                                   "use multiple-choice instances (all built-in tasks have options)")
        inverse_counts.append(1.0 / len(item.options))
    if not inverse_counts:
        raise LatentProbeError("chance_accuracy got no instances", "pass at least one instance")
    return float(np.mean(inverse_counts))


def _save(item: GeneratedInstance, instance_id: str, split: str, task: str, image_dir: Path) -> Instance:
    image = _write_png(item.image, image_dir / f"{instance_id}.png")
    aux = [_write_png(item.aux_image, image_dir / f"{instance_id}_aux.png")] if item.aux_image is not None else []
    return Instance(id=instance_id, question=item.question, answer=item.answer, images=[image],
                    options=list(item.options), attributes=dict(item.attributes), aux_images=aux,
                    split=split, task=task)


def _write_png(pixels: np.ndarray, target: Path) -> str:
    # PIL's PNG encoder writes no timestamp, so identical pixels give identical bytes (determinism tests rely on it).
    atomic_write(target, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"))
    return str(target)


def _remove_previous_images(out_dir: Path) -> None:
    """Delete images a previous make_task run wrote here, so a smaller rerun leaves no stale files behind."""
    if not (out_dir / META_FILE).exists():
        raise LatentProbeError(f"{out_dir / DATA_FILE} was not written by make_task (no {META_FILE} beside it)",
                               "pick an empty out_dir; make_task will not overwrite other data")
    image_dir = (out_dir / IMAGE_DIR).resolve()
    for line in (out_dir / DATA_FILE).read_text(encoding="utf-8").splitlines():
        row = json.loads(line) if line.strip() else {}
        for relative in row.get("images", []) + row.get("aux_images", []):
            image = (out_dir / relative).resolve()
            if image.parent == image_dir and image.suffix == ".png":
                image.unlink(missing_ok=True)
