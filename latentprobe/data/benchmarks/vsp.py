"""VSP (Visual Spatial Planning), maze-navigation scenario: spatial planning and spatial reasoning.

Reads a local copy of the GitHub release ``UCSB-NLP-Chang/Visual-Spatial-Planning`` (pass the repository folder,
its ``VSP-main`` folder, or its ``maze`` folder). The maze scenario renders FrozenLake-style grids: a player, holes,
and a goal. Two of its task folders are read:

* ``maze/task-main`` -> task ``spatial_planning``: ``maps/level<N>/img/<i>.png`` (an N x N maze) with the map as
  text in ``maps/level<N>/table/<i>.txt`` (``| Row 1 | _ | # | @ |``: ``_`` land, ``#`` hole, ``@`` player,
  ``*`` goal), ``maps/level<N>/pure_text/<i>.txt`` ("The player is at: row 1, column 3; ...") or
  ``maps/level<N>/text/<i>.txt`` (rows of ``S``/``F``/``H``/``G``). ``answer`` holds one shortest safe plan
  (``"R,D,D"``), but a plan is scored by simulating it on the map (``attributes["answer_check"] = "plan_on_map"``,
  the map in ``attributes["map_rows"]``): any plan that reaches the goal without entering a hole is correct, as in
  VSP's ``maze/task-main/eval.py`` and Mirage's ``src/task.py``. ``levels`` keeps only some map sizes (Mirage is
  evaluated on 3-6); ``plan_rule`` picks between the two evaluations' one difference (see `simulate_plan`).
  Mirage's own copy of the planning maps (``imgs_test/level<N>/{img,pure_text,table}``, unpacked from its
  ``data/vsp_spatial_planning``) is read the same way.
* ``maze/task4`` -> task ``spatial_reasoning``: ``maps/level_step<K>/img/<i>.png`` with a K-move action sequence
  in ``question/<i>.txt`` (``"LUU"``) and the gold safety verdict in ``answer/<i>.txt`` (``Y``/``N``); where the
  answer file is absent the verdict is computed from the map in ``text/`` or ``table/``. Options are Yes / No.

The questions are short paraphrases of the benchmark's task statements (its full prompts interleave example
figures, which a subject's prompt builder can add). ``split`` selects ``spatial_planning`` or
``spatial_reasoning``. The blocks-world scenario and the maze perception tasks (task1-3) are not read.
"""

from __future__ import annotations

import re
from collections import deque
from pathlib import Path
from typing import Any, Iterable

from ..instances import Instance
from ...errors import LatentProbeError
from .common import IMAGE_SUFFIXES, SplitFilter, finish, first_existing, full, natural_key, require_path, wrong_format

NAME = "vsp"
TITLE = "VSP"
PLANNING, REASONING = "spatial_planning", "spatial_reasoning"
DOWNLOAD_HINT = ("clone the GitHub repository UCSB-NLP-Chang/Visual-Spatial-Planning and pass its folder "
                 "(the one holding maze/task-main and maze/task4)")
EXPECTED = ("a maze/ folder with task-main/maps/level<N>/ and task4/maps/level_step<K>/ sub-folders, or Mirage's "
            "imgs_test/ with level<N>/img/")
TABLE_SYMBOLS = {"_": "F", "#": "H", "@": "S", "*": "G"}
MOVES = {"U": (-1, 0), "D": (1, 0), "L": (0, -1), "R": (0, 1)}
MOVE_NAMES = {"U": "Up", "D": "Down", "L": "Left", "R": "Right"}
MOVE_WORDS = {"UP": "U", "DOWN": "D", "LEFT": "L", "RIGHT": "R"}
# "reach": VSP's eval.py runs gym's FrozenLake, whose episode ends on the goal (later moves are never read);
# "end": Mirage's simulate_vsp walks every move and succeeds only if the walk ends on the goal.
PLAN_RULES = ("reach", "end")
RULES = ("The image shows a grid maze with a player, holes and a goal. Each move (L left, R right, U up, D down) "
         "goes to the adjacent square; moving off the edge of the map leaves the player in place, and stepping "
         "into a hole loses the game.")
PLANNING_QUESTION = (RULES + " Give a sequence of moves that takes the player to the goal without stepping into a "
                     "hole, as comma-separated letters (for example: R,D,D).")
REASONING_QUESTION = (RULES + " The player follows this action sequence: {actions}. Is the action sequence safe, "
                      "that is, does the player never step into a hole?")


