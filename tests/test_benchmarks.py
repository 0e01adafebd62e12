"""Benchmark loaders read tiny fixtures written in each benchmark's real published layout."""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"

from latentprobe.data.benchmarks import BENCHMARKS, detect, load_benchmark  # noqa: E402
from latentprobe.data.benchmarks.vsp import (judge_plan, parse_plan, plan_is_safe, shortest_plan,  # noqa: E402
                                        simulate_plan)
from latentprobe.data.benchmarks.vstar import parse_question_text, shuffled_option_order  # noqa: E402
from latentprobe.data import load_images  # noqa: E402
from latentprobe.errors import InstanceError, LatentProbeError  # noqa: E402


def png_bytes(colour: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (8, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(path: Path, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(colour))
    return path


def write_tsv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(header)] + ["\t".join(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ---------------------------------------------------------------- fixtures in each published layout


@pytest.fixture
def vstar_hf(tmp_path: Path) -> Path:
    """craigwu/vstar_bench: test_questions.jsonl beside per-split image + JSON folders."""
    root = tmp_path / "vstar_bench"
    save_png(root / "direct_attributes" / "sa_4690.jpg")
    (root / "direct_attributes" / "sa_4690.json").write_text(json.dumps({
        "target_object": ["glove"], "bbox": [[564, 142, 155, 157]], "question": "What is the material of the glove?",
        "options": ["rubber", "cotton", "kevlar", "leather"]}))
    save_png(root / "relative_position" / "sa_10.jpg")
    rows = [
        {"image": "direct_attributes/sa_4690.jpg", "category": "direct_attributes", "question_id": 0, "label": "D",
         "text": "What is the material of the glove?\n(A) rubber\n(B) cotton\n(C) kevlar\n(D) leather\n"
                 "Answer with the option's letter from the given choices directly."},
        {"image": "relative_position/sa_10.jpg", "category": "relative_position", "question_id": 1, "label": "B",
         "text": "Is the cat on the left or right of the dog?\n(A) left\n(B) right\n"
                 "Answer with the option's letter from the given choices directly."},
    ]
    (root / "test_questions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


@pytest.fixture
def mmvp_folder(tmp_path: Path) -> Path:
    root = tmp_path / "MMVP"
    root.mkdir()
    (root / "Questions.csv").write_text(
        "Index,Question,Options,Correct Answer\n"
        "1,Are the butterfly's wings closer to being open or closed?,(a) Open (b) Closed,(a)\n"
        '2,"Is the dog facing left, or right?",(a) Left (b) Right,(b)\n')
    save_png(root / "MMVP Images" / "1.jpg")
    save_png(root / "MMVP Images" / "2.jpg", (0, 0, 255))
    return root


HR_HEADER = ["index", "question", "answer", "category", "A", "B", "C", "D", "image", "cycle_category"]


@pytest.fixture
def hrbench_folder(tmp_path: Path) -> Path:
    root = tmp_path / "HR-Bench"
    image = b64(png_bytes())
    write_tsv(root / "hr_bench_4k.tsv", HR_HEADER, [
        ["0", "What colour is the sign?", "C", "single", "red", "blue", "green", "white", image, "0"],
        # VLMEvalKit stores a repeated image once; this row points at row 0 by index.
        ["1", "Which car is closest to the bus?", "A", "cross", "the taxi", "the van", "the truck", "none", "0", "0"],
    ])
    return root


def blink_row(idx: str, question: str, choices: list[str], answer: str, n_images: int) -> dict:
    images = [{"bytes": png_bytes((40 * i, 0, 0)), "path": f"{idx}_{i}.png"} for i in range(n_images)]
    images += [None] * (4 - n_images)
    return {"idx": idx, "question": question, "sub_task": idx.split("_")[1], "choices": choices, "answer": answer,
            "prompt": question, "explanation": "", "image_1": images[0], "image_2": images[1],
            "image_3": images[2], "image_4": images[3]}


@pytest.fixture
def blink_folder(tmp_path: Path) -> Path:
    root = tmp_path / "BLINK"
    write_parquet(root / "Jigsaw" / "val-00000-of-00001.parquet", [
        blink_row("val_Jigsaw_1", "Which image is the missing part in the first image?", ["(A)", "(B)"], "(B)", 3)])
    write_parquet(root / "Counting" / "val-00000-of-00001.parquet", [
        blink_row("val_Counting_1", "How many blue floats are there?", ["0", "3", "2", "1"], "(C)", 1),
        blink_row("val_Counting_2", "How many cups are there?", ["4", "5", "6", "7"], "(A)", 1)])
    write_parquet(root / "Counting" / "test-00000-of-00001.parquet", [
        blink_row("test_Counting_1", "How many trees?", ["1", "2", "3", "4"], "", 1)])
    return root


@pytest.fixture
def mme_json_folder(tmp_path: Path) -> Path:
    """MME-RealWorld-Lite data.zip unpacked: MME-RealWorld-Lite.json beside imgs/."""
    root = tmp_path / "data"
    save_png(root / "imgs" / "diagram_and_table" / "cons9.jpg")
    records = [{"Question_id": "perception/diagram_and_table/diagram/0558", "Image": "diagram_and_table/cons9.jpg",
                "Text": "What is the data of Interest in Feb-23 in the table?", "Question Type": "Multiple Choice",
                "Answer choices": ["(A) 458", "(B) 457", "(C) 456", "(D) 455",
                                   "(E) This image doesn't feature the data."],
                "Ground truth": "B", "Category": "diagram", "Subtask": "Diagram and Table", "Task": "Perception"}]
    (root / "MME-RealWorld-Lite.json").write_text(json.dumps(records))
    return root


@pytest.fixture
def vsp_folder(tmp_path: Path) -> Path:
    """The GitHub repository layout: maze/task-main (planning) and maze/task4 (reasoning)."""
    maze = tmp_path / "Visual-Spatial-Planning" / "maze"
    level = maze / "task-main" / "maps" / "level3"
    save_png(level / "img" / "14.png")
    (level / "table").mkdir(parents=True)
    (level / "table" / "14.txt").write_text(
        "| | Col 1 | Col 2 | Col 3 |\n| Row 1 | _ | _ | _ |\n| Row 2 | # | @ | _ |\n| Row 3 | # | * | # |\n")
    steps = maze / "task4" / "maps" / "level_step3"
    for i, (actions, verdict) in enumerate([("LUU", "N"), ("RRD", "Y")]):
        save_png(steps / "img" / f"{i}.png")
        for sub, text in (("question", actions), ("answer", verdict), ("text", "FFSFF\nFFFHF\nFFFFF\nFFFFH\nFFGFF")):
            (steps / sub).mkdir(parents=True, exist_ok=True)
            (steps / sub / f"{i}.txt").write_text(text)
    return tmp_path / "Visual-Spatial-Planning"


# ---------------------------------------------------------------- V*


def test_vstar_release_layout_gives_gold_text_and_target_boxes(vstar_hf):
    instances = load_benchmark("vstar", vstar_hf)
    glove, cat = instances
    assert glove.id == "direct_attributes/sa_4690"
    assert glove.question == "What is the material of the glove?"
    assert glove.options == ["rubber", "cotton", "kevlar", "leather"]
    assert glove.answer == "leather" and glove.gold_letter == "D"
    assert glove.attributes["target_object"] == ["glove"]
    assert glove.attributes["bbox"] == [[564, 142, 155, 157]]
    assert glove.task == "direct_attributes" and Path(glove.images[0]).exists()
    assert (cat.task, cat.options, cat.answer) == ("relative_position", ["left", "right"], "right")


def test_vstar_split_and_limit(vstar_hf):
    only = load_benchmark("vstar", vstar_hf, split="relative_position")
    assert [i.task for i in only] == ["relative_position"]
    assert len(load_benchmark("vstar", vstar_hf, limit=1)) == 1
    with pytest.raises(LatentProbeError, match="direct_attributes"):
        load_benchmark("vstar", vstar_hf, split="colour")


def test_vstar_original_folders_shuffle_options_per_instance_and_record_the_order(vstar_hf):
    (vstar_hf / "test_questions.jsonl").unlink()
    (vstar_hf / "relative_position" / "sa_10.jpg").unlink()
    listed = ["rubber", "cotton", "kevlar", "leather"]  # the release lists the gold (rubber) first
    [glove] = load_benchmark("vstar", vstar_hf)
    order = glove.attributes["option_order"]
    assert sorted(order) == [0, 1, 2, 3] and glove.options == [listed[i] for i in order]
    assert glove.answer == "rubber" and glove.gold_letter == "ABCD"[order.index(0)]
    [again] = load_benchmark("vstar", vstar_hf)
    assert again.options == glove.options  # same seed, same order
    # over many instance ids the gold lands on every letter, and another seed gives other orders
    golds = {shuffled_option_order(f"direct_attributes/sa_{i}", 4).index(0) for i in range(40)}
    assert golds == {0, 1, 2, 3}
    assert any(shuffled_option_order(f"x/{i}", 4, seed=1) != shuffled_option_order(f"x/{i}", 4) for i in range(5))


def test_vstar_release_keeps_its_labels_and_raw_text(vstar_hf):
    glove, _ = load_benchmark("vstar", vstar_hf)
    assert glove.gold_letter == "D" and "option_order" not in glove.attributes
    assert glove.attributes["raw_text"].startswith("What is the material of the glove?\n(A) rubber")


def test_vstar_lmms_parquet_writes_embedded_image_to_cache(tmp_path):
    data = png_bytes((1, 2, 3))
    write_parquet(tmp_path / "vstar" / "data" / "test-00000-of-00001.parquet", [
        {"question_id": 7, "image": {"bytes": data, "path": "sa_7.jpg"}, "label": "A", "category": "direct_attributes",
         "text": "What colour is the umbrella?\n(A) red\n(B) blue\n(C) black\n(D) white"}])
    cache = tmp_path / "cache"
    [inst] = load_benchmark("vstar", tmp_path / "vstar", cache_dir=cache)
    assert inst.options == ["red", "blue", "black", "white"] and inst.answer == "red"
    assert Path(inst.images[0]).parent == cache and Path(inst.images[0]).read_bytes() == data
    assert load_images(inst)[0].size == (8, 6)


def test_vstar_vlmevalkit_tsv_and_inline_options(tmp_path):
    write_tsv(tmp_path / "VStarBench.tsv", ["index", "image", "question", "A", "B", "C", "D", "answer", "category"],
              [["0", b64(png_bytes()), "What colour?", "red", "blue", "green", "black", "C", "direct_attributes"]])
    [inst] = load_benchmark("v*", tmp_path)
    assert (inst.options, inst.answer, inst.task) == (["red", "blue", "green", "black"], "green", "direct_attributes")
    assert parse_question_text("Which? (A) a cat (B) a dog Answer with the option's letter.") == (
        "Which?", ["a cat", "a dog"])


def test_mmvp_folder_passed_as_vstar_names_what_is_missing(mmvp_folder):
    with pytest.raises(LatentProbeError) as error:
        load_benchmark("vstar", mmvp_folder)
    message = str(error.value)
    assert "V*Bench" in message and "test_questions.jsonl" in message
    assert "craigwu/vstar_bench" in message and "mmvp" in message  # what to do, and what the folder looks like


# ---------------------------------------------------------------- MMVP


def test_mmvp_csv_and_images(mmvp_folder):
    first, second = load_benchmark("mmvp", mmvp_folder)
    assert first.question == "Are the butterfly's wings closer to being open or closed?"
    assert first.options == ["Open", "Closed"] and first.answer == "Open"
    assert second.options == ["Left", "Right"] and second.answer == "Right" and second.gold_letter == "B"
    assert first.images == [str(mmvp_folder / "MMVP Images" / "1.jpg")]
    assert first.attributes["pair_id"] == second.attributes["pair_id"] == 0
    assert first.attributes["label_disputed"] is False


def test_mmvp_parquet_dump(tmp_path):
    write_parquet(tmp_path / "data" / "train-00000-of-00001.parquet", [
        {"Index": 5, "Question": "Is the door open?", "Options": "(a) Yes (b) No", "Correct Answer": "(b)",
         "image": {"bytes": png_bytes(), "path": None}}])
    [inst] = load_benchmark("mmvp", tmp_path)
    assert (inst.id, inst.options, inst.answer) == ("5", ["Yes", "No"], "No")
    assert Path(inst.images[0]).read_bytes() == png_bytes()


def test_mmvp_csv_without_columns_is_rejected(tmp_path):
    (tmp_path / "Questions.csv").write_text("id,text\n1,hello\n")
    with pytest.raises(LatentProbeError, match="Correct Answer"):
        load_benchmark("mmvp", tmp_path)


# ---------------------------------------------------------------- HR-Bench


def test_hrbench_tsv_decodes_base64_and_follows_image_references(hrbench_folder, tmp_path):
    single, cross = load_benchmark("hrbench-4k", hrbench_folder, cache_dir=tmp_path / "c")
    assert single.options == ["red", "blue", "green", "white"] and single.answer == "green"
    assert (single.task, cross.task) == ("single", "cross")
    assert cross.answer == "the taxi" and cross.attributes["resolution"] == "4k"
    assert cross.images == single.images and Path(single.images[0]).read_bytes() == png_bytes()


def test_hrbench_reference_resolved_when_referenced_row_is_past_the_limit(tmp_path):
    image = b64(png_bytes())
    write_tsv(tmp_path / "hr_bench_8k.tsv", HR_HEADER, [
        ["5", "Q5?", "A", "single", "a", "b", "c", "d", "9", "0"],
        ["9", "Q9?", "B", "single", "a", "b", "c", "d", image, "0"]])
    [inst] = load_benchmark("hrbench-8k", tmp_path, limit=1)
    assert Path(inst.images[0]).read_bytes() == png_bytes()


def test_hrbench_parquet_form(tmp_path):
    write_parquet(tmp_path / "hr_bench_4k.parquet", [
        {"index": 3, "question": "Which sign?", "answer": "B", "category": "single", "A": "stop", "B": "yield",
         "C": "exit", "D": "none", "image": b64(png_bytes()), "cycle_category": "1"}])
    [inst] = load_benchmark("hrbench-4k", tmp_path)
    assert inst.answer == "yield" and inst.id == "3" and Path(inst.images[0]).exists()


def test_hrbench_8k_on_a_4k_folder_suggests_4k(hrbench_folder):
    with pytest.raises(LatentProbeError) as error:
        load_benchmark("hrbench-8k", hrbench_folder)
    assert "hr_bench_8k.tsv" in str(error.value) and "hrbench-4k" in str(error.value)


def test_hrbench_missing_option_column_is_named(tmp_path):
    write_tsv(tmp_path / "hr_bench_4k.tsv", ["index", "question", "answer", "image"], [["0", "Q?", "A", "x" * 80]])
    with pytest.raises(LatentProbeError, match="lacks column.*A, B"):
        load_benchmark("hrbench-4k", tmp_path)


# ---------------------------------------------------------------- BLINK


def test_blink_val_parquet_subtasks_and_images(blink_folder, tmp_path):
    instances = load_benchmark("blink", blink_folder, cache_dir=tmp_path / "c")
    by_id = {i.id: i for i in instances}
    assert set(by_id) == {"val_Jigsaw_1", "val_Counting_1", "val_Counting_2"}  # test rows (no answers) are skipped
    jigsaw = by_id["val_Jigsaw_1"]
    assert jigsaw.task == "Jigsaw" and jigsaw.options == ["(A)", "(B)"] and jigsaw.answer == "(B)"
    assert jigsaw.gold_letter == "B" and len(jigsaw.images) == 3 and jigsaw.attributes["n_images"] == 3
    assert [Image.open(p).getpixel((0, 0)) for p in jigsaw.images] == [(0, 0, 0), (40, 0, 0), (80, 0, 0)]
    counting = by_id["val_Counting_1"]
    assert counting.options == ["0", "3", "2", "1"] and counting.answer == "2" and counting.split == "val"


def test_blink_split_selects_subtasks(blink_folder):
    assert {i.task for i in load_benchmark("blink", blink_folder, split="counting")} == {"Counting"}
    with pytest.raises(LatentProbeError, match="Counting, Jigsaw"):
        load_benchmark("blink", blink_folder, split="Relative_Depth")


def test_blink_test_only_folder_says_answers_are_withheld(blink_folder):
    for val in blink_folder.rglob("val-*.parquet"):
        val.unlink()
    with pytest.raises(LatentProbeError, match="withheld"):
        load_benchmark("blink", blink_folder)


# ---------------------------------------------------------------- MME-RealWorld-Lite


def test_mme_realworld_json_release(mme_json_folder):
    [inst] = load_benchmark("mme-realworld-lite", mme_json_folder.parent)  # the folder holding data/
    assert inst.id == "perception/diagram_and_table/diagram/0558"
    assert inst.options == ["458", "457", "456", "455", "This image doesn't feature the data."]
    assert inst.answer == "457" and inst.task == "Perception/Diagram and Table"
    assert inst.attributes == {"task_type": "Perception", "subtask": "Diagram and Table", "category": "diagram"}
    assert inst.images == [str(mme_json_folder / "imgs" / "diagram_and_table" / "cons9.jpg")]


def test_mme_realworld_base64_tsv_and_lmms_parquet(tmp_path):
    options = ["(A) 13", "(B) 90", "(C) 77", "(D) 6", "(E) The image does not feature the buses"]
    write_tsv(tmp_path / "tsv" / "mme_realworld_lite.tsv",
              ["index", "image", "question", "multi-choice options", "answer", "category", "l2-category"],
              [["310", b64(png_bytes()), "What is the number of buses in the image?", repr(options), "E",
                "Perception/Monitoring", "Vehicle/counting"]])
    [from_tsv] = load_benchmark("mme-realworld-lite", tmp_path / "tsv", split="perception")
    assert from_tsv.answer == "The image does not feature the buses" and from_tsv.options[0] == "13"
    assert from_tsv.task == "Perception/Monitoring" and from_tsv.attributes["category"] == "Vehicle/counting"
    write_parquet(tmp_path / "pq" / "data" / "train-00000-of-00001.parquet", [
        {"index": 310, "question": "What is the number of buses in the image?", "multi-choice options": options,
         "answer": "D", "category": "Perception/Monitoring", "l2-category": "Vehicle/counting",
         "bytes": b64(png_bytes())}])
    [from_parquet] = load_benchmark("mme-realworld-lite", tmp_path / "pq")
    assert from_parquet.answer == "6" and Path(from_parquet.images[0]).read_bytes() == png_bytes()


# ---------------------------------------------------------------- VSP


def test_vsp_planning_and_reasoning(vsp_folder):
    instances = load_benchmark("vsp", vsp_folder)
    planning = [i for i in instances if i.task == "spatial_planning"]
    reasoning = [i for i in instances if i.task == "spatial_reasoning"]
    [plan] = planning
    assert plan.id == "spatial_planning/level3/14" and plan.answer == "D" and plan.options is None
    assert plan.attributes["map_rows"] == ["FFF", "HSF", "HGH"] and plan.attributes["player"] == [2, 2]
    assert plan.attributes["goal"] == [3, 2] and plan.attributes["holes"] == [[2, 1], [3, 1], [3, 3]]
    assert [(i.answer, i.attributes["action_sequence"]) for i in reasoning] == [("No", "LUU"), ("Yes", "RRD")]
    assert reasoning[0].options == ["Yes", "No"] and "Left, Up, Up" in reasoning[0].question
    assert [i.task for i in load_benchmark("vsp", vsp_folder / "maze", split="spatial_reasoning")] == [
        "spatial_reasoning"] * 2


def test_vsp_maze_logic():
    rows = ["FFSFF", "FFFHF", "FFFFF", "FFFFH", "FFGFF"]
    assert shortest_plan(rows) == ["D", "D", "D", "D"]
    assert plan_is_safe(rows, list("RD")) is False and plan_is_safe(rows, list("LDDDDR")) is True
    assert shortest_plan(["SH", "HG"]) is None


# A hand-made 4x4 map: S start, G goal, H holes (rows top to bottom).
MAZE = ["SFFH",
        "FHFF",
        "FFFH",
        "HFFG"]


@pytest.mark.parametrize("plan", ["R,R,D,D,D,R", "D,D,R,R,D,R", "D, D, R, D, R, R", "DDRDRR", "'Right', 'Right', "
                                  "'Down', 'Down', 'Down', 'Right'", "R R D R L D D R", "L,U,D,D,R,R,D,R"])
def test_every_valid_plan_reaches_the_goal(plan):
    moves = parse_plan(plan)
    assert simulate_plan(MAZE, moves) == "goal" and simulate_plan(MAZE, moves, rule="end") == "goal"


@pytest.mark.parametrize("plan, outcome", [
    ("R,D", "hole"),                 # (2,2) is a hole
    ("R,R,R", "hole"),               # (1,4) is a hole
    ("D,D,D", "hole"),               # (4,1) is a hole
    ("D,D,R,R", "not_reached"),      # safe but short of the goal
    ("U,U,L,L", "not_reached"),      # off the map: the player stays in place
    ("R,R,D,D,R", "hole"),           # (3,4) is a hole
    ("D,D,R,R,D,R,R,D", "goal"),     # reaches the goal (the moves after it are never walked)
])
def test_plans_through_holes_or_short_or_off_map(plan, outcome):
    assert simulate_plan(MAZE, parse_plan(plan)) == outcome


def test_the_two_evaluations_differ_only_after_the_goal():
    walks_on = parse_plan("D,D,R,R,D,R,L")  # reaches the goal, then leaves it
    assert simulate_plan(MAZE, walks_on, rule="reach") == "goal"  # VSP: the episode ends on the goal
    assert simulate_plan(MAZE, walks_on, rule="end") == "not_reached"  # Mirage: the walk must end there
    falls_after = parse_plan("D,D,R,R,D,R,U")  # ... or goes up into the hole at (3,4)
    assert simulate_plan(MAZE, falls_after, rule="end") == "hole"
    stays = parse_plan("D,D,R,R,D,R,R,D")  # off the map from the goal: still on it
    assert simulate_plan(MAZE, stays, rule="end") == "goal"


def test_vsp_planning_is_scored_by_simulation_not_string_equality(vsp_folder):
    from latentprobe.model.answers import score_answer

    [plan] = load_benchmark("vsp", vsp_folder, split="spatial_planning")
    assert plan.answer == "D" and plan.attributes["answer_check"] == "plan_on_map"
    # map FFF / HSF / HGH: D is the shortest plan; R,L,D and U,D,D,U,D (off nothing) also reach the goal
    assert score_answer(r"The answer is \boxed{D}", plan, "boxed").correct
    assert score_answer(r"\boxed{R, L, D}", plan, "boxed").correct
    assert score_answer(r"\boxed{Up, Down, Down}", plan, "boxed").correct
    wrong = score_answer(r"\boxed{L}", plan, "boxed")
    assert (wrong.status, wrong.canonical) == ("wrong", "L")
    assert score_answer(r"\boxed{R, D}", plan, "boxed").status == "wrong"
    assert score_answer(r"\boxed{no idea}", plan, "boxed").status == "unparsable"
    assert score_answer("D", plan, "boxed").status == "unparsable"  # no box: Mirage reads nothing either
    assert judge_plan("R,D,L", plan) is False  # R to (2,3), D into the hole at (3,3)


def test_vsp_reads_mirages_own_copy_of_the_planning_maps(tmp_path):
    """Mirage ships the planning maps as imgs_test/level<N>/{img,pure_text,table} (no task-main/)."""
    level = tmp_path / "vsp_spatial_planning" / "imgs_test" / "level3"
    save_png(level / "img" / "31.png")
    (level / "table").mkdir(parents=True)
    (level / "table" / "31.txt").write_text(
        "| | Col 1 | Col 2 | Col 3 |\n| Row 1 | * | # | @ |\n| Row 2 | _ | _ | _ |\n| Row 3 | _ | _ | _ |\n")
    assert detect(tmp_path / "vsp_spatial_planning") == ["vsp"]
    [plan] = load_benchmark("vsp", tmp_path / "vsp_spatial_planning")
    # Mirage's map_desc for this map is [[2, -1, 1], [0, 0, 0], [0, 0, 0]] (goal, hole, start)
    assert plan.attributes["map_rows"] == ["GHS", "FFF", "FFF"] and plan.answer == "D,L,L,U"


def test_vsp_levels_plan_rule_and_pure_text_maps(vsp_folder):
    level = vsp_folder / "maze" / "task-main" / "maps" / "level4"
    save_png(level / "img" / "0.png")
    (level / "pure_text").mkdir(parents=True)
    (level / "pure_text" / "0.txt").write_text(
        "This is a 4x4 map.\nThe player is at: row 1, column 1;\nThe hole(s) are at: Row 1, Column 4; Row 2, "
        "Column 2; Row 3, Column 4; Row 4, Column 1;\nThe goal is at: Row 4, Column 4.")
    planning = load_benchmark("vsp", vsp_folder, split="spatial_planning")
    assert [i.attributes["level"] for i in planning] == [3, 4]
    assert planning[1].attributes["map_rows"] == MAZE
    only4 = load_benchmark("vsp", vsp_folder, split="spatial_planning", levels=[4], plan_rule="end")
    assert [i.id for i in only4] == ["spatial_planning/level4/0"] and only4[0].attributes["plan_rule"] == "end"
    with pytest.raises(LatentProbeError, match="plan rule"):
        load_benchmark("vsp", vsp_folder, plan_rule="shortest")
    with pytest.raises(LatentProbeError, match="takes no option"):
        load_benchmark("mmvp", vsp_folder, levels=[3])


# ---------------------------------------------------------------- registry and bad input


def test_detect_recognises_each_layout(vstar_hf, mmvp_folder, hrbench_folder, blink_folder, mme_json_folder,
                                       vsp_folder):
    assert detect(vstar_hf) == ["vstar"]
    assert detect(mmvp_folder) == ["mmvp"]
    assert detect(hrbench_folder) == ["hrbench-4k"]
    assert detect(blink_folder) == ["blink"]
    assert detect(mme_json_folder) == ["mme-realworld-lite"]
    assert detect(vsp_folder) == ["vsp"]


def test_each_layout_is_rejected_by_every_other_loader(vstar_hf, mmvp_folder, hrbench_folder, blink_folder,
                                                        mme_json_folder, vsp_folder):
    folders = {"vstar": vstar_hf, "mmvp": mmvp_folder, "hrbench-4k": hrbench_folder, "blink": blink_folder,
               "mme-realworld-lite": mme_json_folder, "vsp": vsp_folder}
    for own, folder in folders.items():
        for name in BENCHMARKS:
            if name == own:
                continue
            with pytest.raises(LatentProbeError) as error:
                load_benchmark(name, folder)
            assert f"looks like {own}" in str(error.value), (name, own, str(error.value))


def test_missing_folder_and_unknown_name(tmp_path):
    with pytest.raises(LatentProbeError, match="MMVP: data folder .* does not exist.*MMVP/MMVP"):
        load_benchmark("mmvp", tmp_path / "nowhere")
    with pytest.raises(LatentProbeError, match="unknown benchmark 'mmbench'.*vstar"):
        load_benchmark("mmbench", tmp_path)
    with pytest.raises(LatentProbeError, match="limit"):
        load_benchmark("mmvp", tmp_path, limit=0)


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_every_loader_rejects_an_empty_folder_with_a_fix(name, tmp_path):
    with pytest.raises(LatentProbeError) as error:
        load_benchmark(name, tmp_path)
    assert error.value.fix and "expected" in error.value.problem


def test_undecodable_embedded_image_loads_then_fails_only_its_instance(tmp_path):
    write_tsv(tmp_path / "hr_bench_4k.tsv", HR_HEADER, [
        ["0", "Q?", "A", "single", "a", "b", "c", "d", b64(b"not an image at all, just bytes" * 4), "0"],
        ["1", "Q?", "B", "single", "a", "b", "c", "d", b64(png_bytes()), "0"]])
    broken, fine = load_benchmark("hrbench-4k", tmp_path)
    assert Path(broken.images[0]).exists()
    with pytest.raises(InstanceError, match="cannot be decoded"):
        load_images(broken)
    assert load_images(fine)[0].size == (8, 6)


def test_cache_is_reused_not_rewritten(hrbench_folder):
    [first, _] = load_benchmark("hrbench-4k", hrbench_folder)
    written = Path(first.images[0])
    assert written.parent == hrbench_folder / ".latentprobe_images" / "hrbench-4k"
    stamp = written.stat().st_mtime_ns
    [again, _] = load_benchmark("hrbench-4k", hrbench_folder)
    assert again.images == first.images and written.stat().st_mtime_ns == stamp


def test_cli_traces_a_benchmark_folder(mmvp_folder, tmp_path):
    import subprocess
    import sys

    from latentprobe.runs.store import TraceStore

    out = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "latentprobe", "trace", "--data", f"mmvp:{mmvp_folder}",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    frame = TraceStore(out).index()
    assert len(frame) == 2 and (frame.status == "ok").all()
    assert list(frame.gold_answer) == ["Open", "Right"]
    wrong = subprocess.run([sys.executable, "-m", "latentprobe", "trace", "--data", f"vstar:{mmvp_folder}",
                            "--out", str(tmp_path / "x")], capture_output=True, text=True, env=env, timeout=300)
    assert wrong.returncode == 2 and "vstar" in wrong.stderr.lower()
