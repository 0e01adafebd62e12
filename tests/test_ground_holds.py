"""Issue 19, "Ground that holds": every item's behaviour, each test failing on the code before its fix."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from latentprobe.cli import main
from latentprobe.data import Instance, builtin_instances, load_jsonl
from latentprobe.model.decoding import DecodeConfig
from latentprobe.errors import LatentProbeError
from latentprobe.fileio import NameBook, path_inside, safe_name

HOSTILE_IDS = ["../../../../escaped", "/tmp/absolute-escape", "a/b/c", "ünïcødé-ïd", "x" * 400, "Q1", "q1",
               "a_b_c", ".hidden", "..", "con.png"]


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------- 1. file names
def test_safe_names_stay_inside_are_readable_and_unique(tmp_path):
    book = NameBook()
    names = [book.name(v) for v in HOSTILE_IDS]
    assert len(set(n.casefold() for n in names)) == len(HOSTILE_IDS)  # never two values on one file
    for value, name in zip(HOSTILE_IDS, names):
        assert "/" not in name and "\\" not in name and not name.startswith(".") and 0 < len(name) <= 96
        assert name.isascii() and path_inside(tmp_path, name).parent == tmp_path
    assert book.name("Q1") == "Q1" and safe_name("plain-id_1.2") == "plain-id_1.2"  # readable when already safe
    assert safe_name("a/b/c") != safe_name("a_b_c")
    (tmp_path / "link").symlink_to("/")
    with pytest.raises(PermissionError, match="outside the output folder"):
        path_inside(tmp_path, "link")


@pytest.fixture(scope="module")
def hostile_instances():
    base = builtin_instances(len(HOSTILE_IDS))
    return [dataclasses.replace(inst, id=new_id) for inst, new_id in zip(base, HOSTILE_IDS)]


def test_ground_overlays_of_hostile_ids_stay_in_the_output_folder(tmp_path, tiny_subject, hostile_instances):
    from latentprobe.where.runs import ground_run

    root = tmp_path / "deep" / "er" / "root"
    out = root / "g"
    from latentprobe.report.where_figures import draw_grounding_run

    ground_run(tiny_subject, hostile_instances, out, config=DecodeConfig(max_new_tokens=6), layers=[1],
               n_random=5, n_boot=100)
    draw_grounding_run(out, hostile_instances, tiny_subject.name, n_overlays=len(hostile_instances))
    assert files_under(tmp_path) == files_under(out)  # nothing outside --out
    overlays = list((out / "figures" / "overlays").glob("*.png"))
    assert len(overlays) == len(hostile_instances)  # one per id: none lost to a collision or a folder
    assert all(p.parent == out / "figures" / "overlays" for p in overlays)


def test_patch_probe_and_report_figures_of_hostile_subject_names_stay_inside(tmp_path, tiny_subject):
    from latentprobe.report.build import collapse_study, probe_study
    from latentprobe.report.patch_figures import patching_heatmaps
    from latentprobe.where.patching import patch_map
    from latentprobe.runs.trace import trace

    instances = builtin_instances(4)
    result = patch_map(tiny_subject, instances, None, layers=[0, 1], groups=["image"], attribution=False,
                       config=DecodeConfig(max_new_tokens=6), n_boot=100)
    run = tmp_path / "trace"
    trace(tiny_subject, instances, run, config=DecodeConfig(max_new_tokens=6))
    manifest = json.loads((run / "manifest.json").read_text())
    for hostile in ("../../escaped", "/abs/escaped", "sub/dir"):
        out = tmp_path / safe_name(hostile) / "out"
        table = result.table.assign(subject=hostile)
        made = patching_heatmaps(table, out / "figures")
        manifest["subject_name"] = hostile
        (run / "manifest.json").write_text(json.dumps(manifest))
        _, collapse = collapse_study([run], out / "collapse", n_boot=50)
        _, probes = probe_study(run, ["colour"], out / "probes", n_splits=2, n_permutations=0)
        written = made + [p[0] if isinstance(p, tuple) else p  # figures may carry their caption
                          for paths in list(collapse.values()) + list(probes.values()) for p in paths]
        assert written and all(out in Path(p).resolve().parents for p in written)
    outside = {p for p in files_under(tmp_path) if p.parts[len(tmp_path.parts)] == "escaped"}
    assert not outside and not Path("/abs/escaped").exists()


# --------------------------------------------------------------------------------------- 2. runs given twice
@pytest.fixture(scope="module")
def intervene_run(tmp_path_factory, tiny_subject):
    from latentprobe.interventions import make_interventions
    from latentprobe.runs.intervene import intervene

    out = tmp_path_factory.mktemp("iv") / "run"
    intervene(tiny_subject, builtin_instances(6), make_interventions("latent", ["zero"]), out,
              config=DecodeConfig(max_new_tokens=6), n_boot=200)
    return out


def test_the_same_run_twice_is_counted_once(intervene_run, tmp_path, capsys):
    from latentprobe.report.build import effect_tables
    from latentprobe.report.build import plan_runs
    from latentprobe.runs.identity import distinct_runs

    copy = tmp_path / "copy"
    shutil.copytree(intervene_run, copy)
    once = effect_tables([intervene_run])
    assert effect_tables([intervene_run, intervene_run]).equals(once)
    assert effect_tables([intervene_run, copy]).equals(once)  # a copy is the same run
    pd.testing.assert_frame_equal(plan_runs([intervene_run, intervene_run]), plan_runs([intervene_run]))
    kept, notes = distinct_runs([intervene_run, copy])
    assert kept == [str(intervene_run)] and "same run" in notes[0] and "counted once" in notes[0]
    assert main(["report", str(intervene_run), str(intervene_run), "--out", str(tmp_path / "r"),
                 "--bootstrap", "100"]) == 0
    assert "is the same run as" in capsys.readouterr().err
    assert main(["plan", str(intervene_run), str(copy)]) == 0
    assert "counted once" in capsys.readouterr().err


def test_runs_of_one_subject_on_different_data_say_so():
    from latentprobe.runs.identity import data_mismatch_notes

    a = {"subject_name": "s", "kind": "trace", "data_fingerprint": "f1", "data": {"n_instances": 240, "source": "x"}}
    b = {"subject_name": "s", "kind": "intervene", "data_fingerprint": "f2", "data": {"n_instances": 24, "source": "y"}}
    notes = data_mismatch_notes([("A", a), ("B", b)])
    assert len(notes) == 1 and "different data" in notes[0] and "240" in notes[0] and "24 instances" in notes[0]
    assert data_mismatch_notes([("A", a), ("C", dict(a, kind="intervene"))]) == []


# ------------------------------------------------------------------------------------------ 3. damaged shards
@pytest.fixture(scope="module")
def small_trace(tmp_path_factory, tiny_subject):
    from latentprobe.runs.trace import trace

    out = tmp_path_factory.mktemp("tr") / "run"
    trace(tiny_subject, builtin_instances(4), out, config=DecodeConfig(max_new_tokens=6), shard_size=2)
    return out


def test_readers_verify_each_shard_and_name_the_damage(small_trace, tmp_path, capsys):
    from latentprobe.runs.store import TraceStore

    run = tmp_path / "run"
    shutil.copytree(small_trace, run)
    shard = sorted((run / "shards").glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # one flipped byte inside a tensor: readable, silently wrong without the checksum
    shard.write_bytes(bytes(data))
    store = TraceStore(run)
    first = store.index().record_id.iloc[0]
    with pytest.raises(LatentProbeError, match=r"damaged.*SHA-256.*--resume"):
        store.tensor(first, "latent")
    for command in (["similarity", str(run)], ["probe", str(run), "--labels", "colour"]):
        assert main(command + ["--out", str(tmp_path / command[0])]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is damaged" in err and "--resume" in err


def test_swapped_shards_are_damage_not_a_missing_recording(small_trace, tmp_path):
    from latentprobe.runs.store import TraceStore

    run = tmp_path / "run"
    shutil.copytree(small_trace, run)
    a, b = sorted((run / "shards").glob("*.safetensors"))[:2]
    a_bytes = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(a_bytes)
    store = TraceStore(run)
    with pytest.raises(LatentProbeError, match="damaged") as caught:
        store.tensor(store.index().record_id.iloc[0], "latent")
    assert "record it when tracing" not in str(caught.value) and "--resume" in str(caught.value)


def test_a_verified_shard_is_hashed_once_per_process(small_trace, monkeypatch):
    from latentprobe.runs import store as store_module

    calls = []
    real = store_module.file_sha256
    monkeypatch.setattr(store_module, "file_sha256", lambda p: calls.append(p) or real(p))
    monkeypatch.setattr(store_module, "_VERIFIED_SHARDS", set())
    for _ in range(3):
        store = store_module.TraceStore(small_trace)
        store.site_array(store.index().record_id, "latent.layer[0]")
    assert len(calls) == len(list((small_trace / "shards").glob("*.safetensors")))


# ------------------------------------------------------------------------------------ 4 and 7. folders, locks
def test_patch_ground_lens_and_analyses_refuse_another_runs_folder(small_trace, tmp_path, capsys):
    before = {p: p.stat().st_mtime_ns for p in files_under(small_trace)}
    for argv in (["patch", "--subject", "tiny", "--limit", "2"], ["ground", "--subject", "tiny", "--limit", "2"],
                 ["lens", "--subject", "tiny", "--limit", "2"], ["similarity", str(small_trace)],
                 ["report", str(small_trace)]):
        assert main(argv + ["--out", str(small_trace)]) == 2
        err = capsys.readouterr().err
        assert "is not empty (it holds a trace run)" in err and err.count("\n") == 1
    assert {p: p.stat().st_mtime_ns for p in files_under(small_trace)} == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main(["trace", "--subject", "tiny", "--limit", "1", "--resume", "--out", str(tmp_path / "other")]) == 2
    assert "no run that --resume could continue" in capsys.readouterr().err


def test_a_second_writer_on_a_run_folder_gets_one_line(tmp_path):
    from latentprobe.runs.folders import RunFolderLock
    from latentprobe.runs.store import TraceWriter

    first = TraceWriter(tmp_path / "r", {"kind": "trace"})
    with pytest.raises(LatentProbeError, match="another latentprobe process is writing"):
        TraceWriter(tmp_path / "r", {"kind": "trace"}, resume=True)
    first.close()  # released: the run can be resumed now
    TraceWriter(tmp_path / "r", {"kind": "trace"}, resume=True).close()
    with RunFolderLock(tmp_path / "g"):
        with pytest.raises(LatentProbeError, match="another latentprobe process"):
            RunFolderLock(tmp_path / "g")


# ------------------------------------------------------------------------------------------- 5. gold answers
@pytest.mark.parametrize("row, needle", [
    ({"id": "a", "question": "q", "answer": "purple", "options": ["red", "blue"]}, "not among the options"),
    ({"id": "a", "question": "q", "answer": "C", "options": ["red", "blue"]}, "not among the options"),
    ({"id": "a", "question": "q", "answer": "red", "options": ["red", "Red "]}, "options A and B are the same"),
])
def test_gold_outside_the_options_or_repeated_options_are_refused_at_load(tmp_path, row, needle):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"id": "ok", "question": "q", "answer": "B", "options": ["x", "y"]}) + "\n"
                    + json.dumps(row) + "\n")
    with pytest.raises(LatentProbeError, match=needle) as caught:
        load_jsonl(path)
    assert "d.jsonl:2" in str(caught.value)


# ---------------------------------------------------------------------------------------- 6. latent_steps=0
def test_latent_steps_zero_means_zero_in_run_with_cache(tiny_subject):
    from latentprobe.model.cache import run_with_cache

    instances = builtin_instances(2)
    with pytest.raises(LatentProbeError, match="no latent step runs"):
        run_with_cache(tiny_subject, instances, sites=["latent[2].layer[1]"],
                       config=DecodeConfig(max_new_tokens=6, latent_steps=0))
    result, cache = run_with_cache(tiny_subject, instances, config=DecodeConfig(max_new_tokens=6, latent_steps=0))
    assert [row.n_latent_steps for row in result.rows] == [0, 0]
    with pytest.raises(LatentProbeError, match="no instance reached latent\\[2\\]"):
        cache["latent[2].layer[1]"]
    result, cache = run_with_cache(tiny_subject, instances, config=DecodeConfig(max_new_tokens=6, latent_steps=2))
    assert cache["latent[1].layer[1]"].shape == (2, tiny_subject.hidden_size)


# ------------------------------------------------------------------------------- tracebacks and wrong hints
def test_a_full_disk_inside_safetensors_is_the_one_line_message(tmp_path, monkeypatch, capsys):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert main(["trace", "--subject", "tiny", "--limit", "2", "--max-new-tokens", "4", "--quiet",
                 "--out", str(tmp_path / "t")]) == 1
    err = capsys.readouterr().err
    assert "disk is full" in err and "--resume" in err and "Traceback" not in err


@pytest.mark.parametrize("seed", ["4294967296", "100000000000000000000000", "-1"])
def test_seeds_are_bounded_at_parse(seed, capsys, tmp_path):
    with pytest.raises(SystemExit) as caught:
        main(["trace", "--subject", "tiny", "--seed", seed, "--out", str(tmp_path / "t")])
    assert caught.value.code == 2 and "--seed" in capsys.readouterr().err and not (tmp_path / "t").exists()


def test_wrong_hints_are_gone(tmp_path, capsys):
    assert main(["trace", "--subject", "tiny", "--layers", "99", "--limit", "1", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "or -1" not in err and "use 0..2" in err
    assert main(["intervene", "--subject", "tiny", "--target", "latent", "--kind", "zero", "--layer", "99",
                 "--limit", "2", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "or -1" not in err and "--layer 1..2" in err
    assert main(["data", "make", "transform", "--n", "4", "--out", str(tmp_path / "d")]) == 0
    assert main(["data", "make", "transform", "--n", "4", "--out", str(tmp_path / "d")]) == 2
    assert "overwrite=True" not in capsys.readouterr().err.split("(from Python")[0]
    loop = tmp_path / "loop.jsonl"
    loop.symlink_to(loop)
    assert main(["trace", "--subject", "tiny", "--data", str(loop), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "symbolic link loop" in err and "does not exist" not in err


def test_one_instance_prints_no_interval():
    from latentprobe.stats.effects import interval_text

    assert interval_text(1.0, 1.0, 1.0, 1) == "+1.000 (n = 1: no interval)"
    assert interval_text(0.5, 0.5, 0.5, 7) == "+0.500 (n = 7: no interval)"  # a zero-width bootstrap
    assert interval_text(0.5, 0.25, 0.75, 7) == "+0.500 [+0.250, +0.750]"


def test_a_box_beyond_its_image_is_clamped_with_a_warning(tmp_path, caplog):
    from PIL import Image

    from latentprobe.where.grounding import truth_boxes

    Image.new("RGB", (100, 50)).save(tmp_path / "i.png")
    inst = Instance(id="b", question="?", answer="x", images=[str(tmp_path / "i.png")],
                    attributes={"bbox": [50, 0, 500, 500]})
    with caplog.at_level(logging.WARNING):
        boxes = truth_boxes(inst)
    assert boxes == [(0.5, 0.0, 1.0, 1.0)] and "beyond its 100 x 50 image" in caplog.text
    with pytest.raises(LatentProbeError, match="outside"):
        truth_boxes(dataclasses.replace(inst, attributes={"bbox": [200, 0, 10, 10]}))


def test_a_tokenizer_that_needs_remote_code_is_one_line(tiny_subject, tmp_path, capsys):
    folder = tmp_path / "ckpt"
    tiny_subject.model.save_pretrained(folder)
    tiny_subject.tokenizer.save_pretrained(folder)
    tiny_subject.image_processor.save_pretrained(folder)
    (folder / "tokenizer.json").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    config["tokenizer_class"] = "EvilTokenizer"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    capsys.readouterr()  # saving printed a progress bar
    assert main(["trace", "--subject", str(folder), "--protocol", "lvr", "--limit", "1",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tokenizer_config.json" in err and "tokenizer.json" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_check_of_the_bottleneck_organism_recomputes_with_its_attention_mask():
    from latentprobe.runs.conformance import run_check

    report = run_check("organism-bottleneck", max_new_tokens=16)
    rows = {line.name: line for line in report.lines}
    assert rows["cache vs recompute"].status == "pass", rows["cache vs recompute"].detail
    assert "scope" in rows and "answer mask" in rows["scope"].detail


# ------------------------------------------------------------------------------------ transformers versions
def test_the_cache_keyword_follows_the_installed_backbone(tiny_subject):
    import inspect

    from latentprobe.model.compat import cache_keywords

    renamed = cache_keywords(tiny_subject.model.model, {"past_key_values": "c", "use_cache": True})
    takes_cache = "cache" in inspect.signature(type(tiny_subject.model.model).forward).parameters
    assert renamed == ({"cache": "c", "use_cache": True} if takes_cache else {"past_key_values": "c", "use_cache": True})


def test_a_demo_like_run_emits_no_future_warning(tmp_path):
    from latentprobe.interventions import make_interventions
    from latentprobe.runs.intervene import intervene
    from latentprobe.runs.trace import trace
    from latentprobe.model.subjects import load_subject

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        subject = load_subject("organism-bottleneck")
        trace(subject, builtin_instances(3), tmp_path / "t", config=DecodeConfig(max_new_tokens=6))
        intervene(subject, builtin_instances(3), make_interventions("latent", ["zero"]), tmp_path / "i",
                  config=DecodeConfig(max_new_tokens=6), n_boot=100)
    future = [str(w.message)[:120] for w in caught if issubclass(w.category, FutureWarning)]
    assert future == []


def test_the_transformers_pin_is_the_range_ci_tests():
    import importlib.metadata as md
    import re

    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    low, high = re.search(r'"transformers>=([0-9.]+),<([0-9.]+)"', text).groups()
    installed = tuple(int(v) for v in md.version("transformers").split(".")[:2])
    assert tuple(map(int, low.split("."))) <= installed < tuple(map(int, high.split(".")))


# ---------------------------------------------------------------------------------------- image pipelines
# (height, width) -> what qwen_vl_utils' smart_resize gives, worked by hand from its source (0.0.14): round each
# side to a multiple of 28 (at least 28); above the budget scale down by sqrt(area / max) and floor, below it
# scale up by sqrt(min / area) and ceil.
HAND_WORKED = {
    (100, 150, 3136, 12845056): (112, 140),      # round(3.57) = 4, round(5.36) = 5
    (37, 1001, 3136, 12845056): (28, 1008),      # round(1.32) = 1, round(35.75) = 36
    (13, 2000, 3136, 12845056): (28, 1988),      # 13 rounds to 0 -> at least 28; round(71.43) = 71
    (29, 29, 3136, 12845056): (56, 56),          # 784 < 3136: x sqrt(3136 / 841), ceil(2.0) = 2
    (4000, 3000, 3136, 12845056): (4004, 2996),  # 143 x 107 patches: 11995984 inside the budget
    (56, 56, 200704, 6422528): (448, 448),       # Monet's minimum: x 8
    (3000, 4000, 200704, 6422528): (2184, 2912),  # above Monet's maximum: / sqrt(1.868), floor
}


@pytest.mark.parametrize("key, expected", list(HAND_WORKED.items()))
def test_smart_resize_is_qwen_vl_utils_rule(key, expected):
    from latentprobe.model.image_pipeline import smart_resize

    height, width, low, high = key
    assert smart_resize(height, width, 28, low, high) == expected
    try:  # the authors' own function, where it imports (it needs torchvision, which CI does not install)
        from qwen_vl_utils.vision_process import smart_resize as authors
    except Exception:  # noqa: BLE001 - ImportError, or torchvision failing to load
        return
    assert authors(height, width, factor=28, min_pixels=low, max_pixels=high) == expected


def test_each_family_declares_its_image_pipeline_and_runs_it(tiny_subject, tmp_path):
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from latentprobe.model.image_pipeline import LVR_PIPELINE, MONET_PIPELINE
    from latentprobe.model.subjects.families import SUBJECTS_BY_NAME

    assert SUBJECTS_BY_NAME["lvr"].image_pipeline == LVR_PIPELINE
    assert SUBJECTS_BY_NAME["monet"].image_pipeline == MONET_PIPELINE
    assert SUBJECTS_BY_NAME["qwen2.5-vl"].image_pipeline.resize == "processor"
    assert SUBJECTS_BY_NAME["lvr"].describe()["image_pipeline"]["resize"] == "qwen_vl_utils"

    def image_file(height, width, name):
        rng = np.random.default_rng(0)
        ramp = np.linspace(0, 255, width)[None, :, None] * np.ones((height, 1, 3))
        image = Image.fromarray(np.clip(ramp + rng.normal(0, 20, ramp.shape), 0, 255).astype(np.uint8))
        image.save(tmp_path / name)
        return image, Instance(id=name, question="?", answer="A", images=[str(tmp_path / name)], options=["x", "y"])

    # LVR: qwen_vl_utils' budget (up to 16384 x 28 x 28) keeps a 1001 x 1201 image at 1008 x 1204, then the
    # processor (its default budget, 1003520 pixels) resizes it again: the authors' two resizes, not one.
    big, inst = image_file(1001, 1201, "big.png")
    lvr = dataclasses.replace(tiny_subject, image_pipeline=LVR_PIPELINE, image_processor=Qwen2VLImageProcessorPil())
    batch = lvr.encode([inst])
    authors = lvr.image_processor(images=[big.resize((1204, 1008), Image.Resampling.BICUBIC)], return_tensors="pt")
    assert batch.image_grid_thw.tolist() == authors["image_grid_thw"].tolist() == [[1, 64, 78]]
    assert torch.equal(batch.pixel_values, authors["pixel_values"])
    plain = dataclasses.replace(lvr, image_pipeline=None).encode([inst])  # the processor alone: another input
    assert float((plain.pixel_values - batch.pixel_values).abs().max()) > 0.1

    # Monet: at least 256 x 28 x 28 pixels; 37 x 101 grows by sqrt(200704 / 3737) = 7.33: ceil(9.68) = 10 and
    # ceil(26.43) = 27 patches of 28 (its builder gives the processor the same budget)
    small, inst = image_file(37, 101, "small.png")
    monet_processor = Qwen2VLImageProcessorPil(min_pixels=MONET_PIPELINE.min_pixels,
                                               max_pixels=MONET_PIPELINE.max_pixels)
    monet = dataclasses.replace(tiny_subject, image_pipeline=MONET_PIPELINE, image_processor=monet_processor)
    batch = monet.encode([inst])
    authors = monet_processor(images=[small.resize((27 * 28, 10 * 28), Image.Resampling.BICUBIC)],
                              return_tensors="pt")
    assert batch.image_grid_thw.tolist() == [[1, 20, 54]] and torch.equal(batch.pixel_values, authors["pixel_values"])
    assert monet.describe()["image_pipeline"]["min_pixels"] == 256 * 28 * 28


def test_the_manifest_records_the_image_pipeline_and_reentered_rows(small_trace):
    manifest = json.loads((small_trace / "manifest.json").read_text())
    assert manifest["subject"]["image_pipeline"]["resize"] == "processor"
    from latentprobe.runs.store import TraceStore

    index = TraceStore(small_trace).index()
    assert {"n_latent_phases", "reentered_latent"} <= set(index.columns)
    assert (index.n_latent_phases == index.latent_segments.map(len)).all()


def test_ground_resume_refuses_other_settings_and_other_runs(tmp_path, small_trace, capsys):
    common = ["--subject", "tiny", "--limit", "4", "--batch-size", "2", "--max-new-tokens", "4", "--bootstrap", "100"]
    out = tmp_path / "g"
    assert main(["ground", *common, "--out", str(out)]) == 0
    before = pd.read_parquet(out / "grounding.parquet")
    (out / "journal" / "chunk-0000002-grounding.parquet").unlink()  # as if killed before the second batch ended
    assert main(["ground", *common, "--out", str(out)]) == 2  # without --resume: refused, nothing touched
    assert "--resume" in capsys.readouterr().err
    assert main(["ground", *common, "--seed", "1", "--out", str(out), "--resume"]) == 2
    assert "seed is 0 but this run's is 1" in capsys.readouterr().err
    assert main(["ground", *common, "--out", str(out), "--resume"]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(out / "grounding.parquet"), before)
    assert main(["lens", *common[:-2], "--out", str(out), "--resume"]) == 2  # a ground run is not a lens run
    assert "not a lens run" in capsys.readouterr().err
    assert main(["patch", *common, "--out", str(small_trace), "--resume"]) == 2
    assert "not a patch run" in capsys.readouterr().err