def looks_like(path: Path) -> bool:
    return path.is_dir() and _maze_folder(path) is not None


def load(folder: str | Path, limit: int | None = None, split: str | None = None,
         cache_dir: str | Path | None = None, levels: Iterable[int] | None = None,
         plan_rule: str = "reach") -> list[Instance]:
    """Load VSP maze spatial planning (task-main) and spatial reasoning (task4); ``cache_dir`` is unused.

    ``levels`` keeps only those planning map sizes (and reasoning step counts); ``plan_rule`` is how planning
    answers are scored ("reach": VSP's rule, the walk ends at the goal; "end": Mirage's, the plan must end there).
    """
    if plan_rule not in PLAN_RULES:
        raise LatentProbeError(f"{TITLE}: unknown plan rule {plan_rule!r}", f"use one of {', '.join(PLAN_RULES)}")
    wanted_levels = None if levels is None else {int(level) for level in levels}
    if wanted_levels is not None and (not wanted_levels or min(wanted_levels) < 1):
        raise LatentProbeError(f"{TITLE}: levels must be positive map sizes, got {sorted(wanted_levels)}",
                               "pass e.g. levels=[3, 4, 5, 6]")
    path = require_path(folder, TITLE, DOWNLOAD_HINT)
    maze = _maze_folder(path) if path.is_dir() else None
    if maze is None:
        raise wrong_format(TITLE, path, EXPECTED, DOWNLOAD_HINT, NAME)
    split_filter = SplitFilter(split)
    instances: list[Instance] = []
    for task, reader in ((PLANNING, _planning_instances), (REASONING, _reasoning_instances)):
        if not split_filter.keeps(task):
            continue
        for instance in reader(maze):
            if wanted_levels is not None and instance.attributes["level"] not in wanted_levels:
                continue
            if task == PLANNING:
                instance.attributes["plan_rule"] = plan_rule
            instances.append(instance)
            if full(instances, limit):
                return finish(instances, TITLE, path, split_filter)
    return finish(instances, TITLE, path, split_filter)


def _maze_folder(path: Path) -> Path | None:
    for candidate in (path, path / "maze", path / "VSP-main" / "maze"):
        if (candidate / "task-main" / "maps").is_dir() or (candidate / "task4" / "maps").is_dir():
            return candidate
    if _planning_maps(path) is not None:  # Mirage's release: imgs_test/level<N>/ (planning maps only)
        return path
    return None


def _planning_maps(maze: Path) -> Path | None:
    """VSP's ``task-main/maps``, or a folder of ``level<N>/img`` maps as Mirage ships them (``imgs_test``)."""
    for candidate in (maze / "task-main" / "maps", maze / "imgs_test", maze):
        if candidate.is_dir() and any((level / "img").is_dir() for _, level in _levels(candidate, "level")):
            return candidate
    return None


def _levels(maps: Path, prefix: str) -> list[tuple[int, Path]]:
    pattern = re.compile(rf"{prefix}(\d+)$")
    found = [(int(m.group(1)), d) for d in maps.iterdir() if d.is_dir() and (m := pattern.match(d.name))]
    return sorted(found)


def _images(level_dir: Path) -> list[Path]:
    image_dir = level_dir / "img" if (level_dir / "img").is_dir() else level_dir
    return sorted((p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.stem.isdigit()),
                  key=natural_key)


def _planning_instances(maze: Path):
    maps = _planning_maps(maze)
    if maps is None:
        return
    for level, level_dir in _levels(maps, "level"):
        for image in _images(level_dir):
            rows = _read_map(level_dir, image.stem)
            plan = shortest_plan(rows)
            if plan is None:
                raise LatentProbeError(f"{TITLE}: the maze of {image} has no safe path to the goal",
                                       "re-download the benchmark; its mazes are all solvable")
            yield Instance(
                id=f"{PLANNING}/level{level}/{image.stem}", question=PLANNING_QUESTION, answer=",".join(plan),
                images=[str(image)], options=None,
                attributes={"level": level, "shortest_plan_length": len(plan), **map_attributes(rows),
                            "answer_check": "plan_on_map"},
                split="test", task=PLANNING)


