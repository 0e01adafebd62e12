"""The shipped model organisms: they load offline, beat chance on held-out data, are decoded exactly as they were
trained, hold their built-in causal structure, and train deterministically."""

import json

import pytest
import torch

from latentprobe.data import load_images, load_jsonl
from latentprobe.model.decoding import DecodeConfig, LatentDecoder
from latentprobe.interventions import LatentNoise, LatentStats, PinLatents, RowBinding
from latentprobe.organisms import ORGANISMS, load_organism, shipped_organisms, train_organism, weights_dir
from latentprobe.organisms.evaluation import decode_records
from latentprobe.organisms.training import encode_rows, organism_held_out_data, organism_unroll
from latentprobe.model.subjects import SUBJECTS, load_subject

ALL = list(ORGANISMS)
LETTER_ANSWERS = [name for name in ALL if name != "capimagine"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster (tests/conftest.py)


@pytest.fixture(scope="module")
def held_out():
    """The organisms' own test split (the same generation as in training, so never seen in training)."""
    return load_jsonl(organism_held_out_data(ORGANISMS["direct"]), split="test")


@pytest.fixture(scope="module")
def organisms():
    return {}


def _subject(organisms, name):
    if name not in organisms:
        organisms[name] = load_subject(f"organism-{name}")
    return organisms[name]


def test_all_are_shipped_registered_and_small():
    import latentprobe.organisms.subjects  # noqa: F401  (registers on import, as load_subject does)

    assert shipped_organisms() == ALL
    for name in ALL:
        assert f"organism-{name}" in SUBJECTS
        weights = weights_dir() / f"{name}.safetensors"
        assert weights.stat().st_size < 3_000_000
        record = json.loads((weights_dir() / f"{name}.json").read_text())
        assert record["organism"] == name and "config" in record and "backend" in record["tokenizer"]
    assert not [p for p in weights_dir().iterdir() if p.suffix in (".bin", ".pt", ".pkl", ".pth")]
    metrics = json.loads((weights_dir() / "metrics.json").read_text())
    assert set(ALL) <= set(metrics)


@pytest.mark.parametrize("name", ALL)
def test_organism_loads_offline_and_beats_chance(organisms, held_out, name):
    subject = _subject(organisms, name)
    recipe = ORGANISMS[name]
    assert subject.name == f"organism-{name}" and subject.mediator == recipe.mediator
    assert (subject.protocol.name if subject.protocol else None) == (recipe.protocol.name if recipe.protocol else None)
    records = decode_records(subject, held_out[:48], batch_size=48)
    accuracy = sum(r["correct"] for r in records) / len(records)
    assert accuracy >= 0.6, f"{name}: held-out accuracy {accuracy:.2f} (chance 0.25)"
    if subject.protocol is not None:
        assert all(r["entered_latent"] and r["n_latent_steps"] == 4 for r in records)
    if name == "capimagine":
        assert all(r["mediator_text"] for r in records)


@pytest.mark.parametrize("name", ALL)
def test_decoder_reproduces_the_training_computation(organisms, held_out, name):
    """Train/infer consistency: the unrolled training forward and latentprobe's LatentDecoder give the same
    answer-slot logits (and so the same greedy answers and accuracy) on held-out instances."""
    subject = _subject(organisms, name)
    recipe = ORGANISMS[name]
    instances = held_out[:24]
    rows = encode_rows(subject, recipe, instances)
    with torch.no_grad():
        out = organism_unroll(subject, recipe, rows)
    train_logits = out.answer_logits(rows.answer_slot)
    decoder = LatentDecoder(subject, DecodeConfig(max_new_tokens=subject.max_new_tokens))
    prompts = None
    if recipe.text_mediator_markers:  # the training computation teacher-forces the gold imagination
        open_marker, close_marker = recipe.text_mediator_markers
        prompts = [subject.prompt_text(inst) + open_marker + inst.attributes["imagination"] + close_marker
                   for inst in instances]
    batch = subject.encode(instances, images=[load_images(inst) for inst in instances], prompts=prompts)
    result = decoder.run(batch)
    decoder_logits = torch.stack([row.answer_logits for row in result.rows])
    torch.testing.assert_close(decoder_logits, train_logits, atol=2e-3, rtol=1e-3)
    train_correct = (train_logits.argmax(-1) == rows.gold_ids).float().mean()
    decoder_correct = (decoder_logits.argmax(-1) == rows.gold_ids).float().mean()
    assert float(train_correct) == float(decoder_correct)
    if subject.protocol is not None:  # the organism left latent mode where it was trained to (Mirage: by itself)
        assert [row.n_latent_steps for row in result.rows] == [recipe.latent_steps] * len(instances)


def _clean_and_stats(subject, instances):
    decoder = LatentDecoder(subject, DecodeConfig(max_new_tokens=subject.max_new_tokens))
    batch = subject.encode(instances)
    clean = decoder.run(batch)
    stats = LatentStats.from_vectors(torch.cat([r.latent_vectors for r in clean.rows]))
    return decoder, batch, clean, stats


def test_shortcut_answer_is_exactly_blind_to_its_latents(organisms, held_out):
    subject = _subject(organisms, "shortcut")
    decoder, batch, clean, stats = _clean_and_stats(subject, held_out[:16])
    noise = LatentNoise(scale=10.0, seed=3)
    edits = [noise.bind(RowBinding(r.instance_id, clean=r.latent_vectors, stats=stats)) for r in clean.rows]
    noisy = decoder.run(batch, edits)
    for a, b in zip(clean.rows, noisy.rows):
        assert (a.latent_vectors - b.latent_vectors).norm() > 1.0
        torch.testing.assert_close(a.answer_logits, b.answer_logits, atol=1e-5, rtol=1e-5)


def test_bottleneck_answer_sees_the_image_only_through_its_latents(organisms, held_out):
    """With the latents pinned to their clean values, swapping the image cannot change the answer (NDE = 0)."""
    subject = _subject(organisms, "bottleneck")
    instances = held_out[:16]
    decoder, batch, clean, _ = _clean_and_stats(subject, instances)
    donors = [load_images(inst) for inst in instances[1:] + instances[:1]]
    treated = subject.encode(instances, images=donors)
    pin = PinLatents(source="clean")
    edits = [pin.bind(RowBinding(r.instance_id, forced=r.latent_vectors)) for r in clean.rows]
    swapped = decoder.run(treated, edits)
    for a, b in zip(clean.rows, swapped.rows):
        torch.testing.assert_close(a.answer_logits, b.answer_logits, atol=1e-5, rtol=1e-5)
    unpinned = decoder.run(treated)  # ... while letting the latents follow the new image does change answers
    changed = sum(a.text != b.text for a, b in zip(clean.rows, unpinned.rows))
    assert changed >= len(instances) // 3


def test_blind_latents_cannot_see_the_image(organisms, held_out):
    """Built so: in latent mode no query attends the image or the prompt after it. Swapping every image leaves
    the latent vectors bit-identical, while the answer (which reads the image) follows the new image."""
    subject = _subject(organisms, "blind")
    instances = held_out[:12]
    decoder = LatentDecoder(subject, DecodeConfig(max_new_tokens=subject.max_new_tokens))
    clean = decoder.run(subject.encode(instances))
    swapped = decoder.run(subject.encode(instances, images=[load_images(i) for i in instances[1:] + instances[:1]]))
    assert all(row.n_latent_steps == 4 for row in clean.rows)
    for a, b in zip(clean.rows, swapped.rows):
        assert torch.equal(a.latent_vectors, b.latent_vectors)
    assert sum(a.text != b.text for a, b in zip(clean.rows, swapped.rows)) >= len(instances) // 3


def test_training_is_deterministic_for_a_seed():
    def weights(seed):
        result = train_organism("direct", seed=seed, n=40, steps=3, evaluate_with_decoder=False)
        return {k: v.clone() for k, v in result.subject.model.state_dict().items()}

    first, again, other = weights(0), weights(0), weights(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_unknown_organism_is_refused():
    from latentprobe.errors import LatentProbeError

    with pytest.raises(LatentProbeError, match="unknown organism"):
        load_organism("telepath")


@pytest.mark.slow
def test_ground_truth_under_latentprobe_interventions(organisms, held_out, tmp_path):
    """Bottleneck: latent noise (3x std) more than halves accuracy, a constant latent drops it to chance, and the
    image swap's natural indirect effect is the whole effect. Shortcut: latent edits change no answer and the
    NIE is zero. (Noise leaves the bottleneck above chance because each latent position re-reads the image
    before its output is fed back, and noised again: the answer sees several noisy copies of the signal.)"""
    from latentprobe.organisms.groundtruth import ground_truth_checks

    instances = held_out[:200]
    bottleneck = ground_truth_checks(_subject(organisms, "bottleneck"), instances, tmp_path / "bottleneck")
    assert bottleneck["accuracy_clean"] >= 0.9
    assert bottleneck["noise_accuracy"] <= 0.5 and bottleneck["constant_mean_accuracy"] <= 0.35
    nie = bottleneck["image_swap_NIE_correct"]
    assert nie["ci_high"] < -0.5
    assert bottleneck["image_swap_NDE_correct"]["estimate"] == 0

    shortcut = ground_truth_checks(_subject(organisms, "shortcut"), instances, tmp_path / "shortcut")
    assert shortcut["accuracy_clean"] >= 0.9
    assert shortcut["noise_flip_rate"] == 0 and shortcut["constant_mean_flip_rate"] == 0
    assert shortcut["noise_accuracy"] == shortcut["accuracy_clean"]
    nie = shortcut["image_swap_NIE_correct"]
    assert nie["ci_low"] <= 0 <= nie["ci_high"] and nie["estimate"] == 0
