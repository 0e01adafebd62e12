"""`digits`: questions about two real handwritten digits (scikit-learn's bundled `load_digits`, no download).

Each 8x8 scan is upscaled to half the canvas width and the two are placed side by side. Train and test draw
from disjoint sets of scans, fixed independently of the seed, so no test image was ever seen in training.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np
from PIL import Image

from ...errors import LatentProbeError
from .common import PATCH_SIZE, GeneratedInstance, balanced_choices, balanced_within_groups, collect_unique, split_rng

VERSION = 1
QUESTION_TYPES = ("sum", "larger")
N_SUM_OPTIONS = 4
MAX_SUM = 18
QUESTIONS = {
    "sum": "What is the sum of the two digits?",
    "larger": "Is the left digit larger than the right digit?",
}
TEST_POOL_EVERY = 4  # every 4th scan is held out for test: a fixed rule, the same for every seed


@lru_cache(maxsize=1)
def _scans() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(int)


def scan_pool(split: str) -> dict[int, np.ndarray]:
    """For each digit 0-9, the indices (into `load_digits`) of the scans this split may use.

    >>> bool(set(scan_pool("train")[3]) & set(scan_pool("test")[3]))
    False
    """
    _, labels = _scans()
    indices = np.arange(len(labels))
    held_out = indices % TEST_POOL_EVERY == TEST_POOL_EVERY - 1
    chosen = indices[held_out] if split == "test" else indices[~held_out]
    return {digit: chosen[labels[chosen] == digit] for digit in range(10)}


def render_pair(left_index: int, right_index: int, image_size: int = 56) -> np.ndarray:
    """White-on-black digits side by side on a square canvas, each upscaled to `image_size // 2` px.

    >>> render_pair(0, 1).shape
    (56, 56, 3)
    """
    if image_size % (2 * PATCH_SIZE):
        raise LatentProbeError(f"digits task: image_size {image_size} is not a multiple of {2 * PATCH_SIZE}",
                               f"use e.g. image_size={4 * PATCH_SIZE} so each digit covers whole "
                               f"{PATCH_SIZE}-px patches")
    scans, _ = _scans()
    digit_px = image_size // 2
    top = (image_size - digit_px) // 2 // PATCH_SIZE * PATCH_SIZE  # centred, but on a patch boundary
    canvas = np.zeros((image_size, image_size, 3), dtype=np.uint8)
    for slot, index in enumerate((left_index, right_index)):
        ink = Image.fromarray(np.round(scans[index] * (255 / 16)).astype(np.uint8))
        ink = np.asarray(ink.resize((digit_px, digit_px), Image.Resampling.BILINEAR))
        canvas[top:top + digit_px, slot * digit_px:(slot + 1) * digit_px] = ink[..., None]
    return canvas


def generate(
    n: int,
    seed: int,
    image_size: int = 56,
    *,
    question_types: Sequence[str] = QUESTION_TYPES,
    split: str = "train",
    exclude: frozenset[str] | set[str] = frozenset(),
) -> list[GeneratedInstance]:
    """`n` digit-pair questions. `sum` offers 4 consecutive numbers with the gold at a balanced position (so the
    options alone give exactly 1/4); `larger` is yes/no, balanced, never with equal digits.

    >>> items = generate(4, seed=0)
    >>> items[0].image.shape, items[0].attributes["imagination"].startswith("left ")
    ((56, 56, 3), True)
    """
    unknown = sorted(set(question_types) - set(QUESTION_TYPES))
    if unknown or not question_types:
        raise LatentProbeError(f"digits task: unknown or empty question types {unknown or list(question_types)}",
                               f"choose from {', '.join(QUESTION_TYPES)}")
    rng = split_rng(seed, split)
    pool = scan_pool(split)
    render_pair(int(pool[0][0]), int(pool[0][0]), image_size)  # fail on a bad size before any work
    type_per_slot = balanced_choices(question_types, n, rng)
    # Per slot: the gold option position for `sum`, whether left > right for `larger`; balanced within each type.
    target_per_slot = balanced_within_groups(type_per_slot, {"sum": range(N_SUM_OPTIONS), "larger": (True, False)}, rng)

    def draw(slot: int) -> GeneratedInstance:
        question_type = type_per_slot[slot]
        if question_type == "sum":
            position = target_per_slot[slot]
            lowest = int(rng.integers(0, MAX_SUM - N_SUM_OPTIONS + 2))  # window [lowest, lowest+3] within 0..18
            total = lowest + position
            left = int(rng.integers(max(0, total - 9), min(9, total) + 1))
            right = total - left
            options = [str(lowest + i) for i in range(N_SUM_OPTIONS)]
            answer = str(total)
        else:
            small, large = sorted(int(d) for d in rng.choice(10, size=2, replace=False))
            left, right = (large, small) if target_per_slot[slot] else (small, large)
            options = ["yes", "no"]
            answer = "yes" if left > right else "no"
        left_index, right_index = (int(rng.choice(pool[d])) for d in (left, right))
        attributes = {
            "question_type": question_type,
            "left_digit": left,
            "right_digit": right,
            "sum": left + right,
            "left_scan_index": left_index,
            "right_scan_index": right_index,
            "imagination": f"left {left}, right {right}",
            "answer": answer,
        }
        return GeneratedInstance(question=QUESTIONS[question_type], answer=answer, options=options,
                                 attributes=attributes, image=render_pair(left_index, right_index, image_size))

    return collect_unique(n, draw, exclude, task="digits")
