"""The text organisms: the hops task generator, the shipped subjects, train/decode consistency, the causal
structure each one's masks build in, and (slow) `demo --text` deciding both as built."""

import json

import pytest
import torch

from latentprobe.data.tasks.hops import SYMBOLS, hops_instances, split_of
from latentprobe.errors import LatentProbeError
from latentprobe.interventions import LatentNoise, LatentStats, PinLatents, RowBinding
from latentprobe.model.decoding import DecodeConfig, LatentDecoder
from latentprobe.model.subjects import SUBJECTS, _register_builtin_families, load_subject
from latentprobe.organisms.text import (N_TEST, WEIGHTS_DIR, encode_rows, shipped_text_organisms,
                                        text_organism_data, text_unroll, train_text_organism)
from latentprobe.organisms.text_recipes import TEXT_ORGANISMS
from latentprobe.organisms.truth import both_directions, expected_matrix

TEXT = list(TEXT_ORGANISMS)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster (tests/conftest.py)


@pytest.fixture(scope="module")
def subjects():
    return {name: load_subject(f"organism-{name}") for name in TEXT}


@pytest.fixture(scope="module")
def held_out():
    return text_organism_data(TEXT_ORGANISMS["text-routed"], "test", 24)


# ----------------------------------------------------------------------------------------------- the task

def test_hops_questions_follow_their_arrows_and_are_seeded():
    items = hops_instances(50, seed=3, split="train", n_symbols=6, hops=3)
    for inst in items:
        arrows = dict(a.split(">") for a in inst.question.split(" . ")[0].split())
        assert sorted(arrows) == sorted(arrows.values()) == sorted(SYMBOLS[:6])  # a permutation of the names
        chain = [inst.attributes["start"]]
        for _ in range(3):
            chain.append(arrows[chain[-1]])
        assert inst.attributes["chain"] == chain and inst.answer == chain[-1] == inst.attributes["answer"]
        assert inst.options == list(SYMBOLS[:6]) and inst.gold_letter is not None
        assert f"start at {chain[0]} , follow 3 arrows ?" in inst.question
    again = hops_instances(50, seed=3, split="train", n_symbols=6, hops=3)
    assert [i.question for i in items] == [i.question for i in again]
    assert [i.question for i in hops_instances(20, seed=3, split="train", n_symbols=6, hops=3)] == \
        [i.question for i in items[:20]]  # the first m of n are the m
    assert [i.question for i in hops_instances(20, seed=4, split="train", n_symbols=6, hops=3)] != \
        [i.question for i in items[:20]]
    assert len({i.question for i in items}) == len(items) and len({i.id for i in items}) == len(items)


def test_train_and_held_out_splits_are_disjoint():
    train = hops_instances(3000, seed=0, split="train")
    test = hops_instances(600, seed=0, split="test")
    assert not {i.question for i in train} & {i.question for i in test}
    assert {split_of(i.question) for i in train} == {"train"} and {split_of(i.question) for i in test} == {"test"}
    assert {i.split for i in test} == {"test"}


@pytest.mark.parametrize("kwargs", [dict(n=0), dict(n=5, split="dev"), dict(n=5, n_symbols=1),
                                    dict(n=5, hops=0), dict(n=5, n_symbols=99)])
def test_bad_task_settings_are_refused(kwargs):
    with pytest.raises(LatentProbeError):
        hops_instances(**kwargs)


# ----------------------------------------------------------------------------------------------- the subjects

def test_text_organisms_are_shipped_registered_small_and_recorded():
    _register_builtin_families()
    assert shipped_text_organisms() == TEXT
    metrics = json.loads((WEIGHTS_DIR / "metrics.json").read_text())
    for name in TEXT:
        spec = SUBJECTS[f"organism-{name}"]
        assert spec.backbone == "text" and spec.protocol_name == name
        assert (WEIGHTS_DIR / f"{name}.safetensors").stat().st_size < 1_000_000
        training = metrics[name]["training"]
        assert training["test_accuracy"] >= 0.95 and training["n_test"] == N_TEST
        assert training["chance"] == 1 / 8 and training["train_seconds"] < 600
        record = json.loads((WEIGHTS_DIR / f"{name}.json").read_text())
        assert record["training"]["history"] and record["protocol"]["name"] == name


def test_text_organisms_load_offline_as_text_subjects(subjects):
    _register_builtin_families()
    routed, bypass = subjects["text-routed"], subjects["text-bypass"]
    assert routed.text_only and bypass.text_only and routed.model.config.model_type == "gpt2"
    assert routed.protocol.answer_mask == "answer_blind_to_prompt"
    assert bypass.protocol.answer_mask == "latents_blind_to_prompt+answer_blind_to_latents"
    assert routed.prompt_style.force_latent_start and not bypass.prompt_style.force_latent_start
    instances, source = SUBJECTS["organism-text-routed"].default_instances(limit=5)
    assert [i.split for i in instances] == ["test"] * 5 and "hops" in source
    with pytest.raises(LatentProbeError, match="protocol"):
        load_subject("organism-text-routed", protocol="coconut")