def _reasoning_instances(maze: Path):
    maps = maze / "task4" / "maps"
    if not maps.is_dir():
        return
    for steps, level_dir in _levels(maps, "level_step"):
        for image in _images(level_dir):
            question_file = level_dir / "question" / f"{image.stem}.txt"
            if not question_file.exists():
                raise LatentProbeError(f"{TITLE}: {question_file} (the action sequence for {image.name}) is missing",
                                       DOWNLOAD_HINT)
            actions = [a for a in question_file.read_text(encoding="utf-8").strip().upper() if a in MOVES]
            answer_file = level_dir / "answer" / f"{image.stem}.txt"
            rows = _read_map(level_dir, image.stem, required=not answer_file.exists())
            if answer_file.exists():
                safe = answer_file.read_text(encoding="utf-8").strip().upper().startswith("Y")
            else:
                safe = plan_is_safe(rows, actions)
            attributes: dict[str, Any] = {"level": steps, "action_sequence": "".join(actions)}
            if rows:
                attributes.update(map_attributes(rows))
            yield Instance(
                id=f"{REASONING}/step{steps}/{image.stem}",
                question=REASONING_QUESTION.format(actions=", ".join(MOVE_NAMES[a] for a in actions)),
                answer="Yes" if safe else "No", images=[str(image)], options=["Yes", "No"],
                attributes=attributes, split="test", task=REASONING)


