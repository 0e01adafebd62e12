"""The mediation runs through the real runner, on organisms whose causal structure is known by construction,
for both mediator definitions. These fail if the two mediator-pinned runs are swapped (NDE <-> NIE) or if the
full-mediator hooks do not pin what they claim."""

import pytest
import torch

from latentprobe.data import load_jsonl
from latentprobe.model.decoding import DecodeConfig, LatentDecoder
from latentprobe.runs.intervene import intervene
from latentprobe.interventions import ImageSwap, PinLatents, PinLatentStates, RowBinding
from latentprobe.model.recording import Recorder, RecordSpec
from latentprobe.model.subjects import load_subject

N = 12


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster (tests/conftest.py)


@pytest.fixture(scope="module")
def instances():
    from latentprobe.study.demo import demo_data

    return load_jsonl(demo_data(), split="test")[:N]


def _effects(name, instances, tmp_path):
    summary = intervene(load_subject(f"organism-{name}"), instances, [ImageSwap()], tmp_path / name, n_boot=50,
                        mediators=("fed_back", "all_layers"))
    table = summary.table
    return table[table.intervention == "image-swap"].set_index(["metric", "mediator"])  # not its placebo's rows


def test_bottleneck_routes_the_image_only_through_its_latents(instances, tmp_path):
    """Built so: after latent mode its answer cannot attend to image tokens. Hand-known truth: NDE = 0 exactly,
    and the NIE carries the whole effect (answers change under the treated run's latents)."""
    table = _effects("bottleneck", instances, tmp_path)
    for mediator in ("fed_back", "all_layers"):
        nde, nie = table.loc[("NDE_answer_changed", mediator)], table.loc[("NIE_answer_changed", mediator)]
        assert nde.k == 0 and nde.estimate == 0
        assert nie.k >= N // 2
        assert table.loc[("NDE_correct", mediator), "estimate"] == 0
        assert table.loc[("NIE_correct", mediator), "estimate"] <= -0.4
        te = table.loc[("TE_correct", mediator), "estimate"]
        assert te == pytest.approx(table.loc[("NIE_correct", mediator), "estimate"])


def test_shortcut_answers_without_its_latents(instances, tmp_path):
    """Built so: the answer cannot attend to latent positions. Hand-known truth: NIE = 0 exactly; the image
    swap acts directly (NDE = TE)."""
    table = _effects("shortcut", instances, tmp_path)
    for mediator in ("fed_back", "all_layers"):
        assert table.loc[("NIE_answer_changed", mediator), "k"] == 0
        assert table.loc[("NIE_gold_prob", mediator), "estimate"] == 0
        assert table.loc[("NDE_answer_changed", mediator), "k"] >= N // 2
        assert table.loc[("NDE_correct", mediator), "estimate"] == table.loc[("TE_correct", mediator), "estimate"]


def test_the_full_mediator_pins_every_layer_at_the_latent_positions(instances):
    """Decoding the treated input with the clean run's latent states pinned at every layer reproduces the clean
    states at every layer; pinning only the fed-back vectors leaves upper layers free to read the new image."""
    subject = load_subject("organism-mirage")  # two layers: the latent positions read the image in layer 1
    decoder = LatentDecoder(subject, DecodeConfig(max_new_tokens=subject.max_new_tokens))
    recorder = Recorder(decoder, RecordSpec(layers="all"))
    batch_instances = instances[:4]
    swap = ImageSwap()
    with recorder:
        clean = decoder.run(subject.encode(batch_instances))
        clean_states = [r["latent_layers"] for r in recorder.records()]
        images = [swap.apply(i, None, donor, [img for img in _images(donor)])[0]
                  for i, donor in zip(batch_instances, batch_instances[1:] + batch_instances[:1])]
        treated_batch = subject.encode(batch_instances, images=images)
        layers = recorder.layers
        pins = [PinLatents().bind(RowBinding(i.id, forced=row.latent_vectors))
                for i, row in zip(batch_instances, clean.rows)]
        states = [{layer: s[pos] for pos, layer in enumerate(layers) if layer > 0} for s in clean_states]
        with PinLatentStates(decoder, states):
            decoder.decode(decoder.prefill(treated_batch), pins)
        full = [r["latent_layers"] for r in recorder.records()]
        decoder.decode(decoder.prefill(treated_batch), pins)
        fed_back_only = [r["latent_layers"] for r in recorder.records()]
    top = len(layers) - 1
    for clean_s, full_s, fed_s in zip(clean_states, full, fed_back_only):
        assert torch.allclose(full_s, clean_s, atol=1e-5)  # every layer, every step
        assert torch.allclose(fed_s[0], clean_s[0], atol=1e-6)  # the fed-back vectors are pinned either way
    assert any(not torch.allclose(f[top], c[top], atol=1e-4) for f, c in zip(fed_back_only, clean_states))


def _images(instance):
    from latentprobe.data import load_images

    return load_images(instance)
