"""Hardening (issue 12): every bad input is one line with the right exit code, resume refuses changed settings,
damaged stores are named or repaired, images that cannot be read fail only their own instance."""

from __future__ import annotations

import errno
import json
import os
import shutil

import numpy as np
import pytest
import torch

from latentprobe.cli import build_parser, main
from latentprobe.data import Instance, builtin_instances, load_images, to_rgb, write_jsonl
from latentprobe.errors import LatentProbeError
from latentprobe.model.recording import RecordSpec
from latentprobe.runs.store import TraceStore
from latentprobe.runs.trace import trace


# ----------------------------------------------------------------------------------------- shared material
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad data files, bad checkpoints and a finished trace for the table's {placeholders}."""
    root = tmp_path_factory.mktemp("bad")
    good = builtin_instances(4)
    image = good[0].images[0]
    out = {"root": str(root), "image": image}

    def jsonl(name, rows):
        path = root / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out[name.split(".")[0]] = str(path)

    row = {"id": "q1", "question": "What colour?", "answer": "red", "image": image, "options": ["red", "blue"]}
    jsonl("attrs_list.jsonl", [{**row, "attributes": ["red"]}])
    jsonl("images_number.jsonl", [{**row, "image": None, "images": 3}])
    jsonl("answer_dict.jsonl", [{**row, "answer": {"a": 1}}])
    (root / "binary.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 20)
    out["binary"] = str(root / "binary.jsonl")
    (root / "latin1.jsonl").write_bytes(json.dumps({**row, "question": "Qu\u00e9?"}, ensure_ascii=False).encode("latin-1") + b"\n")
    out["latin1"] = str(root / "latin1.jsonl")
    (root / "a_file").write_text("x")
    out["a_file"] = str(root / "a_file")
    os.symlink(root / "loop_b", root / "loop_a")
    os.symlink(root / "loop_a", root / "loop_b")
    out["loop"] = str(root / "loop_a")
    bad_config = root / "bad_config"
    bad_config.mkdir()
    (bad_config / "config.json").write_text('{"model_type": "qwen2_5_vl", ')
    out["bad_config"] = str(bad_config)
    remote = root / "remote_code"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"model_type": "evil_model",
                                                     "auto_map": {"AutoConfig": "evil.EvilConfig"}}))
    (remote / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    out["remote_code"] = str(remote)
    run = root / "run"
    assert main(["trace", "--limit", "3", "--layers", "0,2", "--batch-size", "2", "--out", str(run), "--quiet"]) == 0
    out["run"] = str(run)
    broken = root / "broken_manifest"
    shutil.copytree(run, broken)
    text = (broken / "manifest.json").read_text()
    (broken / "manifest.json").write_text(text[: len(text) // 2])
    out["broken_manifest"] = str(broken)
    return out


# command (with {placeholders} from `files`), exit code, substring of the one-line message
BAD_INPUTS = [
    # numbers outside their range: refused by the parser (exit 2), never a silent default
    ("trace --limit 0 --out {root}/o", 2, "argument --limit: 0 is out of range: must be >= 1"),
    ("trace --limit -3 --out {root}/o", 2, "argument --limit: -3 is out of range"),
    ("trace --max-new-tokens 0 --out {root}/o", 2, "argument --max-new-tokens: 0 is out of range"),
    ("trace --layers , --out {root}/o", 2, "names no layer"),
    ("trace --layers 1,x --out {root}/o", 2, "is not 'final', 'all' or a list of integers"),
    ("trace --layers -1 --out {root}/o", 2, "layer indices must be >= 0"),
    ("trace --batch-size 0 --out {root}/o", 2, "argument --batch-size: 0 is out of range"),
    ("trace --top-p 2 --out {root}/o", 2, "argument --top-p: 2.0 is out of range: must be in (0, 1]"),
    ("trace --top-p 0 --out {root}/o", 2, "argument --top-p: 0.0 is out of range"),
    ("trace --top-k -1 --out {root}/o", 2, "argument --top-k: -1 is out of range: must be >= 0"),
    ("trace --temperature 0 --out {root}/o", 2, "argument --temperature: 0.0 is out of range: must be > 0"),
    ("trace --temperature nan --out {root}/o", 2, "'nan' is not a finite number"),
    ("trace --seed -1 --out {root}/o", 2, "argument --seed: -1 is out of range"),
    ("trace --seed 1.5 --out {root}/o", 2, "argument --seed: '1.5' is not"),
    ("trace --latent-steps -1 --out {root}/o", 2, "argument --latent-steps: -1 is out of range"),
    ("intervene --target latent --kind noise --scale nan --out {root}/o", 2, "'nan' is not a finite number"),
    ("intervene --target latent --kind noise --scale inf --out {root}/o", 2, "'inf' is not a finite number"),
    ("intervene --target latent --kind noise --scale 1e40 --out {root}/o", 2, "1e+40 is out of range for noise"),
    ("intervene --target latent --kind noise --scale -1 --out {root}/o", 2, "-1 is out of range for noise"),
    ("intervene --target latent --kind noise --scale , --out {root}/o", 2, "names no value"),
    ("intervene --target input --kind image-mask --scale 2 --out {root}/o", 2, "2 is out of range for image-mask"),
    ("intervene --target input --kind image-noise --scale -0.5 --out {root}/o", 2, "out of range for image-noise"),
    ("intervene --target text --kind text-truncate --scale 1.5 --out {root}/o", 2, "out of range for text-truncate"),
    ("intervene --target latent --kind drop --scale 0.5 --out {root}/o", 2, "must be a whole number"),
    ("intervene --target latent --kind zero --scale 1 --out {root}/o", 2, "none of the kinds zero takes a scale"),
    ("intervene --target latent --kind noise --steps , --out {root}/o", 2, "names no step"),
    ("intervene --target latent --kind noise --steps -1 --out {root}/o", 2, "latent steps count from 0"),
    ("intervene --target latent --kind noise --bootstrap 0 --out {root}/o", 2, "argument --bootstrap: 0 is out of"),
    ("intervene --target latent --kind noise --semantics sideways --out {root}/o", 2, "is not a list of recompute"),
    ("intervene --target latent --kind noise --layer 0 --out {root}/o", 2, "argument --layer: 0 is out of range"),
    ("intervene --target latent --kind , --out {root}/o", 2, "--kind names no intervention"),
    ("intervene --target attention --kind knockout --attention-layers -1 --out {root}/o", 2,
     "decoder blocks count from 0"),
    ("intervene --target attention --kind knockout --attention-layers 1,x --out {root}/o", 2, "'x' is not an integer"),
    ("intervene --target attention --kind knockout --scale 2 --out {root}/o", 2, "none of the kinds knockout takes"),
    ("intervene --target attention --kind knockout --steps 0 --out {root}/o", 2, "a knockout would ignore them"),
    ("intervene --target input --kind image-blank --layer 2 --out {root}/o", 2, "input interventions would ignore"),
    ("intervene --target text --kind text-swap --steps 1 --out {root}/o", 2, "text interventions would ignore"),
    ("patch --layers -1 --out {root}/o", 2, "layer indices must be >= 0"),
    ("patch --layers final --out {root}/o", 2, "'final' is not a grid"),
    ("patch --steps -1 --out {root}/o", 2, "latent steps count from 0"),
    ("patch --out {a_file}", 2, "is a file, not a folder"),
    ("lens --layers -2 --out {root}/o", 2, "layer indices must be >= 0"),
    ("similarity {run} --bootstrap 0 --out {root}/o", 2, "argument --bootstrap: 0 is out of range"),
    ("report {run} --bootstrap 0 --out {root}/o", 2, "argument --bootstrap: 0 is out of range"),
    ("probe {run} --labels , --out {root}/o", 2, "argument --labels: ',' names nothing"),
    ("probe {run} --labels colour --folds 1 --out {root}/o", 2, "argument --folds: 1 is out of range"),
    ("data make transform --image-size 0 --out {root}/o", 2, "argument --image-size: 0 is out of range"),
    ("data make transform --n 0 --out {root}/o", 2, "argument --n: 0 is out of range"),
    ("data make transform --test-fraction 1 --out {root}/o", 2, "strictly between 0 and 1"),
    ("demo --instances 1 --out {root}/o", 2, "--instances: 1 is out of range"),
    # output folders that cannot be one
    ("trace --out {a_file}", 2, "is a file, not a folder"),
    ("trace --out {loop}", 2, "a symbolic link loop"),
    ("trace --out {a_file}/sub", 2, "is a file"),
    # data files that are not what they should be
    ("trace --data {binary} --out {root}/o", 2, "is binary, not JSONL text"),
    ("trace --data {latin1} --out {root}/o", 2, "not UTF-8 text"),
    ("trace --data {attrs_list} --out {root}/o", 2, "'attributes' must be a JSON object, got list"),
    ("trace --data {images_number} --out {root}/o", 2, "'images' must be a path or a list of paths, got 3"),
    ("trace --data {answer_dict} --out {root}/o", 2, "'answer' must be a string, got dict"),
    # checkpoints: a broken config, code that would run on load
    ("trace --subject {bad_config} --protocol lvr --out {root}/o", 2, "config.json is not valid JSON"),
    ("trace --subject {remote_code} --protocol lvr --out {root}/o", 2, "never runs a checkpoint's own code"),
    # resume: every setting that changes what is recorded is named with both values
    ("trace --limit 3 --layers 0,1 --batch-size 2 --resume --out {run}", 2, "its record.layer_ids[1] is 2 but this "
                                                                            "run's is 1"),
    ("trace --limit 3 --layers 0,2 --max-new-tokens 5 --resume --out {run}", 2,
     "its decode.max_new_tokens is 12 but this run's is 5"),
    ("trace --limit 3 --layers 0,2 --image-states all --resume --out {run}", 2, "its record.image is 'mean' but "
                                                                                "this run's is 'all'"),
    ("trace --limit 3 --layers 0,2 --seed 1 --resume --out {run}", 2, "its seed is 0 but this run's is 1"),
    ("trace --limit 3 --layers 0,2 --sample --resume --out {run}", 2, "its decode.do_sample is False"),
    ("trace --limit 3 --layers 0,2 --latent-steps 2 --resume --out {run}", 2, "its decode.latent_steps is None"),
    ("trace --limit 3 --layers 0,2 --protocol mirage --resume --out {run}", 2, "cannot resume"),
    ("trace --limit 3 --out {run}", 2, "already holds a run -- pass --resume"),
    # damaged stores
    ("trace --limit 3 --layers 0,2 --resume --out {broken_manifest}", 2, "manifest.json is damaged (not valid JSON"),
    ("similarity {broken_manifest} --out {root}/o", 2, "manifest.json is damaged"),
    ("organisms train bottleneck --out {weights}", 2, "is the package's shipped weights folder"),
]
if torch.cuda.is_available():  # the CPU-only case cannot be shown on a machine with a GPU
    BAD_INPUTS.append(("trace --device cuda:99 --out {root}/o", 2, "GPU(s) are visible"))
else:
    BAD_INPUTS.append(("trace --device cuda --out {root}/o", 2, "use --device cpu or install a CUDA torch"))


@pytest.mark.parametrize("command,code,message", BAD_INPUTS, ids=[c for c, _, _ in BAD_INPUTS])
def test_bad_input_is_one_line(files, capsys, command, code, message):
    from latentprobe.organisms import weights_dir

    argv = command.format(**files, weights=weights_dir()).split()
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse's own errors
        status = exc.code
    err = capsys.readouterr().err.strip()
    assert status == code, err
    assert message in err
    assert "Traceback" not in err
    last = err.splitlines()[-1]  # argparse prints its usage above the one line that says what is wrong
    assert last.startswith("latentprobe") and message in last


def test_every_option_has_a_meaning_and_its_default_in_help():
    parser = build_parser()
    import argparse

    def walk(p, name):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child_name, child in action.choices.items():
                    yield from walk(child, f"{name} {child_name}")
            elif action.option_strings and action.dest != "help":
                yield name, action, p

    seen = 0
    for name, action, p in walk(parser, "latentprobe"):
        assert action.help, f"{name} {action.option_strings[0]} has no help"
        text = p.format_help()
        assert action.option_strings[-1] in text
        seen += 1
    assert seen > 60
    help_text = parser._subparsers._group_actions[0].choices["trace"].format_help()
    assert "(default: 8)" in help_text and "(default: 0)" in help_text  # --batch-size, --seed


def test_full_disk_and_read_only_are_one_line(files, capsys, monkeypatch):
    import latentprobe.runs.store

    def full(path, write):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(latentprobe.runs.store, "atomic_write_json", full)
    status = main(["trace", "--limit", "2", "--out", f"{files['root']}/full", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert status == 1 and len(err.splitlines()) == 1
    assert "No space left on device" in err and "disk is full" in err and "manifest.json" in err

    def read_only(path, write):
        raise PermissionError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(latentprobe.runs.store, "atomic_write_json", read_only)
    status = main(["trace", "--limit", "2", "--out", f"{files['root']}/ro", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert status == 1 and "read-only" in err and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------------------- images
def test_sixteen_bit_grey_png_scales_instead_of_clipping(tmp_path):
    from PIL import Image

    # A hand-made 16-bit ramp: v -> round(v / 257) is the exact 16-to-8-bit map (65535 -> 255, 257k -> k).
    values = np.array([[0, 257, 32896, 65535], [128, 1000, 40000, 65279]], dtype=np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as img:
        assert img.mode.startswith("I")  # PIL's own convert("RGB") would make all but 0 and 128 white
        assert np.asarray(img.convert("RGB"))[0, 2, 0] == 255
    inst = Instance(id="a", question="q", answer="x", images=[str(path)])
    rgb = np.asarray(load_images(inst)[0])
    expected = np.rint(values / 257.0).astype(np.uint8)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 4, 3)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], expected)
    assert expected.tolist() == [[0, 1, 128, 255], [0, 4, 156, 254]]


def test_float_images_are_refused_with_a_reason():
    from PIL import Image

    from latentprobe.errors import InstanceError

    with pytest.raises(InstanceError, match="floating-point pixels"):
        to_rgb(Image.fromarray(np.ones((2, 2), dtype=np.float32)))


def test_unreadable_image_and_decompression_bomb_fail_only_their_instance(tmp_path, tiny_subject, monkeypatch):
    from PIL import Image

    instances = builtin_instances(4)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    bomb = tmp_path / "bomb.png"
    Image.new("L", (200, 200)).save(bomb)
    # 40,000 pixels > 2 x 5,000: a "bomb" at this limit, while the 56 x 56 images stay below it
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    instances[1].images, instances[2].images = [str(broken)], [str(bomb)]
    summary = trace(tiny_subject, instances, tmp_path / "run", batch_size=4)
    assert (summary.n_ok, summary.n_failed) == (2, 2)
    reasons = dict(summary.failures)
    assert "cannot be decoded" in reasons[instances[1].id]
    assert "too large to decode safely" in reasons[instances[2].id]
    # and a resume gets past them (they are done: failed with their reason, not retried forever)
    again = trace(tiny_subject, instances, tmp_path / "run", batch_size=4, resume=True)
    assert again.n_skipped_resume == 4 and again.n_failed == 2


def test_image_swap_with_an_unreadable_donor_fails_only_that_pair(tmp_path, tiny_subject):
    from latentprobe.runs.intervene import intervene
    from latentprobe.interventions import make_interventions

    instances = builtin_instances(4)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    instances[2].images = [str(broken)]
    ivs = make_interventions("input", ["image-swap"], seed=0)
    intervene(tiny_subject, instances, ivs, tmp_path / "iv", n_boot=100)  # today: TypeError on the donor
    from latentprobe.interventions import derangement

    recipients = [instances[i].id for i, d in enumerate(derangement(4, 0)) if d == 2]
    rows = TraceStore(tmp_path / "iv").index()
    rows = rows[(rows.intervention == ivs[0].name) & rows.instance_id.isin(recipients)]  # its placebo needs no donor
    # the pair whose donor failed is never an ordinary result: absent, failed, or marked as not applied
    not_applied = ("applied" in rows.columns) and not rows.applied.fillna(False).astype(bool).any()
    assert len(rows) == 0 or (rows.status != "ok").all() or not_applied


# ----------------------------------------------------------------------------------------- resume settings
def test_resume_names_every_changed_setting(tmp_path, tiny_subject):
    from latentprobe.model.decoding import DecodeConfig

    instances = builtin_instances(3)
    out = tmp_path / "run"
    trace(tiny_subject, instances, out, spec=RecordSpec(layers=[0, 1]), batch_size=2)
    changes = {
        "record.layer_ids[1] is 1 but this run's is 2": dict(spec=RecordSpec(layers=[0, 2])),
        "record.answer is False but this run's is True": dict(spec=RecordSpec(layers=[0, 1], answer=True)),
        "decode.top_k is 0 but this run's is 5": dict(config=DecodeConfig(max_new_tokens=12, top_k=5),
                                                     spec=RecordSpec(layers=[0, 1])),
    }
    for message, kwargs in changes.items():
        with pytest.raises(LatentProbeError, match=message.replace("[", r"\[").replace("]", r"\]")):
            trace(tiny_subject, instances, out, resume=True, batch_size=2, **kwargs)
    # the same settings resume; another batch size is allowed (and recorded) -- it is not a recorded setting
    summary = trace(tiny_subject, builtin_instances(4), out, spec=RecordSpec(layers=[0, 1]), batch_size=3,
                    resume=True)
    assert summary.n_skipped_resume == 3 and summary.n_ok == 4
    manifest = TraceStore(out).manifest
    assert manifest["batching"]["batch_size"] == 2 and manifest["resumed"][-1]["batching"]["batch_size"] == 3


def test_resumed_finished_run_reports_its_real_accuracy(tmp_path, tiny_subject):
    instances = builtin_instances(4)
    first = trace(tiny_subject, instances, tmp_path / "run")
    again = trace(tiny_subject, instances, tmp_path / "run", resume=True)
    assert again.n_skipped_resume == 4 and again.n_ok == 4
    assert again.accuracy == first.accuracy and not np.isnan(again.accuracy)
    assert "chance 0.250" in again.accuracy_line()


def test_at_chance_follows_the_exact_binomial_test():
    from scipy.stats import binomtest

    from latentprobe.runs.trace import at_chance

    for k, n in [(12, 48), (19, 48), (20, 48), (40, 48), (0, 8)]:
        assert at_chance(k, n, 0.25) == (binomtest(k, n, 0.25, alternative="greater").pvalue >= 0.05)
    assert at_chance(12, 48, 0.25) and not at_chance(40, 48, 0.25)


# ----------------------------------------------------------------------------------------- damaged stores
def _six_records(tmp_path, tiny_subject):
    """A trace of six instances in three shards of two, and its tensors keyed by instance."""
    instances = builtin_instances(6)
    out = tmp_path / "run"
    trace(tiny_subject, instances, out, spec=RecordSpec(layers=[0, 2]), batch_size=2, shard_size=2)
    return instances, out, _latents_by_instance(out)


def _latents_by_instance(out):
    store = TraceStore(out)
    frame = store.index()
    # clone: a tensor read from a shard may share memory with the file, which a test then damages
    return {r.instance_id: store.tensor(r.record_id, "latent").clone() for r in frame.itertuples()}


def test_truncated_shard_is_named_and_resume_reruns_exactly_its_instances(tmp_path, tiny_subject):
    instances, out, before = _six_records(tmp_path, tiny_subject)
    shard = sorted((out / "shards").glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    store = TraceStore(out)
    record = store.index().iloc[2].record_id
    with pytest.raises(LatentProbeError, match=f"shard .*{shard.stem}.* is damaged"):
        store.tensor(record, "latent")
    summary = trace(tiny_subject, instances, out, spec=RecordSpec(layers=[0, 2]), batch_size=2, shard_size=2,
                    resume=True)
    assert summary.n_skipped_resume == 4 and summary.n_ok == 6  # the two of the damaged shard ran again
    assert any("damaged shard" in w for w in summary.warnings)
    after = _latents_by_instance(out)
    assert sorted(after) == sorted(before) and len(TraceStore(out).index()) == 6  # none lost, none twice
    for iid in before:
        torch.testing.assert_close(after[iid], before[iid], rtol=0, atol=0)
    assert len(list((out / "damaged").glob("*"))) == 2  # the shard and its index part, set aside


def test_deleted_index_part_is_reported_and_rerun(tmp_path, tiny_subject):
    instances, out, before = _six_records(tmp_path, tiny_subject)
    sorted((out / "index").glob("*.parquet"))[0].unlink()
    state = TraceStore(out).completeness()
    assert (state["expected"], state["present"]) == (6, 4)
    assert "holds 4 of the 6 instances" in state["warnings"][0]
    summary = trace(tiny_subject, instances, out, spec=RecordSpec(layers=[0, 2]), batch_size=2, shard_size=2,
                    resume=True)
    assert summary.n_skipped_resume == 4 and TraceStore(out).completeness()["warnings"] == []
    after = _latents_by_instance(out)
    for iid in before:
        torch.testing.assert_close(after[iid], before[iid], rtol=0, atol=0)


def test_truncated_index_part_is_named_then_repaired(tmp_path, tiny_subject):
    instances, out, before = _six_records(tmp_path, tiny_subject)
    part = sorted((out / "index").glob("*.parquet"))[2]
    part.write_bytes(part.read_bytes()[:40])
    with pytest.raises(LatentProbeError, match=f"index part .*{part.name} is damaged"):
        TraceStore(out).index()
    trace(tiny_subject, instances, out, spec=RecordSpec(layers=[0, 2]), batch_size=2, shard_size=2, resume=True)
    assert sorted(_latents_by_instance(out)) == sorted(before)


def test_corrupt_manifest_is_named(tmp_path, tiny_subject):
    _, out, _ = _six_records(tmp_path, tiny_subject)
    (out / "manifest.json").write_text('{"format": "latentprobe-trace", ')
    with pytest.raises(LatentProbeError, match="manifest.json is damaged"):
        TraceStore(out)


def test_stale_temporary_files_are_removed_on_resume(tmp_path, tiny_subject):
    instances, out, _ = _six_records(tmp_path, tiny_subject)
    stale = [out / "shards" / ".w0-00009.safetensors.abc.tmp", out / "index" / ".w0-00009.parquet.x.tmp",
             out / ".manifest.json.y.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    trace(tiny_subject, instances, out, spec=RecordSpec(layers=[0, 2]), batch_size=2, shard_size=2, resume=True)
    assert not any(p.exists() for p in stale)


def test_index_rows_carry_their_shards_size_and_checksum(tmp_path, tiny_subject):
    import hashlib

    _, out, _ = _six_records(tmp_path, tiny_subject)
    frame = TraceStore(out).index()
    for row in frame.itertuples():
        shard = out / "shards" / f"{row.shard}.safetensors"
        assert row.shard_bytes == shard.stat().st_size
        assert row.shard_sha256 == hashlib.sha256(shard.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------- determinism
def test_resume_is_bit_identical_when_the_batch_size_does_not_divide_the_shard(tmp_path, tiny_subject):
    """Batches are cut from the full instance list, so a resumed run decodes each instance in the same batch."""
    instances = builtin_instances(8)
    spec = RecordSpec(layers=[0, 2])
    trace(tiny_subject, instances, tmp_path / "whole", spec=spec, batch_size=3, shard_size=2)
    reference = _latents_by_instance(tmp_path / "whole")
    # an interrupted run: killed after its second shard (instances 0-3), in the middle of the batch [3, 4, 5]
    shutil.copytree(tmp_path / "whole", tmp_path / "part")
    for name in ("w0-00002", "w0-00003"):
        (tmp_path / "part" / "index" / f"{name}.parquet").unlink()
        (tmp_path / "part" / "shards" / f"{name}.safetensors").unlink()
    summary = trace(tiny_subject, instances, tmp_path / "part", spec=spec, batch_size=3, shard_size=2, resume=True)
    assert summary.n_skipped_resume == 4
    resumed = _latents_by_instance(tmp_path / "part")
    assert sorted(resumed) == sorted(reference)
    for iid in reference:
        torch.testing.assert_close(resumed[iid], reference[iid], rtol=0, atol=0)


def test_organism_default_data_is_its_own_held_out_split():
    from latentprobe.cli import organism_default_data
    from latentprobe.data import load_jsonl

    data = organism_default_data("organism-bottleneck", 5)
    instances = load_jsonl(data)
    assert len(instances) == 5 and {i.split for i in instances} == {"test"} and {i.task for i in instances} == {
        "transform"}
    from PIL import Image

    with Image.open(instances[0].images[0]) as img:
        assert img.size == (112, 112)


def test_mismatched_image_size_is_warned(tmp_path):
    from latentprobe.model.conditions import condition_warnings
    from latentprobe.data import load_jsonl
    from latentprobe.model.subjects import load_subject
    from latentprobe.data.tasks import make_task

    subject = load_subject("organism-bottleneck")
    small = load_jsonl(make_task("transform", n=4, seed=0, out_dir=tmp_path / "d", image_size=56))
    warnings = condition_warnings(subject, small)
    assert len(warnings) == 1 and "expects 112x112-pixel images" in warnings[0] and "56x56" in warnings[0]
    from latentprobe.cli import organism_default_data

    assert condition_warnings(subject, load_jsonl(organism_default_data("organism-bottleneck", 4))) == []
    assert "random weights" in condition_warnings(load_subject("tiny"), small)[0]


def test_organisms_train_defaults_to_a_new_folder(monkeypatch, capsys, tmp_path):
    import latentprobe.organisms as organisms

    seen = {}

    class Result:
        metrics = {"test_accuracy": 0.9}
        folder = "x"

    def fake_train(name, out_dir, seed):
        seen["out"] = out_dir
        return Result()

    monkeypatch.setattr(organisms, "train_organism", fake_train)
    monkeypatch.chdir(tmp_path)
    assert main(["organisms", "train", "shortcut", "--seed", "3"]) == 0
    assert seen["out"] == "organisms/shortcut-seed3"
    assert main(["organisms", "train", "shortcut", "--overwrite-shipped"]) == 0
    assert seen["out"] == organisms.weights_dir()


# ----------------------------------------------------------------------------------------- figures
def test_one_colour_per_subject_and_a_forest_one_screen_tall(tmp_path):
    import pandas as pd
    from PIL import Image

    from latentprobe import figures

    organisms = [f"organism-{n}" for n in ("bottleneck", "shortcut", "direct", "mirage", "lvr", "capimagine")]
    colours = [figures.subject_colour(s) for s in organisms + ["tiny"]]
    assert len(set(colours)) == len(colours)  # every shipped subject has its own colour
    assert figures.subject_colour("organism-lvr") == figures.subject_colour("lvr")  # the organism and its family
    assert figures.subject_colour("someone-else") == figures.subject_colour("someone-else")
    rng = np.random.default_rng(0)
    rows = [dict(subject=s, target=t, intervention=iv, metric=m, estimate=e, ci_low=e - 0.1, ci_high=e + 0.1, n=48)
            for s in organisms for t, iv in [("latent", "noise"), ("latent", "zero"), ("latent", "patch"),
                                             ("input", "image-swap"), ("input", "image-blank"), ("text", "text-swap")]
            for m in ("flip_rate", "accuracy_change", "NIE_correct") for e in [float(rng.uniform(-0.5, 0.5))]]
    paths = figures.plot_effects_forest(pd.DataFrame(rows), tmp_path / "forest", reference_lines={"flip_rate": 0.1})
    width, height = Image.open([p for p in paths if p.suffix == ".png"][0]).size
    assert height < 1400 and width < 2400  # 108 estimates: grouped rows, not one 3,400-pixel column


@pytest.mark.slow
def test_held_out_data_are_the_test_split_of_the_training_data():
    """The demo's data (written without the 1,800 training images) are the organisms' own test split."""
    from pathlib import Path

    from latentprobe.data import load_jsonl
    from latentprobe.organisms.recipes import ORGANISMS
    from latentprobe.organisms.training import organism_data, organism_held_out_data

    full = load_jsonl(organism_data(ORGANISMS["bottleneck"]), split="test")[:48]
    held_out = load_jsonl(organism_held_out_data(ORGANISMS["bottleneck"], 48))
    assert [i.id for i in held_out] == [i.id for i in full]
    for a, b in zip(held_out, full):
        assert (a.question, a.answer, a.options, a.attributes) == (b.question, b.answer, b.options, b.attributes)
        assert Path(a.images[0]).read_bytes() == Path(b.images[0]).read_bytes()


def test_report_prints_the_verdict_table_and_warns_of_an_incomplete_run(tiny_subject, capsys, tmp_path):
    run = tmp_path / "partial"
    trace(tiny_subject, builtin_instances(3), run, shard_size=2)
    sorted((run / "index").glob("*.parquet"))[-1].unlink()  # the last index part is lost: 2 of 3 remain
    assert TraceStore(run).completeness()["present"] == 2
    assert main(["report", str(run), "--out", str(tmp_path / "report"), "--bootstrap", "100"]) == 0
    out = capsys.readouterr().out
    assert "verdict per subject and finding" in out and "report.html" in out
    assert "holds 2 of the 3 instances" in out
    from latentprobe.cli import verdict_lines

    for line in verdict_lines(tmp_path / "report" / "verdicts.csv"):  # the same table demo prints
        assert line in out


def test_probe_runs_on_the_readmes_own_tiny_trace(tmp_path, capsys):
    # `trace --subject tiny` then `probe --labels colour`: 8 instances, some colours seen once or twice
    assert main(["trace", "--subject", "tiny", "--out", str(tmp_path / "t"), "--quiet"]) == 0
    assert main(["probe", str(tmp_path / "t"), "--labels", "colour", "--out", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "random weights" in out and "AT CHANCE" in out  # the trace said what its answers are worth
    probe_lines = [line for line in out.splitlines() if line.startswith("colour")]
    assert probe_lines and not any("step -1" in line for line in probe_lines)
    assert any("image_mean" in line for line in probe_lines)


def test_analyses_write_outside_the_tracked_figures_folder():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "analyses" / "_common.py"
    spec = importlib.util.spec_from_file_location("analyses_common", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.parser("x").parse_args([])
    assert Path(args.figures).parts[0] != "figures" and Path(args.runs).parts[0] != "figures"


def test_subjects_with_a_default_hub_id_do_not_say_checkpoint_required(capsys):
    assert main(["subjects"]) == 0
    table = capsys.readouterr().out.split("protocols:")[0]  # the subjects table, before the protocols list
    lines = {line.split()[0]: line for line in table.splitlines() if line.strip()}
    for family in ("monet", "lvr", "mirage", "capimagine", "qwen2.5-vl"):
        assert "hub default" in lines[family] and "required" not in lines[family]
    assert "built in" in lines["tiny"]
