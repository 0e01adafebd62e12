"""The image-token readout that shows an attribute is readable from the image at all (the ``limited`` check).

The mean of all image tokens is a poor witness for a *local* attribute: the colour of one cell of a grid is one
token in sixteen of a tiny organism and one in hundreds of a 7B model, and averaging dilutes it towards the other
cells. A probe that cannot read the attribute from that mean says nothing about whether the image holds it, so
``limited`` (the latents hold too little) could never be affirmed for a local attribute. The readout here keeps
the image's layout: the tokens are average-pooled onto a coarse spatial grid (at most 4 x 4 cells) and the cells'
states concatenated, one feature block per cell, so a linear probe can weigh one region against another.

The spatial layout is known only from the token count: a square count (s x s merged tokens, square images) is
pooled in two dimensions; any other count in raster order, in contiguous runs. Every record is pooled onto the
same number of cells (the smallest any record allows), so records of different image sizes share one feature
space. Pooling bins follow ``torch.nn.functional.adaptive_avg_pool``: bin i of g over n covers
[floor(i n / g), ceil((i + 1) n / g)).
"""

from __future__ import annotations

from math import isqrt
from typing import Sequence

import numpy as np

from ..errors import LatentProbeError

MAX_SIDE = 4  # cells per side of the pooled grid: 16 cells at most


def _bins(n: int, cells: int) -> list[tuple[int, int]]:
    return [(i * n // cells, -(-(i + 1) * n // cells)) for i in range(cells)]


def _pool_1d(tokens: np.ndarray, cells: int) -> np.ndarray:
    return np.stack([tokens[a:b].mean(0) for a, b in _bins(len(tokens), cells)])


def _pool_2d(tokens: np.ndarray, side: int, cells_per_side: int) -> np.ndarray:
    grid = tokens.reshape(side, side, -1)
    return np.stack([grid[r0:r1, c0:c1].mean((0, 1)) for r0, r1 in _bins(side, cells_per_side)
                     for c0, c1 in _bins(side, cells_per_side)])


def pooling_plan(token_counts: Sequence[int], max_side: int = MAX_SIDE) -> tuple[str, int, str]:
    """The one grid every record is pooled onto: ``("2d", cells per side, phrase)`` when every count is a square,
    else ``("1d", runs, phrase)``; the phrase names the pooling for the probe's stated capacity.

    >>> pooling_plan([64, 256])
    ('2d', 4, 'image tokens pooled onto a 4 x 4 grid (16 cells)')
    >>> pooling_plan([6])
    ('1d', 6, 'image tokens pooled in raster order onto 6 runs (non-square token grid)')
    """
    counts = [int(c) for c in token_counts]
    if not counts or min(counts) < 1:
        raise LatentProbeError("no image tokens to pool", "trace with --image-states all")
    sides = [isqrt(c) for c in counts]
    if all(s * s == c for s, c in zip(sides, counts)):
        per_side = min(max_side, min(sides))
        return "2d", per_side, f"image tokens pooled onto a {per_side} x {per_side} grid ({per_side * per_side} cells)"
    runs = min(max_side * max_side, min(counts))
    return "1d", runs, f"image tokens pooled in raster order onto {runs} runs (non-square token grid)"


def pool_tokens(tokens: np.ndarray, plan: tuple[str, int, str]) -> np.ndarray:
    """One record's image tokens ``(T, D)`` pooled by ``plan`` and flattened to ``(cells * D,)``."""
    tokens = np.asarray(tokens, dtype=np.float64)
    if tokens.ndim != 2 or len(tokens) == 0:
        raise LatentProbeError(f"image tokens of shape {tokens.shape} are not (tokens, width)",
                               "trace again with --image-states all")
    kind, cells, _ = plan
    pooled = _pool_2d(tokens, isqrt(len(tokens)), cells) if kind == "2d" else _pool_1d(tokens, cells)
    return pooled.reshape(-1)


def pooled_image_tokens(per_record: Sequence[np.ndarray], max_side: int = MAX_SIDE) -> tuple[np.ndarray, str]:
    """Pool each record's image tokens ``(T_i, D)`` onto one shared coarse grid and concatenate the cells.

    Returns the ``(N, cells * D)`` features and a phrase naming the pooling (for the probe's stated capacity).

    >>> rng = np.random.default_rng(0)
    >>> features, how = pooled_image_tokens([rng.normal(size=(64, 3)) for _ in range(5)])
    >>> features.shape, how
    ((5, 48), 'image tokens pooled onto a 4 x 4 grid (16 cells)')
    >>> pooled_image_tokens([np.arange(12.0).reshape(6, 2)], max_side=2)[0]   # raster order, 4 runs of 1-2 tokens
    array([[ 1.,  2.,  3.,  4.,  7.,  8.,  9., 10.]])
    """
    if not len(per_record):
        raise LatentProbeError("no image tokens to pool", "trace with --image-states all")
    arrays = [np.asarray(t, dtype=np.float64) for t in per_record]
    if any(a.ndim != 2 for a in arrays) or len({a.shape[1] for a in arrays}) != 1:
        raise LatentProbeError("image tokens must be (tokens, width) arrays of one width",
                               "trace again with --image-states all")
    plan = pooling_plan([len(a) for a in arrays], max_side)
    return np.stack([pool_tokens(a, plan) for a in arrays]), plan[2]
