"""Procedural tasks: deterministic, clean splits, balanced labels, and answers that an independent check agrees with.

The checks read the ground truth back from the decoded PNGs and recompute answers with their own code (explicit
index formulas, a fresh walk), so a bug shared by generator and renderer cannot hide.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from latentprobe.data import load_images, load_jsonl
from latentprobe.errors import LatentProbeError
from latentprobe.data.tasks import COLOUR_NAMES, PALETTE, TASKS, chance_accuracy, make_task
from latentprobe.data.tasks import digits, path, transform

N = 96
SEED = 7


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, list]:
    """Each task written once (n=N) and read back through the public loader."""
    out = {}
    for name in TASKS:
        data = make_task(name, n=N, seed=SEED, out_dir=tmp_path_factory.mktemp(name))
        out[name] = load_jsonl(data)
    return out


def pixels(image_path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(image_path) as img:
        assert img.mode == "RGB"
        return np.asarray(img)


def colour_at(image: np.ndarray, row: int, col: int, cell_px: int) -> tuple[int, ...]:
    return tuple(int(v) for v in image[row * cell_px + cell_px // 2, col * cell_px + cell_px // 2])


def colour_name(rgb: tuple[int, ...]) -> str:
    names = [name for name, value in PALETTE.items() if tuple(value) == rgb]
    assert names, f"pixel {rgb} is not a palette colour"
    return names[0]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("name", sorted(TASKS))
def test_same_seed_gives_byte_identical_files(name, tmp_path):
    first = make_task(name, n=16, seed=3, out_dir=tmp_path / "a").parent
    second = make_task(name, n=16, seed=3, out_dir=tmp_path / "b").parent
    other_seed = make_task(name, n=16, seed=4, out_dir=tmp_path / "c").parent
    assert folder_bytes(first) == folder_bytes(second)
    assert (first / "data.jsonl").read_bytes() != (other_seed / "data.jsonl").read_bytes()
    meta = json.loads((first / "task.json").read_text())
    assert (meta["task"], meta["n"], meta["seed"], meta["image_size"]) == (name, 16, 3, 56)
    assert meta["n_train"] + meta["n_test"] == 16 and meta["n_test"] == 4 and meta["generator_version"] >= 1


# ---------------------------------------------------------------------------------------------- splits and files


@pytest.mark.parametrize("name", sorted(TASKS))
def test_splits_are_disjoint_and_files_are_sound(made, name):
    instances = made[name]
    assert len(instances) == N and len({i.id for i in instances}) == N
    assert Counter(i.split for i in instances) == {"train": N - N // 4, "test": N // 4}
    assert all(i.task == name for i in instances)

    pair_keys = {"train": set(), "test": set()}
    for inst in instances:
        (image,) = load_images(inst)
        assert image.size == (56, 56)
        for aux in load_images(inst, "aux_images"):
            assert aux.size == (56, 56)
        assert inst.answer in inst.options and len(set(inst.options)) == len(inst.options)
        assert all(" " not in option for option in inst.options)  # one word or number each
        assert inst.attributes["answer"] == inst.answer and inst.attributes["imagination"]
        key = (hashlib.sha256(Path(inst.images[0]).read_bytes()).hexdigest(), inst.question)
        assert key not in pair_keys[inst.split], "duplicate (image, question) pair within a split"
        pair_keys[inst.split].add(key)
    assert not pair_keys["train"] & pair_keys["test"]


def test_image_paths_in_jsonl_are_relative(tmp_path):
    data = make_task("transform", n=4, seed=0, out_dir=tmp_path)
    for line in data.read_text().splitlines():
        row = json.loads(line)
        assert row["images"] == [f"images/{row['id']}.png"]
        assert row["aux_images"] == [f"images/{row['id']}_aux.png"]


def test_digit_scans_never_cross_splits(made):
    scans = {"train": set(), "test": set()}
    for inst in made["digits"]:
        scans[inst.split] |= {inst.attributes["left_scan_index"], inst.attributes["right_scan_index"]}
    assert scans["train"] and scans["test"] and not scans["train"] & scans["test"]


# ---------------------------------------------------------------------------------------------- transform


def transformed_independently(grid: list[list[str]], attrs: dict) -> list[list[str]]:
    """The transformed grid from explicit index formulas (no numpy flips), so the check is independent."""
    size = len(grid)
    kind = attrs["transform"]
    if kind == "swap":
        flat = [c for row in grid for c in row]
        a, b = attrs["swap_cells"]
        flat[a], flat[b] = flat[b], flat[a]
        return [flat[r * size:(r + 1) * size] for r in range(size)]
    source = {
        "flip_horizontal": lambda r, c: (r, size - 1 - c),
        "flip_vertical": lambda r, c: (size - 1 - r, c),
        "rotate_90": lambda r, c: (size - 1 - c, r),  # clockwise: the new top row is the old left column
        "rotate_180": lambda r, c: (size - 1 - r, size - 1 - c),
    }[kind]
    return [[grid[source(r, c)[0]][source(r, c)[1]] for c in range(size)] for r in range(size)]


def test_transform_answers_match_an_independent_recomputation(made):
    for inst in made["transform"]:
        attrs = inst.attributes
        size = attrs["grid_size"]
        cell_px = 56 // size
        image = pixels(inst.images[0])
        grid = [[colour_name(colour_at(image, r, c, cell_px)) for c in range(size)] for r in range(size)]
        assert [attrs[f"cell_{i}_colour"] for i in range(size * size)] == [c for row in grid for c in row]
        assert all(attrs[f"count_{name}"] == sum(row.count(name) for row in grid) for name in COLOUR_NAMES)

        after = transformed_independently(grid, attrs)
        query_row, query_col = divmod(attrs["query_cell"], size)
        assert inst.answer == after[query_row][query_col]
        aux = pixels(inst.aux_images[0])
        assert np.array_equal(aux, transform.render_grid(after, 56)), "aux image is not the transformed render"
        flat_after = [c for row in after for c in row]
        assert attrs["imagination"] == ", ".join(
            f"{corner} {colour}" for corner, colour in zip(("top-left", "top-right", "bottom-left", "bottom-right"),
                                                          flat_after))


def test_transform_question_names_the_transform():
    words = {"flip_horizontal": "horizontally", "flip_vertical": "vertically", "rotate_90": "90 degrees clockwise",
             "rotate_180": "180 degrees", "swap": "swapping"}
    for item in transform.generate(40, seed=1):
        assert words[item.attributes["transform"]] in item.question


def test_transform_larger_grid_and_image(tmp_path):
    items = transform.generate(8, seed=0, image_size=112, grid_size=4)
    assert items[0].image.shape == (112, 112, 3)
    assert "row " in items[0].question and "column " in items[0].question
    with pytest.raises(LatentProbeError, match="patches"):
        transform.generate(2, seed=0, image_size=56, grid_size=3)


# ---------------------------------------------------------------------------------------------- path


def test_path_answers_match_a_fresh_walk(made):
    kind_of_colour = {tuple(v): k for k, v in path.KIND_COLOURS.items()}
    steps = {"U": (-1, 0), "D": (1, 0), "L": (0, -1), "R": (0, 1)}
    for inst in made["path"]:
        attrs = inst.attributes
        size = attrs["grid_size"]
        cell_px = 56 // size
        image = pixels(inst.images[0])
        kinds = [kind_of_colour[colour_at(image, *divmod(i, size), cell_px)] for i in range(size * size)]
        assert kinds == [attrs[f"cell_{i}_kind"] for i in range(size * size)]
        assert kinds.index("start") == attrs["start_cell"] and kinds.index("goal") == attrs["goal_cell"]
        assert [i for i, k in enumerate(kinds) if k == "hole"] == attrs["hole_cells"]
        assert ",".join(attrs["moves"]) in inst.question

        row, col = divmod(attrs["start_cell"], size)
        visited, outcome = [attrs["start_cell"]], "floor"
        for move in attrs["moves"]:
            row, col = row + steps[move][0], col + steps[move][1]
            assert 0 <= row < size and 0 <= col < size, "move sequence leaves the map"
            visited.append(row * size + col)
            if kinds[visited[-1]] == "hole":
                outcome = "hole"
                break
        else:
            outcome = "goal" if visited[-1] == attrs["goal_cell"] else "floor"
        assert attrs["goal_cell"] not in visited[:-1], "the goal is passed through before the end"
        assert visited == attrs["visited_cells"] and outcome == attrs["outcome"]
        expected = ("yes" if outcome == "goal" else "no") if attrs["question_type"] == "reach" else outcome
        assert inst.answer == expected

        aux = pixels(inst.aux_images[0])
        drawn = path.render_map(size, attrs["start_cell"], attrs["goal_cell"], attrs["hole_cells"], 56, path=visited)
        assert np.array_equal(aux, drawn), "aux image is not the map with the walked route"
        marked = [i for i in range(size * size) if colour_at(aux, *divmod(i, size), cell_px) == PALETTE["yellow"]]
        assert marked == sorted(visited[1:])


def test_path_rejects_maps_too_small():
    with pytest.raises(LatentProbeError, match="cannot hold"):
        path.generate(2, seed=0, grid_size=2, n_moves=3)


# ---------------------------------------------------------------------------------------------- digits


def test_digit_answers_match_sklearn_labels(made):
    from sklearn.datasets import load_digits

    labels = load_digits().target
    for inst in made["digits"]:
        attrs = inst.attributes
        left, right = int(labels[attrs["left_scan_index"]]), int(labels[attrs["right_scan_index"]])
        assert (left, right) == (attrs["left_digit"], attrs["right_digit"])
        assert attrs["imagination"] == f"left {left}, right {right}"
        if attrs["question_type"] == "sum":
            assert inst.answer == str(left + right)
            low = int(inst.options[0])
            assert inst.options == [str(low + i) for i in range(4)] and 0 <= low and low + 3 <= 18
        else:
            assert left != right and inst.answer == ("yes" if left > right else "no")
        expected = digits.render_pair(attrs["left_scan_index"], attrs["right_scan_index"], 56)
        assert np.array_equal(pixels(inst.images[0]), expected)


# ---------------------------------------------------------------------------------------------- balance


@pytest.mark.parametrize("name", sorted(TASKS))
def test_gold_answers_and_positions_are_balanced(made, name):
    groups: dict[tuple, list] = {}
    for inst in made[name]:
        groups.setdefault((inst.split, inst.attributes["question_type"]), []).append(inst)
    for (split, question_type), members in groups.items():
        n_options = len(members[0].options)
        positions = Counter(inst.options.index(inst.answer) for inst in members)
        counts = [positions.get(p, 0) for p in range(n_options)]
        assert max(counts) - min(counts) <= 1, f"{name}/{split}/{question_type}: gold positions {counts}"
    if name == "path":  # a "no" must not always mean the same thing: both ways to miss the goal occur
        misses = Counter(i.attributes["outcome"] for i in made[name] if i.answer == "no")
        assert abs(misses["hole"] - misses["floor"]) <= 2


def test_chance_accuracy(made):
    assert chance_accuracy(made["transform"]) == pytest.approx(0.25)
    expected = np.mean([1 / len(i.options) for i in made["path"]])
    assert chance_accuracy(made["path"]) == pytest.approx(expected)
    assert 1 / 4 < chance_accuracy(made["digits"]) < 1 / 2
    with pytest.raises(LatentProbeError):
        chance_accuracy([])


# ---------------------------------------------------------------------------------------------- errors and reruns


def test_user_errors_say_what_to_do(tmp_path):
    with pytest.raises(LatentProbeError, match="unknown task"):
        make_task("mazes", n=4, seed=0, out_dir=tmp_path / "x")
    with pytest.raises(LatentProbeError, match="test_fraction"):
        make_task("path", n=4, seed=0, out_dir=tmp_path / "x", test_fraction=1.0)
    with pytest.raises(LatentProbeError, match="multiple of 28"):
        digits.generate(2, seed=0, image_size=70)
    make_task("path", n=4, seed=0, out_dir=tmp_path / "y")
    with pytest.raises(LatentProbeError, match="overwrite=True"):
        make_task("path", n=4, seed=0, out_dir=tmp_path / "y")


def test_overwrite_leaves_no_stale_images(tmp_path):
    make_task("transform", n=8, seed=0, out_dir=tmp_path)
    make_task("transform", n=4, seed=0, out_dir=tmp_path, overwrite=True)
    listed = {p for inst in load_jsonl(tmp_path / "data.jsonl") for p in inst.images + inst.aux_images}
    on_disk = {str(p) for p in (tmp_path / "images").glob("*.png")}
    assert on_disk == listed
