"""ILVR: Mirage's token strings, its own protocol. Held against the authors' LatentTemplateLogitsProcessor
(re-implemented here from XD111ds/ILVR src/utils_deepseed.py) and against Mirage run on the same checkpoint."""

import json
import re

import pytest
import torch

from latentprobe.runs.conformance import run_check
from latentprobe.data import builtin_instances
from latentprobe.model.decoding import DecodeConfig, LatentDecoder
from latentprobe.model.protocol import PROTOCOLS
from latentprobe.model.subjects import load_subject

from standins import SCRIPTS, ScriptedOutputs, build_standin, scripted


@pytest.fixture(scope="module")
def ilvr_folder(tmp_path_factory):
    return build_standin("ilvr", tmp_path_factory.mktemp("ilvr") / "ilvr")


def template_allows(sequence: list[int], token: int, start: int, end: int, pad: int, k: int) -> bool:
    """The authors' LatentTemplateLogitsProcessor as a predicate: outside a span pad and end are banned; inside, pad
    until K pads follow the last start, then only the end."""
    starts = [i for i, t in enumerate(sequence) if t == start]
    ends = [i for i, t in enumerate(sequence) if t == end]
    last_start, last_end = (starts[-1] if starts else -1), (ends[-1] if ends else -1)
    if not (last_start != -1 and last_end < last_start):
        return token not in (pad, end)
    n_pad = 0
    for t in sequence[last_start + 1:]:
        if t != pad:
            break
        n_pad += 1
    return token == (pad if n_pad < k else end)


def test_ilvr_has_mirages_tokens_and_another_protocol():
    ilvr, mirage = PROTOCOLS["ilvr"], PROTOCOLS["mirage"]
    assert set(ilvr.token_strings) == set(mirage.token_strings)
    assert (ilvr.stop_rule, ilvr.exit_rule, ilvr.num_steps) == ("fixed", "force_end", 8)
    assert mirage.stop_rule == "end_token" and not mirage.never_in_text
    assert set(ilvr.never_in_text) == {"<|latent_pad|>", "<|latent_end|>"}
    assert "utils_deepseed.py" in ilvr.source


def test_ilvr_output_obeys_the_authors_template_with_interleaved_spans(ilvr_folder):
    subject = load_subject("ilvr", checkpoint=str(ilvr_folder))
    proto = subject.resolved_protocol
    assert proto.num_steps == 8  # config.latent_size, as evaluate_deepseed.py reads K
    batch = subject.encode(builtin_instances(2))
    with ScriptedOutputs(subject, SCRIPTS["ilvr"]):
        result = LatentDecoder(subject, DecodeConfig(max_new_tokens=64)).run(batch)
    for r, row in enumerate(result.rows):
        assert [length for _, length in row.latent_segments] == [8, 8]  # two spans the model opened itself
        assert not row.forced_start and row.latent_exit_ids == [proto.end_id, proto.end_id]
        assert row.text.endswith("Final answer: B")
        prompt = batch.input_ids[r][batch.attention_mask[r].bool()].tolist()
        for j, token in enumerate(row.generated_ids):
            sequence = prompt + row.generated_ids[:j]
            assert template_allows(sequence, token, proto.start_id, proto.end_id, proto.pad_id, 8), (j, token)


def test_ilvr_never_writes_pad_or_end_outside_a_span_where_mirage_does(ilvr_folder):
    script = "A<|latent_end|>Final answer: B"  # a model whose first choice after "A" is the end token
    runs = {}
    for family in ("ilvr", "mirage"):
        subject = load_subject(family, checkpoint=str(ilvr_folder))
        with ScriptedOutputs(subject, script):
            runs[family] = LatentDecoder(subject, DecodeConfig(max_new_tokens=12)).run(
                subject.encode(builtin_instances(1))).rows[0], subject.resolved_protocol
    (ilvr_row, ilvr_proto), (mirage_row, mirage_proto) = runs["ilvr"], runs["mirage"]
    assert ilvr_proto.end_id == mirage_proto.end_id  # one checkpoint, one id
    assert mirage_row.generated_ids[1] == mirage_proto.end_id
    assert ilvr_proto.end_id not in ilvr_row.generated_ids and ilvr_proto.pad_id not in ilvr_row.generated_ids


def test_same_checkpoint_as_mirage_stops_where_the_model_says_as_ilvr_after_k(ilvr_folder):
    counts = {}
    for family in ("ilvr", "mirage"):
        subject = load_subject(family, checkpoint=str(ilvr_folder))
        with ScriptedOutputs(subject, "<|latent_start|><|latent_end|>Final answer: B", latent_steps=3):
            row = LatentDecoder(subject, DecodeConfig(max_new_tokens=32)).run(
                subject.encode(builtin_instances(1))).rows[0]
        counts[family] = row.n_latent_steps
    assert counts == {"ilvr": 8, "mirage": 3}


def test_ilvr_reads_k_from_the_checkpoint_config(tmp_path):
    folder = build_standin("ilvr", tmp_path / "k5")
    config = json.loads((folder / "config.json").read_text())
    config["latent_size"] = 5
    (folder / "config.json").write_text(json.dumps(config))
    subject = load_subject("ilvr", checkpoint=str(folder))
    with ScriptedOutputs(subject, SCRIPTS["ilvr"]):
        row = LatentDecoder(subject, DecodeConfig(max_new_tokens=48)).run(subject.encode(builtin_instances(1))).rows[0]
    assert [length for _, length in row.latent_segments] == [5, 5]


def test_check_passes_on_the_ilvr_standin(ilvr_folder):
    report = run_check("ilvr", str(ilvr_folder), max_new_tokens=64, prepare=lambda subject: scripted(subject, "ilvr"))
    lines = {line.name: line for line in report.lines}
    assert report.ok, report.table()
    assert lines["cache vs recompute"].status == "pass"
    assert lines["answer"].status == "pass" and "'B'" in lines["answer"].detail
    assert all(lines[f"token {t}"].status == "pass" and "config.latent" in lines[f"token {t}"].detail
               for t in ("<|latent_pad|>", "<|latent_start|>", "<|latent_end|>"))
    assert "16 steps in 2 segment(s)" in lines["latent phase"].detail
    # the stand-in's tiny vocabulary cannot hold ids 151665-151667: said, not failed
    assert lines["authors' fixed ids"].status == "warn"
    assert "never chosen outside latent mode" in lines["layout, stop rule"].detail


def test_subjects_lists_the_new_families_with_their_sources(capsys):
    from latentprobe.cli import main

    assert main(["subjects"]) in (0, None)
    out = capsys.readouterr().out
    for name in ("ilvr", "coconut", "codi"):
        assert name in out
    for source in ("utils_deepseed.py", "coconut.py", "test.py"):
        assert source in out
    main(["subjects", "--show", "codi"])
    shown = capsys.readouterr().out  # a table of fields (one per line, long values wrapped)
    assert re.search(r"^backbone\s+text$", shown, re.M) and re.search(r"^source_files\s+.*src/model\.py", shown, re.M)
