"""Recorder, TraceStore and `trace`: recorded states against a full recompute, resume, failures, bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from latentprobe.data import Instance, builtin_instances, load_jsonl
from latentprobe.model.decoding import LATENT, DecodeConfig, LatentDecoder, replay
from latentprobe.errors import LatentProbeError
from latentprobe.model.recording import Recorder, RecordSpec
from latentprobe.runs.store import TraceStore, TraceWriter
from latentprobe.runs.trace import trace

from decoding_helpers import make_instances

SIZES = [(56, 56), (84, 112), (112, 56)]


def test_recorded_layers_equal_a_full_recompute(tiny_subject, tmp_path):
    instances = make_instances(tmp_path, SIZES)
    batch = tiny_subject.encode(instances)
    decoder = LatentDecoder(tiny_subject, DecodeConfig(max_new_tokens=10))
    with Recorder(decoder, RecordSpec(layers="all", answer=True)) as recorder:
        result = decoder.run(batch)
        records = recorder.records()
    states = replay(tiny_subject, batch, result, output_hidden_states=True)
    n_layers = tiny_subject.num_layers
    assert len(states) == n_layers + 1
    for r, row in enumerate(result.rows):
        positions = [result.prompt_length + j for j, k in enumerate(row.step_kinds) if k == LATENT]
        got = records[r]["latent_layers"]
        assert got.shape == (n_layers + 1, row.n_latent_steps, tiny_subject.hidden_size)
        for layer in range(n_layers + 1):
            torch.testing.assert_close(got[layer], states[layer][r, positions].float(), atol=1e-4, rtol=1e-4)
        # layer 0 at latent positions is exactly the fed-back vector; the final layer one position earlier too
        assert torch.equal(got[0], row.latent_vectors)
        torch.testing.assert_close(states[n_layers][r, [p - 1 for p in positions]], row.latent_vectors,
                                   atol=1e-4, rtol=1e-4)
        image = batch.mm_token_type_ids[r].bool()
        torch.testing.assert_close(records[r]["image_mean"][n_layers], states[n_layers][r, : image.shape[0]][image].mean(0),
                                   atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(records[r]["prompt_last"][0], states[0][r, result.prompt_length - 1],
                                   atol=1e-5, rtol=1e-5)
        # answer positions: from the end token (first input after the latent phase) to the last position run;
        # the last chosen id is never run, so it has no state
        answer = [result.prompt_length + j for j in range(row.n_latent_steps, len(row.generated_ids) - 1)]
        assert records[r]["answer_layers"].shape == (n_layers + 1, len(answer), tiny_subject.hidden_size)
        for layer in range(n_layers + 1):
            torch.testing.assert_close(records[r]["answer_layers"][layer], states[layer][r, answer].float(),
                                       atol=1e-4, rtol=1e-4)


def test_layer_spec_validation(tiny_subject):
    with pytest.raises(LatentProbeError, match="out of range"):
        RecordSpec(layers=[99]).resolve_layers(tiny_subject.num_layers)
    assert RecordSpec(layers=[-1]).resolve_layers(2) == [2]
    assert RecordSpec(layers="all").resolve_layers(2) == [0, 1, 2]


def test_trace_writes_a_readable_store_and_resumes(tiny_subject, tmp_path):
    instances = builtin_instances(6)
    out = tmp_path / "run"
    summary = trace(tiny_subject, instances[:4], out, spec=RecordSpec(layers=[0, 2]), batch_size=3, shard_size=2)
    assert summary.n_ok == 4 and summary.n_entered_latent == 4
    store = TraceStore(out)
    frame = store.index()
    assert list(frame.instance_id) == [i.id for i in instances[:4]]
    assert store.manifest["record"]["layer_ids"] == [0, 2]
    assert store.manifest["subject_fingerprint"] == tiny_subject.fingerprint()
    latents = store.latent_array(frame.record_id)
    assert latents.shape == (4, 4, tiny_subject.hidden_size)
    layer0 = store.latent_array(frame.record_id, "latent_layers", layer=0)
    np.testing.assert_array_equal(latents, layer0)
    # a second run over all six resumes: only the two new ones are decoded
    with pytest.raises(LatentProbeError, match="--resume"):
        trace(tiny_subject, instances, out, spec=RecordSpec(layers=[0, 2]))
    summary = trace(tiny_subject, instances, out, spec=RecordSpec(layers=[0, 2]), resume=True)
    assert summary.n_skipped_resume == 4 and summary.n_ok == 6  # the whole run, not only this session
    frame = TraceStore(out).index()
    assert sorted(frame.instance_id) == sorted(i.id for i in instances)
    assert len(TraceStore(out).manifest["resumed"]) == 1
    # resuming with another seed (or another model) is refused
    with pytest.raises(LatentProbeError, match="cannot resume.*seed"):
        trace(tiny_subject, instances, out, spec=RecordSpec(layers=[0, 2]), resume=True,
              config=DecodeConfig(max_new_tokens=12, seed=3))


def test_batched_trace_equals_unbatched(tiny_subject, tmp_path):
    instances = builtin_instances(5)
    trace(tiny_subject, instances, tmp_path / "a", batch_size=5)
    trace(tiny_subject, instances, tmp_path / "b", batch_size=1)
    a, b = TraceStore(tmp_path / "a"), TraceStore(tmp_path / "b")
    np.testing.assert_allclose(a.latent_array(a.index().record_id), b.latent_array(b.index().record_id), atol=1e-5)


def test_a_failing_instance_is_recorded_and_the_run_goes_on(tiny_subject, tmp_path):
    instances = builtin_instances(3)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    instances.insert(1, Instance(id="bad-image", question="q", answer="red", images=[str(broken)]))
    instances.insert(2, Instance(id="missing-image", question="q", answer="red", images=[str(tmp_path / "nope.png")]))
    summary = trace(tiny_subject, instances, tmp_path / "run", batch_size=4)
    assert summary.n_ok == 3 and summary.n_failed == 2
    frame = TraceStore(tmp_path / "run").index().set_index("instance_id")
    assert frame.loc["bad-image", "status"] == "failed" and "cannot be decoded" in frame.loc["bad-image", "error"]
    assert "not found" in frame.loc["missing-image", "error"]


def test_store_rejects_other_versions_and_half_written_runs(tmp_path):
    with pytest.raises(LatentProbeError, match="not a latentprobe trace folder"):
        TraceStore(tmp_path)
    writer = TraceWriter(tmp_path / "r", {"kind": "trace"})
    writer.add({"instance_id": "a", "status": "ok"}, {"latent": torch.ones(2, 3)})
    writer.close()
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    (next((tmp_path / "r" / "shards").glob("*.safetensors"))).unlink()
    store = TraceStore(tmp_path / "r")
    with pytest.raises(LatentProbeError, match="missing"):
        store.tensor(store.index().record_id[0], "latent")
    manifest["version"] = 999
    (tmp_path / "r" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LatentProbeError, match="version 999"):
        TraceStore(tmp_path / "r")


def test_jsonl_errors_name_the_problem(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"id": "a", "question": "q"}\n')
    with pytest.raises(LatentProbeError, match=r"d.jsonl:1: missing required field\(s\) answer"):
        load_jsonl(path)
    path.write_text("\n")
    with pytest.raises(LatentProbeError, match="holds no instances"):
        load_jsonl(path)
    with pytest.raises(LatentProbeError, match="does not exist"):
        load_jsonl(tmp_path / "absent.jsonl")
    path.write_text('{"id": "a", "question": "q", "answer": "x", "image": "imgs/a.png"}\n')
    assert load_jsonl(path)[0].images == [str(tmp_path / "imgs" / "a.png")]


def _cli(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "latentprobe", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def test_cli_trace_and_bad_input(tmp_path):
    out = tmp_path / "run"
    done = _cli("trace", "--out", str(out), "--limit", "3", "--layers", "0,2")
    assert done.returncode == 0, done.stderr
    assert "3 ok" in done.stdout and str(out) in done.stdout
    again = _cli("trace", "--out", str(out))
    assert again.returncode == 2 and "--resume" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    cases = {
        ("--subject", str(tmp_path / "no-such-folder")): "does not exist",
        ("--subject", "someorg/some-model"): "hub is offline",
        ("--data", str(tmp_path / "absent.jsonl")): "does not exist",
        ("--subject", "tiny", "--protocol", "nope"): "unknown protocol",
    }
    for extra, message in cases.items():
        res = _cli("trace", "--out", str(tmp_path / "x"), *extra)
        assert res.returncode == 2 and message in res.stderr, (extra, res.stderr)


def test_tokenizer_without_protocol_tokens_is_a_clear_error(tiny_subject):
    from latentprobe.model.protocol import LatentProtocol

    proto = LatentProtocol(name="odd", start_token="<|odd_start|>", end_token="<|odd_end|>", pad_token="<|odd|>",
                           stop_rule="fixed", num_steps=2)
    with pytest.raises(LatentProbeError, match="lacks the odd protocol's token"):
        proto.resolve(tiny_subject.tokenizer)


def test_checkpoint_folder_round_trip(tmp_path):
    from latentprobe.model.subjects import load_subject
    from latentprobe.model.subjects.tiny import save_checkpoint

    folder = save_checkpoint(tmp_path / "ckpt")
    subject = load_subject(str(folder), protocol="mirage")
    assert subject.resolved_protocol.start_id == subject.tokenizer.convert_tokens_to_ids("<|latent_start|>")
    # llama is a text backbone since issue 23: a folder whose config says llama but whose weights are Qwen2.5-VL's
    # is refused by the weights check, before a (full-size, random) model is built
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(LatentProbeError, match="weights are not that model's"):
        load_subject(str(folder), protocol="mirage")


def _removed_round_two_shims():
    import importlib
    import sys

    from latentprobe.runs import intervene as intervene_mod, trace as trace_mod

    for old, new, name in (("latentprobe.tracing", trace_mod, "trace"),
                           ("latentprobe.intervening", intervene_mod, "intervene")):
        sys.modules.pop(old, None)
        with pytest.warns(DeprecationWarning, match=f"{old} is deprecated"):
            module = importlib.import_module(old)
        assert getattr(module, name) is getattr(new, name) and name in dir(module)
        with pytest.raises(AttributeError, match="no attribute 'nope'"):
            module.nope


def test_index_of_parts_with_different_columns_equals_pandas_concat_of_each_part(tmp_path):
    """Issue 22: the index joins its parts in Arrow, one conversion per schema (not per part); it must equal
    ``pd.concat`` of every part's own frame (the oracle: a column a part lacks is NaN there, a null inside a part
    None or NaN as pandas reads it), rows in record order; ``decode=()`` keeps the JSON columns as their text."""
    import pandas as pd

    writer = TraceWriter(tmp_path / "r", {"kind": "trace"})
    for k in range(7):  # parts of three schemas, interleaved
        row = {"instance_id": f"i{k}", "status": "ok", "answer_probs": [0.25 * k, 1.0]}
        if k % 3 == 1:
            row |= {"applied": k != 4, "attributes": {"colour": "red", "count": k}, "gold_prob": 0.5}
        if k % 3 == 2:
            row |= {"applied": None, "note": None if k == 5 else "x"}
        writer.add(row, {"latent": torch.full((1, 2), float(k))})
        writer.flush()
    writer.close()
    parts = sorted((tmp_path / "r" / "index").glob("*.parquet"))
    assert len(parts) == 7
    import pyarrow.parquet as pq

    schemas = []
    for part in parts:
        schema = pq.read_schema(part).remove_metadata()
        schemas += [] if any(schema.equals(s) for s in schemas) else [schema]
    assert len(schemas) >= 3  # the case the grouped read must get right (a null column has a type of its own)
    oracle = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    store = TraceStore(tmp_path / "r")
    frame = store.index()
    for column in [c for c in oracle.columns if c.endswith("_json")]:
        oracle[column[:-5]] = oracle[column].map(lambda v: json.loads(v) if isinstance(v, str) else v)
    oracle = oracle.drop(columns=[c for c in oracle.columns if c.endswith("_json")])
    oracle = oracle.sort_values("record_id", ignore_index=True)
    pd.testing.assert_frame_equal(frame, oracle, check_exact=True)
    assert [type(v).__name__ for v in frame.applied] == [type(v).__name__ for v in oracle.applied]
    text = store.index(decode=("answer_probs",))
    assert text.answer_probs.tolist() == oracle.answer_probs.tolist()
    assert text.attributes.dropna().tolist() == [json.dumps(a) for a in oracle.attributes.dropna()]