@pytest.mark.parametrize("name", TEXT)
def test_decoder_reproduces_the_training_computation_and_answers(subjects, held_out, name):
    """The unrolled training forward and LatentDecoder give the same answer-slot logits; the decoder's answers
    are right (the shipped organisms score 1.0 on the 600 held-out questions)."""
    subject, recipe = subjects[name], TEXT_ORGANISMS[name]
    rows = encode_rows(subject, recipe, held_out)
    with torch.no_grad():
        train_logits = text_unroll(subject, recipe, rows).answer_logits(rows.answer_slot)
    result = LatentDecoder(subject, DecodeConfig(max_new_tokens=subject.max_new_tokens)).run(subject.encode(held_out))
    decoder_logits = torch.stack([row.answer_logits for row in result.rows])
    torch.testing.assert_close(decoder_logits, train_logits, atol=1e-4, rtol=1e-4)
    assert [row.n_latent_steps for row in result.rows] == [3] * len(held_out)
    from latentprobe.runs.common import row_record

    records = [row_record(subject, inst, row) for inst, row in zip(held_out, result.rows)]
    assert sum(r["correct"] for r in records) >= 0.9 * len(held_out)


def _clean(subject, instances, prompts=None):
    decoder = LatentDecoder(subject, DecodeConfig(max_new_tokens=subject.max_new_tokens))
    return decoder, decoder.run(subject.encode(instances, prompts=prompts))


def test_routed_answer_sees_the_question_only_through_its_latents(subjects, held_out):
    """With the latents pinned to their clean values, another question cannot change the answer (NDE = 0
    exactly); letting the latents follow the new question does."""
    subject = subjects["text-routed"]
    decoder, clean = _clean(subject, held_out)
    swapped = [subject.prompt_text(inst, question=donor.question) for inst, donor in
               zip(held_out, held_out[1:] + held_out[:1])]
    pin = PinLatents(source="clean")
    edits = [pin.bind(RowBinding(r.instance_id, forced=r.latent_vectors)) for r in clean.rows]
    pinned = decoder.run(subject.encode(held_out, prompts=swapped), edits)
    for a, b in zip(clean.rows, pinned.rows):
        torch.testing.assert_close(a.answer_logits, b.answer_logits, atol=1e-5, rtol=1e-5)
    free = decoder.run(subject.encode(held_out, prompts=swapped))
    assert sum(a.text != b.text for a, b in zip(clean.rows, free.rows)) >= len(held_out) // 2


def test_bypass_latents_are_one_vector_and_out_of_the_answers_reach(subjects, held_out):
    subject = subjects["text-bypass"]
    decoder, clean = _clean(subject, held_out)
    first = clean.rows[0].latent_vectors
    assert all(torch.equal(row.latent_vectors, first) for row in clean.rows)  # whatever the question
    stats = LatentStats.from_vectors(torch.cat([r.latent_vectors for r in clean.rows]) +
                                     torch.randn(3 * len(held_out), first.shape[-1], generator=torch.Generator().manual_seed(0)))
    noise = LatentNoise(scale=10.0, seed=3)
    edits = [noise.bind(RowBinding(r.instance_id, clean=r.latent_vectors, stats=stats)) for r in clean.rows]
    noisy = decoder.run(subject.encode(held_out), edits)
    for a, b in zip(clean.rows, noisy.rows):
        assert (a.latent_vectors - b.latent_vectors).norm() > 1.0
        torch.testing.assert_close(a.answer_logits, b.answer_logits, atol=1e-5, rtol=1e-5)
        assert a.text == b.text


@pytest.mark.parametrize("name", TEXT)
def test_check_passes_on_the_text_organisms(name):
    from latentprobe.runs.conformance import run_check

    report = run_check(f"organism-{name}")
    assert report.ok, report.table()
    assert "text-only" in {line.name: line for line in report.lines}["architecture"].detail


def test_text_truth_exhibits_both_causal_findings_both_ways():
    matrix = expected_matrix([f"organism-{name}" for name in TEXT])
    assert set(matrix.finding) == {"input_latent", "latent_answer"}
    directions = both_directions(matrix)
    assert directions["input_latent"] and directions["latent_answer"]


def test_text_training_is_deterministic_for_a_seed():
    def weights(seed):
        result = train_text_organism("text-routed", seed=seed, steps=3, n_train=64)
        return {k: v.clone() for k, v in result.subject.model.state_dict().items()}

    first, again, other = weights(0), weights(0), weights(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


# ----------------------------------------------------------------------------------------------- the demo

@pytest.mark.slow
def test_text_demo_decides_both_text_organisms_as_built(tmp_path):
    import pandas as pd

    from latentprobe.study.text_demo import run_text_demo

    result = run_text_demo(tmp_path / "demo", say=lambda line: None)
    truth = pd.read_csv(result["truth"])
    assert len(truth) == 4 and set(truth.subject) == {f"organism-{name}" for name in TEXT}
    assert truth.match.all(), truth.to_string()
    verdicts = pd.read_csv(result["verdicts"])
    assert set(verdicts.subject) >= {f"organism-{name}" for name in TEXT}
    assert result["report_html"].exists()


def test_builtin_hops_refuses_a_split_it_does_not_have():
    from latentprobe.data.loading import load_instances
    from latentprobe.errors import LatentProbeError

    assert len(load_instances("builtin-hops", limit=5, split="test")[0]) == 5
    with pytest.raises(LatentProbeError, match="only the held-out"):
        load_instances("builtin-hops", limit=5, split="train")
