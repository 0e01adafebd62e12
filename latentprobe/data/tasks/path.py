"""`path`: path planning on a small grid map, in the spirit of VSP (Mirage's spatial-planning benchmark).

The map shows a blue start, a green goal, red holes and black floor. The question gives a move sequence and asks
whether the agent reaches the goal (yes/no) or what it ends on (goal/hole/floor). Stepping on a hole ends the walk.
The auxiliary image is the map with the walked cells marked yellow, as Mirage draws the route on the map.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ...errors import LatentProbeError
from .common import (BLACK, PALETTE, GeneratedInstance, balanced_choices, balanced_within_groups, check_grid_layout,
                     collect_unique, paint_cell, split_rng)

VERSION = 1
QUESTION_TYPES = ("reach", "end")
OPTIONS = {"reach": ["yes", "no"], "end": ["goal", "hole", "floor"]}
MOVES = {"U": (-1, 0), "D": (1, 0), "L": (0, -1), "R": (0, 1)}
KIND_COLOURS = {"floor": BLACK, "start": PALETTE["blue"], "goal": PALETTE["green"], "hole": PALETTE["red"]}
PATH_COLOUR = PALETTE["yellow"]


def walk(start: int, moves: str, grid_size: int, holes: Sequence[int]) -> list[int]:
    """Cells visited (row-major indices, start included) following `moves`, stopping on the first hole.

    >>> walk(0, "RD", 3, holes=[4])
    [0, 1, 4]
    """
    row, col = divmod(start, grid_size)
    visited = [start]
    for move in moves:
        d_row, d_col = MOVES[move]
        row, col = row + d_row, col + d_col
        if not (0 <= row < grid_size and 0 <= col < grid_size):
            raise LatentProbeError(f"move sequence {moves!r} leaves the {grid_size}x{grid_size} map",
                                   "use moves that stay on the map")
        visited.append(row * grid_size + col)
        if visited[-1] in holes:
            break
    return visited


def render_map(grid_size: int, start: int, goal: int, holes: Sequence[int], image_size: int = 56,
               path: Sequence[int] = ()) -> np.ndarray:
    """Draw the map; cells in `path` after the start get a yellow centre (the cell's own colour stays as a rim).

    >>> render_map(4, start=0, goal=15, holes=[5], path=[0, 1]).shape
    (56, 56, 3)
    """
    cell_px = check_grid_layout(image_size, grid_size, "path")
    canvas = np.zeros((image_size, image_size, 3), dtype=np.uint8)
    kinds = cell_kinds(grid_size, start, goal, holes)
    for index, kind in enumerate(kinds):
        paint_cell(canvas, *divmod(index, grid_size), cell_px, KIND_COLOURS[kind])
    for index in path[1:]:
        paint_cell(canvas, *divmod(index, grid_size), cell_px, PATH_COLOUR, inset=max(1, cell_px // 4))
    return canvas


def cell_kinds(grid_size: int, start: int, goal: int, holes: Sequence[int]) -> list[str]:
    kinds = ["floor"] * (grid_size * grid_size)
    for hole in holes:
        kinds[hole] = "hole"
    kinds[start], kinds[goal] = "start", "goal"
    return kinds


def _coords(index: int, grid_size: int) -> str:
    row, col = divmod(index, grid_size)
    return f"({row + 1},{col + 1})"


def _random_walk(rng: np.random.Generator, grid_size: int, n_moves: int) -> tuple[list[int], str]:
    """A self-avoiding walk, so 'cells visited' is unambiguous and the goal is met only where intended."""
    while True:
        cells = [int(rng.integers(grid_size * grid_size))]
        moves = ""
        for _ in range(n_moves):
            row, col = divmod(cells[-1], grid_size)
            options = [(name, (row + dr) * grid_size + col + dc) for name, (dr, dc) in MOVES.items()
                       if 0 <= row + dr < grid_size and 0 <= col + dc < grid_size
                       and (row + dr) * grid_size + col + dc not in cells]
            if not options:
                break
            name, cell = options[int(rng.integers(len(options)))]
            moves += name
            cells.append(cell)
        if len(moves) == n_moves:
            return cells, moves


def _pick(rng: np.random.Generator, n_cells: int, forbidden: set[int], k: int) -> list[int]:
    free = [c for c in range(n_cells) if c not in forbidden]
    return sorted(int(c) for c in rng.choice(free, size=k, replace=False))


def _place(rng: np.random.Generator, route: list[int], outcome: str, grid_size: int, n_holes: int):
    """Put goal and holes around a fixed route so that walking it ends in `outcome`."""
    n_cells = grid_size * grid_size
    if outcome == "goal":
        goal = route[-1]
        holes = _pick(rng, n_cells, set(route), n_holes)
    elif outcome == "floor":
        goal = _pick(rng, n_cells, set(route), 1)[0]
        holes = _pick(rng, n_cells, set(route) | {goal}, n_holes)
    else:  # hole: fall at a random step; later route cells may hold the goal or holes as distractors
        fall_step = int(rng.integers(1, len(route)))
        goal = _pick(rng, n_cells, set(route[:fall_step + 1]), 1)[0]
        others = _pick(rng, n_cells, set(route[:fall_step + 1]) | {goal}, n_holes - 1)
        holes = sorted(others + [route[fall_step]])
    return goal, holes


def _question(question_type: str, moves: str) -> str:
    setup = (f"The agent starts on the blue cell and moves {','.join(moves)} (U up, D down, L left, R right); "
             "stepping on a red hole ends the walk.")
    if question_type == "reach":
        return f"{setup} Does it reach the green goal?"
    return f"{setup} What does the walk end on?"


def generate(
    n: int,
    seed: int,
    image_size: int = 56,
    *,
    grid_size: int = 4,
    n_moves: int = 3,
    n_holes: int = 2,
    question_types: Sequence[str] = QUESTION_TYPES,
    split: str = "train",
    exclude: frozenset[str] | set[str] = frozenset(),
) -> list[GeneratedInstance]:
    """`n` path questions; question types and outcomes are balanced (reach: half yes; end: thirds).

    >>> items = generate(4, seed=0)
    >>> sorted(item.answer for item in items if item.attributes["question_type"] == "reach")
    ['no', 'yes']
    """
    unknown = sorted(set(question_types) - set(QUESTION_TYPES))
    if unknown or not question_types:
        raise LatentProbeError(f"path task: unknown or empty question types {unknown or list(question_types)}",
                               f"choose from {', '.join(QUESTION_TYPES)}")
    check_grid_layout(image_size, grid_size, "path")
    if n_moves < 1 or n_holes < 1:
        raise LatentProbeError("path task: n_moves and n_holes must be at least 1", "pass e.g. n_moves=3, n_holes=2")
    if grid_size * grid_size < n_moves + 2 + n_holes:
        raise LatentProbeError(
            f"path task: a {grid_size}x{grid_size} map cannot hold a {n_moves}-move route, a goal and {n_holes} holes",
            "use a bigger grid_size or fewer moves/holes")
    rng = split_rng(seed, split)
    type_per_slot = balanced_choices(question_types, n, rng)
    # Balance the gold answer within each question type, then split reach's "no" evenly into hole and floor.
    answer_per_slot = balanced_within_groups(type_per_slot, OPTIONS, rng)
    missed = ["missed" if (t, a) == ("reach", "no") else "" for t, a in zip(type_per_slot, answer_per_slot)]
    miss_outcome = balanced_within_groups(missed, {"missed": ("hole", "floor")}, rng)
    outcome_per_slot = [{"yes": "goal", "no": miss}.get(answer, answer)
                        for answer, miss in zip(answer_per_slot, miss_outcome)]

    def draw(slot: int) -> GeneratedInstance:
        question_type, outcome = type_per_slot[slot], outcome_per_slot[slot]
        route, moves = _random_walk(rng, grid_size, n_moves)
        goal, holes = _place(rng, route, outcome, grid_size, n_holes)
        visited = walk(route[0], moves, grid_size, holes)
        answer = ("yes" if outcome == "goal" else "no") if question_type == "reach" else outcome
        attributes = {
            "question_type": question_type,
            "grid_size": grid_size,
            "moves": moves,
            "start_cell": route[0],
            "goal_cell": goal,
            "hole_cells": holes,
            "visited_cells": visited,
            "end_cell": visited[-1],
            "outcome": outcome,
            **{f"cell_{i}_kind": kind for i, kind in enumerate(cell_kinds(grid_size, route[0], goal, holes))},
            "imagination": f"visits {' '.join(_coords(c, grid_size) for c in visited)}; ends on {outcome}",
            "answer": answer,
        }
        return GeneratedInstance(
            question=_question(question_type, moves),
            answer=answer,
            options=list(OPTIONS[question_type]),
            attributes=attributes,
            image=render_map(grid_size, route[0], goal, holes, image_size),
            aux_image=render_map(grid_size, route[0], goal, holes, image_size, path=visited),
        )

    return collect_unique(n, draw, exclude, task="path")
