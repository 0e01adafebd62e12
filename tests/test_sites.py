"""Sites: one name per place. The string form round-trips, bad sites are refused before any model runs, and
every consumer (RecordSpec, layer edits, the nnsight runner, the store readers) reads a Site and the old int
form the same way."""

import pytest
import torch

from latentprobe.model.decoding import DecodeConfig, LatentDecoder, StepContext
from latentprobe.errors import LatentProbeError
from latentprobe.interventions import LatentFunction, LayerEditHooks, NNsightRunner, RowBinding
from latentprobe.model.recording import RecordSpec
from latentprobe.model.sites import Site, StepKind, as_site, check_sites, layer_modules, site_rows

from decoding_helpers import make_instances

CONFIG = DecodeConfig(max_new_tokens=10)


def test_string_form_round_trips_and_bare_ints_are_latent_layers():
    for text in ("latent[2].layer[14]", "latent.layer[0]", "image.layer[3]", "prompt_last.layer[28]",
                 "answer[0].layer[5]"):
        assert str(Site.parse(text)) == text
    assert as_site(3) == Site("latent", 3)
    assert as_site(Site("image", 1)) == Site("image", 1)


@pytest.mark.parametrize("bad, fragment", [
    ("latent[2].layer[9]", "has 2 blocks"),
    ("latent[7].layer[1]", "at most 4 latent steps"),
    ("image[1].layer[1]", "has no steps"),
    ("pixels.layer[1]", "unknown position group"),
    ("question.layer[1]", "does not provide"),
])
def test_bad_sites_are_one_clear_error(bad, fragment):
    with pytest.raises(LatentProbeError, match=fragment.replace("[", r"\[")):
        check_sites([bad], n_layers=2, max_latent_steps=4, groups=("latent", "image"))


def test_layer_numbering_is_hidden_states(tiny_subject):
    modules = layer_modules(tiny_subject.model)
    layers = tiny_subject.model.model.language_model.layers
    assert modules[0] == (layers[0], True)  # the input of block 0 = the embeddings
    assert modules[1] == (layers[0], False)  # block 0's output
    assert modules[2] == (tiny_subject.model.model.language_model.norm, False)  # N = final norm


def test_record_spec_from_sites_and_site_layers():
    spec = RecordSpec.for_sites(["latent[1].layer[2]", Site("image", 0), "prompt_last.layer[1]"])
    assert spec.resolve_layers(2) == [0, 1, 2]
    assert spec.latent and spec.image == "all" and spec.prompt_last and not spec.answer
    assert RecordSpec(layers=[Site("latent", 1), "image.layer[2]", -1]).resolve_layers(2) == [1, 2]
    with pytest.raises(LatentProbeError, match="has 2 blocks"):
        RecordSpec(layers=["latent.layer[3]"]).resolve_layers(2)


def test_site_rows_selects_rows_at_a_latent_step():
    ctx = StepContext(3, torch.tensor([StepKind.LATENT, StepKind.LATENT, StepKind.TEXT, StepKind.TEXT]),
                      torch.tensor([1, 2, -1, -1]), torch.tensor([False, False, True, False]), ["a", "b", "c", "d"])
    assert site_rows(ctx, Site("latent", 1, step=2)).tolist() == [1]
    assert site_rows(ctx, Site("latent", 1)).tolist() == [0, 1]
    assert site_rows(ctx, Site("answer", 1)).tolist() == [2]
    assert site_rows(ctx, Site("image", 1)).tolist() == []


def test_a_layer_edit_at_a_site_equals_the_int_form_and_the_same_edit_through_nnsight(tiny_subject, tmp_path):
    instances = make_instances(tmp_path, [(56, 56), (84, 112)])
    decoder = LatentDecoder(tiny_subject, CONFIG)
    site = Site.parse("latent[2].layer[1]")
    by_int = LatentFunction(lambda v, s: v * 0.0 + 1.0, name="ones", steps=[2], layer=1)
    by_site = LatentFunction(lambda v, s: v * 0.0 + 1.0, name="ones", layer=site)
    assert by_site.steps == [2] and by_site.layer == 1 and by_site.name == by_int.name
    results = []
    for iv in (by_int, by_site):
        edits = [iv.bind(RowBinding(inst.id)) for inst in instances]
        with LayerEditHooks(decoder, edits):
            results.append(decoder.run(tiny_subject.encode(instances), edits))

    def ones_at_site(model, ctx):
        rows = site_rows(ctx, site).tolist()
        if rows:
            runner.hidden(site)[rows, -1] = 1.0

    with NNsightRunner(decoder, ones_at_site) as runner:
        results.append(decoder.run(tiny_subject.encode(instances)))
    clean = decoder.run(tiny_subject.encode(instances))
    for a, b, c, d in zip(*(r.rows for r in results), clean.rows):
        assert a.generated_ids == b.generated_ids == c.generated_ids
        torch.testing.assert_close(a.latent_vectors, b.latent_vectors)
        torch.testing.assert_close(a.latent_vectors, c.latent_vectors, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(a.latent_vectors[3], d.latent_vectors[3], atol=1e-4)  # the edit did land


def test_a_latent_edit_refuses_a_non_latent_site_or_conflicting_steps():
    with pytest.raises(LatentProbeError, match="cannot act at site image"):
        LatentFunction(lambda v, s: v, layer="image.layer[1]")
    with pytest.raises(LatentProbeError, match="disagree"):
        LatentFunction(lambda v, s: v, steps=[1], layer="latent[2].layer[1]")