def _read_map(level_dir: Path, stem: str, required: bool = True) -> list[str]:
    """The maze as rows of S/F/H/G letters, from ``text/``, ``table/`` or ``pure_text/<i>.txt``."""
    source = first_existing([level_dir / folder / f"{stem}.txt" for folder in ("text", "table", "pure_text")])
    if source is None:
        if required:
            raise LatentProbeError(f"{TITLE}: no map text for maze {stem} in {level_dir} (expected text/{stem}.txt, "
                                   f"table/{stem}.txt or pure_text/{stem}.txt)", DOWNLOAD_HINT)
        return []
    lines = [line.strip() for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    if source.parent.name == "pure_text":
        rows = _rows_from_description(source.read_text(encoding="utf-8"))
    elif source.parent.name == "table":
        rows = ["".join(TABLE_SYMBOLS.get(cell.strip(), "?") for cell in line.strip("|").split("|")[1:])
                for line in lines if line.lstrip("| ").lower().startswith("row")]
    else:
        rows = lines
    if not rows or any(len(r) != len(rows[0]) or set(r) - set("SFHG") for r in rows):
        raise LatentProbeError(f"{TITLE}: cannot read the maze in {source}", "re-download the benchmark")
    return rows


_SIZE = re.compile(r"(\d+)\s*x\s*(\d+) map", re.I)
_CELL = re.compile(r"row\s*(\d+)\s*,\s*column\s*(\d+)", re.I)


def _rows_from_description(text: str) -> list[str]:
    """Rows from VSP's ``pure_text`` description ("This is a 3x3 map. The player is at: row 1, column 3; The
    hole(s) are at: Row 1, Column 2; The goal is at: Row 1, Column 1.")."""
    size = _SIZE.search(text)
    if size is None:
        return []
    n_rows, n_cols = int(size.group(1)), int(size.group(2))
    grid = [["F"] * n_cols for _ in range(n_rows)]
    for sentence in re.split(r"(?=\bThe\b)", text):  # "The player ...", "The hole(s) ...", "The goal ..."
        symbol = "S" if "player" in sentence.lower() else "G" if "goal" in sentence.lower() else \
            "H" if "hole" in sentence.lower() else None
        if symbol is None:
            continue
        for row, col in _CELL.findall(sentence):
            if 1 <= int(row) <= n_rows and 1 <= int(col) <= n_cols:
                grid[int(row) - 1][int(col) - 1] = symbol
    return ["".join(row) for row in grid]


def _find(rows: list[str], symbol: str) -> list[tuple[int, int]]:
    return [(r, c) for r, row in enumerate(rows) for c, cell in enumerate(row) if cell == symbol]


def map_attributes(rows: list[str]) -> dict[str, Any]:
    """Ground truth for probes: grid size and 1-based (row, column) of the player, goal and holes."""
    def one_based(cells):
        return [[r + 1, c + 1] for r, c in cells]

    return {"map_rows": rows, "grid_size": len(rows), "player": one_based(_find(rows, "S"))[0],
            "goal": one_based(_find(rows, "G"))[0], "holes": one_based(_find(rows, "H"))}


def _step(rows: list[str], position: tuple[int, int], move: str) -> tuple[int, int]:
    dr, dc = MOVES[move]
    r, c = position[0] + dr, position[1] + dc
    return (r, c) if 0 <= r < len(rows) and 0 <= c < len(rows[0]) else position


def shortest_plan(rows: list[str]) -> list[str] | None:
    """A shortest move list from the player to the goal that never enters a hole (breadth-first search)."""
    start, goal = _find(rows, "S")[0], _find(rows, "G")[0]
    previous: dict[tuple[int, int], tuple[tuple[int, int], str] | None] = {start: None}
    queue = deque([start])
    while queue:
        position = queue.popleft()
        if position == goal:
            plan: list[str] = []
            while previous[position] is not None:
                position, move = previous[position]
                plan.append(move)
            return plan[::-1]
        for move in MOVES:
            nxt = _step(rows, position, move)
            if nxt not in previous and rows[nxt[0]][nxt[1]] != "H":
                previous[nxt] = (position, move)
                queue.append(nxt)
    return None


def plan_is_safe(rows: list[str], actions: list[str]) -> bool:
    """Whether following ``actions`` never enters a hole (reaching the goal ends the episode, as in FrozenLake)."""
    position = _find(rows, "S")[0]
    for move in actions:
        position = _step(rows, position, move)
        cell = rows[position[0]][position[1]]
        if cell == "H":
            return False
        if cell == "G":
            return True
    return True


# ------------------------------------------------------------------------------------------- plan scoring

def parse_plan(text: str) -> list[str] | None:
    """The moves a stated plan lists, tolerant of the formats models write; None when it lists none.

    Words are read case-insensitively: ``L``/``R``/``U``/``D``, ``Left``/``Right``/``Up``/``Down``, or runs of move
    letters (``RDD``); separators (commas, spaces, arrows, quotes, periods) do not matter and other words are
    skipped. Mirage's own rule keeps every U/D/L/R letter anywhere in the box, so it reads "I don't know" as "D";
    here such a box states no plan (unparsable), which scores the same.

    >>> parse_plan("R, D, D"), parse_plan("'Right', 'Down'"), parse_plan("RDD."), parse_plan("no idea")
    (['R', 'D', 'D'], ['R', 'D'], ['R', 'D', 'D'], None)
    """
    moves: list[str] = []
    for word in re.findall(r"[A-Za-z]+", str(text)):
        word = word.upper()
        if word in MOVE_WORDS:
            moves.append(MOVE_WORDS[word])
        elif set(word) <= set(MOVES):
            moves.extend(word)
    return moves or None


def simulate_plan(rows: list[str], moves: list[str], rule: str = "reach") -> str:
    """Walk ``moves`` on the FrozenLake map ``rows``: "goal", "hole" or "not_reached".

    Moving off the map leaves the player in place and entering a hole ends the walk, in both evaluations. Under
    ``rule="reach"`` (VSP, via gym's FrozenLake) reaching the goal ends the walk too; under ``rule="end"``
    (Mirage's ``simulate_vsp``) every move is walked and only a walk that ends on the goal succeeds.

    >>> rows = ["SFH", "FFF", "HFG"]
    >>> simulate_plan(rows, list("DRDR")), simulate_plan(rows, list("RR")), simulate_plan(rows, list("UL"))
    ('goal', 'hole', 'not_reached')
    >>> simulate_plan(rows, list("RDRDU")), simulate_plan(rows, list("RDRDU"), rule="end")
    ('goal', 'not_reached')
    """
    if rule not in PLAN_RULES:
        raise LatentProbeError(f"unknown plan rule {rule!r}", f"use one of {', '.join(PLAN_RULES)}")
    starts = _find(rows, "S")
    if not starts:
        raise LatentProbeError("the map has no start square (S)", "check the map rows of this instance")
    position = starts[0]
    for move in moves:
        position = _step(rows, position, move)
        cell = rows[position[0]][position[1]]
        if cell == "H":
            return "hole"
        if cell == "G" and rule == "reach":
            return "goal"
    return "goal" if rows[position[0]][position[1]] == "G" else "not_reached"


def judge_plan(parsed: str, instance: Instance) -> bool | None:
    """Whether the plan stated in ``parsed`` solves the instance's map (None: no plan stated)."""
    moves = parse_plan(parsed)
    if moves is None:
        return None
    rows = instance.attributes.get("map_rows")
    if not rows:
        raise LatentProbeError(f"instance {instance.id} is scored by its map but has no attributes['map_rows']",
                               "load VSP planning instances with the vsp loader, which records the map")
    return simulate_plan(rows, moves, instance.attributes.get("plan_rule", "reach")) == "goal"


def canonical_plan(parsed: str, instance: Instance) -> str | None:
    """The plan as comma-separated move letters, for comparing answers across runs."""
    moves = parse_plan(parsed)
    return ",".join(moves) if moves else None
