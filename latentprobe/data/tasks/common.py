"""Shared pieces of the procedural tasks: the palette, the generated-instance record, balanced labels, dedup.

Images are small on purpose: the organisms are tiny Qwen2.5-VL models (patch 14 px, 2x2 spatial merge) trained
on CPU, so every layout here lines its cells up with 14-px patches and uses a handful of saturated colours.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from ...errors import LatentProbeError

PATCH_SIZE = 14  # Qwen2.5-VL vision patch; cells are whole multiples of it so no patch straddles two cells

# Few, far-apart colours a tiny vision tower separates easily; names are single common words (one token each).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 200, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
}
COLOUR_NAMES: tuple[str, ...] = tuple(PALETTE)
BLACK = (0, 0, 0)

SPLITS = ("train", "test")


@dataclass
class GeneratedInstance:
    """One generated question with its pixels still in memory; `make_task` turns it into an `Instance` on disk.

    `image` and `aux_image` are uint8 arrays of shape (height, width, 3); `aux_image` is the picture the model
    should imagine (the transformed grid, the drawn path) or None when the task has none.
    """

    question: str
    answer: str
    options: list[str]
    attributes: dict[str, Any]
    image: np.ndarray
    aux_image: np.ndarray | None = None

    def dedup_key(self) -> str:
        """Identity of the (image, question) pair; two instances with the same key are the same item."""
        digest = hashlib.sha256()
        digest.update(str(self.image.shape).encode())
        digest.update(np.ascontiguousarray(self.image).tobytes())
        digest.update(self.question.encode())
        return digest.hexdigest()


def split_rng(seed: int, split: str) -> np.random.Generator:
    """A generator for one split: the same seed gives the same data, and train/test never share a stream."""
    if split not in SPLITS:
        raise LatentProbeError(f"unknown split {split!r}", f"use one of {', '.join(SPLITS)}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise LatentProbeError(f"seed must be a non-negative integer, got {seed!r}", "pass e.g. seed=0")
    return np.random.default_rng([int(seed), SPLITS.index(split)])


def balanced_choices(values: Sequence[Any], n: int, rng: np.random.Generator) -> list[Any]:
    """`n` picks from `values`, each value used floor(n/k) or ceil(n/k) times, in random order.

    Exact balance (rather than independent draws) keeps chance accuracy at 1/k even for small test splits.

    >>> sorted(balanced_choices(["yes", "no"], 4, np.random.default_rng(0)))
    ['no', 'no', 'yes', 'yes']
    """
    values = list(values)
    if n <= 0:
        return []
    # Shuffle the order of values first so the leftover (n % k) picks are not always the first values.
    order = [values[i] for i in rng.permutation(len(values))]
    picks = [order[i % len(order)] for i in range(n)]
    return [picks[i] for i in rng.permutation(n)]


def balanced_within_groups(groups: Sequence[Any], values_for: dict[Any, Sequence[Any]],
                           rng: np.random.Generator) -> list[Any]:
    """Per slot, a value balanced among the slots of the same group (e.g. gold labels within one question type).

    >>> balanced_within_groups(["a", "b", "a"], {"a": [0, 1], "b": [7]}, np.random.default_rng(0))[1]
    7
    """
    picks: list[Any] = [None] * len(groups)
    for group, values in values_for.items():
        slots = [i for i, g in enumerate(groups) if g == group]
        for slot, value in zip(slots, balanced_choices(values, len(slots), rng)):
            picks[slot] = value
    return picks


def collect_unique(
    n: int,
    draw: Callable[[int], GeneratedInstance],
    exclude: frozenset[str] | set[str] = frozenset(),
    task: str = "",
    max_tries_per_item: int = 200,
) -> list[GeneratedInstance]:
    """Call `draw(i)` until `n` instances with distinct (image, question) pairs, none in `exclude`, are found.

    `draw` gets the slot index so balanced targets assigned per slot survive a redraw.
    """
    seen = set(exclude)
    found: list[GeneratedInstance] = []
    for slot in range(n):
        for _ in range(max_tries_per_item):
            candidate = draw(slot)
            key = candidate.dedup_key()
            if key not in seen:
                seen.add(key)
                found.append(candidate)
                break
        else:
            raise LatentProbeError(
                f"task {task!r}: found only {len(found)} distinct (image, question) pairs out of {n} requested",
                "ask for fewer instances or enlarge the task (bigger grid_size / image_size, more moves)",
            )
    return found


def check_grid_layout(image_size: int, grid_size: int, task: str) -> int:
    """Return the cell side in pixels, or explain which sizes keep cells aligned with 14-px patches."""
    if grid_size < 2:
        raise LatentProbeError(f"task {task!r}: grid_size must be at least 2, got {grid_size}",
                               "use grid_size=2, 3 or 4")
    if image_size % grid_size or (image_size // grid_size) % PATCH_SIZE:
        fits = [g for g in range(2, 9) if image_size % g == 0 and (image_size // g) % PATCH_SIZE == 0]
        hint = (f"with image_size={image_size} use grid_size in {fits}" if fits
                else f"use an image_size that is a multiple of {PATCH_SIZE * grid_size}")
        raise LatentProbeError(
            f"task {task!r}: a {grid_size}x{grid_size} grid in {image_size} px gives cells that are not whole "
            f"{PATCH_SIZE}-px patches", hint)
    return image_size // grid_size


def paint_cell(canvas: np.ndarray, row: int, col: int, cell_px: int, rgb: tuple[int, int, int], inset: int = 0) -> None:
    """Fill one grid cell (optionally shrunk by `inset` px on every side) with a colour, in place."""
    top, left = row * cell_px + inset, col * cell_px + inset
    canvas[top:top + cell_px - 2 * inset, left:left + cell_px - 2 * inset] = rgb


def cell_name(index: int, grid_size: int) -> str:
    """Plain-words name of a cell (row-major index): corners for 2x2, 'row R column C' (1-based) otherwise.

    >>> cell_name(1, 2), cell_name(5, 4)
    ('top-right', 'row 2 column 2')
    """
    row, col = divmod(index, grid_size)
    if grid_size == 2:
        return f"{('top', 'bottom')[row]}-{('left', 'right')[col]}"
    return f"row {row + 1} column {col + 1}"
