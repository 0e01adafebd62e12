"""`transform`: mental transformation of a colour grid, as in Mirage's auxiliary-image tasks.

The image is a grid of coloured blocks; the question asks for a cell's colour *after* an imagined flip, rotation
or swap. The auxiliary image is the transformed grid, i.e. exactly what the model should imagine, and
`attributes["imagination"]` says the same thing in words for a text-mediated (CapImagine-style) organism.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ...errors import LatentProbeError
from .common import (COLOUR_NAMES, PALETTE, GeneratedInstance, balanced_choices, cell_name, check_grid_layout,
                     collect_unique, paint_cell, split_rng)

VERSION = 1
TRANSFORMS = ("flip_horizontal", "flip_vertical", "rotate_90", "rotate_180", "swap")
QUESTION_TYPE = "colour_after_transform"


def apply_transform(grid: np.ndarray, transform: str, swap_cells: Sequence[int] = ()) -> np.ndarray:
    """The grid as it looks after `transform` (rotations are clockwise; `swap` exchanges two row-major cells).

    >>> apply_transform(np.array([[0, 1], [2, 3]]), "rotate_90").tolist()
    [[2, 0], [3, 1]]
    """
    if transform == "flip_horizontal":
        return np.fliplr(grid).copy()
    if transform == "flip_vertical":
        return np.flipud(grid).copy()
    if transform == "rotate_90":
        return np.rot90(grid, k=-1).copy()  # numpy's positive k turns counter-clockwise
    if transform == "rotate_180":
        return np.rot90(grid, k=2).copy()
    if transform == "swap":
        first, second = swap_cells
        out = grid.copy()
        out.flat[first], out.flat[second] = grid.flat[second], grid.flat[first]
        return out
    raise LatentProbeError(f"unknown transform {transform!r}", f"use one of {', '.join(TRANSFORMS)}")


def render_grid(colours: Sequence[Sequence[str]] | np.ndarray, image_size: int = 56) -> np.ndarray:
    """Draw a square grid of colour names as full-cell blocks; returns a uint8 (size, size, 3) array.

    >>> render_grid([["red", "blue"], ["green", "yellow"]]).shape
    (56, 56, 3)
    """
    colours = np.asarray(colours)
    grid_size = colours.shape[0]
    cell_px = check_grid_layout(image_size, grid_size, "transform")
    canvas = np.zeros((image_size, image_size, 3), dtype=np.uint8)
    for row in range(grid_size):
        for col in range(grid_size):
            paint_cell(canvas, row, col, cell_px, PALETTE[str(colours[row, col])])
    return canvas


def describe_grid(colours: np.ndarray) -> str:
    """The imagination text: every cell's name and colour in reading order."""
    grid_size = colours.shape[0]
    return ", ".join(f"{cell_name(i, grid_size)} {colour}" for i, colour in enumerate(colours.flat))


def _question(transform: str, query: int, grid_size: int, swap_cells: Sequence[int]) -> str:
    action = {
        "flip_horizontal": "flipping the image horizontally (left and right swap)",
        "flip_vertical": "flipping the image vertically (top and bottom swap)",
        "rotate_90": "rotating the image 90 degrees clockwise",
        "rotate_180": "rotating the image 180 degrees",
    }.get(transform)
    if transform == "swap":
        action = f"swapping the {cell_name(swap_cells[0], grid_size)} and {cell_name(swap_cells[1], grid_size)} cells"
    return f"After {action}, what colour is the {cell_name(query, grid_size)} cell?"


def generate(
    n: int,
    seed: int,
    image_size: int = 56,
    *,
    grid_size: int = 2,
    transforms: Sequence[str] = TRANSFORMS,
    split: str = "train",
    exclude: frozenset[str] | set[str] = frozenset(),
) -> list[GeneratedInstance]:
    """`n` transform questions; transforms and gold colours are exactly balanced, options are the 4 colours.

    `exclude` holds dedup keys (see `GeneratedInstance.dedup_key`) that must not be produced, e.g. the train split's.

    >>> items = generate(8, seed=0)
    >>> items[0].options, items[0].image.shape, items[0].aux_image.shape
    (['red', 'green', 'blue', 'yellow'], (56, 56, 3), (56, 56, 3))
    """
    unknown = sorted(set(transforms) - set(TRANSFORMS))
    if unknown or not transforms:
        raise LatentProbeError(f"transform task: unknown or empty transforms {unknown or list(transforms)}",
                               f"choose from {', '.join(TRANSFORMS)}")
    check_grid_layout(image_size, grid_size, "transform")
    rng = split_rng(seed, split)
    transform_per_slot = balanced_choices(transforms, n, rng)
    answer_per_slot = balanced_choices(COLOUR_NAMES, n, rng)
    n_cells = grid_size * grid_size

    def draw(slot: int) -> GeneratedInstance:
        transform, gold = transform_per_slot[slot], answer_per_slot[slot]
        colours = np.array(COLOUR_NAMES, dtype=object)[rng.integers(0, len(COLOUR_NAMES), size=(grid_size, grid_size))]
        swap_cells: tuple[int, ...] = ()
        if transform == "swap":
            swap_cells = tuple(sorted(int(c) for c in rng.choice(n_cells, size=2, replace=False)))
            query = swap_cells[int(rng.integers(2))]  # ask about a moved cell, else the swap is irrelevant
        else:
            query = int(rng.integers(n_cells))
        # Force the gold colour by painting the cell that the transform carries onto the queried position.
        source_of = apply_transform(np.arange(n_cells).reshape(grid_size, grid_size), transform, swap_cells)
        colours.flat[source_of.flat[query]] = gold
        transformed = apply_transform(colours, transform, swap_cells)
        attributes = {
            "question_type": QUESTION_TYPE,
            "grid_size": grid_size,
            "transform": transform,
            "query_cell": query,
            **{f"cell_{i}_colour": str(c) for i, c in enumerate(colours.flat)},
            **{f"count_{name}": int((colours == name).sum()) for name in COLOUR_NAMES},
            **{f"transformed_cell_{i}_colour": str(c) for i, c in enumerate(transformed.flat)},
            "imagination": describe_grid(transformed),
            "answer": gold,
        }
        if swap_cells:
            attributes["swap_cells"] = list(swap_cells)
        return GeneratedInstance(
            question=_question(transform, query, grid_size, swap_cells),
            answer=gold,
            options=list(COLOUR_NAMES),
            attributes=attributes,
            image=render_grid(colours, image_size),
            aux_image=render_grid(transformed, image_size),
        )

    return collect_unique(n, draw, exclude, task="transform")
