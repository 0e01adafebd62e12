"""The lens: at the last layer it is the model's own logits (checked against a full forward of the HF model with
its LM head), gold ranks are ranks, nearest embeddings are cosine neighbours, and a model without an LM head or
without a latent phase is refused before anything runs."""

import dataclasses

import pytest
import torch

from latentprobe.model.cache import run_with_cache
from latentprobe.data import builtin_instances
from latentprobe.model.decoding import LATENT, DecodeConfig
from latentprobe.errors import LatentProbeError
from latentprobe.where.lens import (gold_rank_summary, gold_token_id, lens_logits, logit_lens_table,
                              nearest_embedding_table, run_lens)
from latentprobe.model.sites import Site

CONFIG = DecodeConfig(max_new_tokens=10)


@pytest.fixture(scope="module")
def lensed(tiny_subject):
    instances = builtin_instances()[:3]
    result, cache = run_with_cache(tiny_subject, instances, sites=["latent.layer[0]", "latent.layer[1]",
                                                                   "latent.layer[2]"], config=CONFIG)
    return instances, result, cache


@torch.no_grad()
def test_lens_at_the_last_layer_is_the_models_own_logits(tiny_subject, lensed):
    instances, result, cache = lensed
    batch = tiny_subject.encode(instances)
    model = tiny_subject.model
    sequences = result.sequences
    mm_types = torch.zeros_like(sequences)
    mm_types[:, :batch.mm_token_type_ids.shape[1]] = batch.mm_token_type_ids
    embeds = model.get_input_embeddings()(sequences)
    is_latent = (result.input_kinds == LATENT).unsqueeze(-1)
    embeds = torch.where(is_latent, result.latent_inputs.to(embeds.dtype), embeds)
    # the full HF model (its own final norm and lm_head), no cache, positions from the decoder's run
    logits = model(input_ids=sequences, inputs_embeds=embeds, attention_mask=result.attention_mask,
                   position_ids=result.position_ids, pixel_values=batch.pixel_values,
                   image_grid_thw=batch.image_grid_thw, mm_token_type_ids=mm_types, use_cache=False).logits
    n = tiny_subject.num_layers
    lens = lens_logits(tiny_subject, cache[Site("latent", n)], n)
    for r in range(len(instances)):
        positions = (result.input_kinds[r] == LATENT).nonzero().flatten()
        torch.testing.assert_close(lens[r], logits[r, positions].float(), atol=1e-4, rtol=1e-4)
    # below the last layer the lens applies the final norm first
    below = lens_logits(tiny_subject, cache[Site("latent", 1)], 1)
    normed = model.model.language_model.norm(cache[Site("latent", 1)])
    torch.testing.assert_close(below, model.lm_head(normed))


def test_lens_table_ranks_and_nearest_embeddings(tiny_subject, lensed):
    instances, result, cache = lensed
    table = logit_lens_table(tiny_subject, cache, instances, top_k=3, seed=7)
    assert len(table) == 3 * 4 * 3  # instances x latent steps x layers
    assert set(table["site"].head(4)) == {f"latent[{k}].layer[0]" for k in range(4)}
    assert (table["seed"] == 7).all() and (table["intervention"] == "none").all()
    row = table[(table.layer == 2) & (table.latent_step == 1)].iloc[0]
    r = cache.instance_ids.index(row.instance_id)
    logits = lens_logits(tiny_subject, cache["latent[1].layer[2]"][r], 2)
    gold, candidates = gold_token_id(tiny_subject, instances[r])
    order = logits.argsort(descending=True).tolist()
    assert row.gold_rank == order.index(gold)
    assert row.top_ids == order[:3]
    assert row.gold_candidate_rank == sorted(candidates, key=lambda c: -float(logits[c])).index(gold)
    summary = gold_rank_summary(table)
    assert len(summary) == 12 and summary["n"].eq(3).all() and summary["mrr"].between(0, 1).all()
    cell = table[(table.layer == 2) & (table.latent_step == 1)]
    expected = (cell.gold_candidate_rank == 0).mean()
    assert summary.set_index(["layer", "latent_step"]).loc[(2, 1), "candidate_top1"] == pytest.approx(expected)

    nearest = nearest_embedding_table(tiny_subject, cache, instances, top_k=2)
    z = cache["latent[0].layer[0]"][0]
    emb = tiny_subject.model.get_input_embeddings().weight.detach().float()
    cos = torch.nn.functional.cosine_similarity(z.unsqueeze(0), emb, dim=-1)
    first = nearest.iloc[0]
    assert first.nearest_cosines[0] == pytest.approx(float(cos.max()), abs=1e-5)
    assert tiny_subject.tokenizer.decode([int(cos.argmax())]) == first.nearest_tokens[0]


def test_a_model_without_an_lm_head_is_refused_before_anything_runs(tiny_subject, monkeypatch):
    headless = dataclasses.replace(tiny_subject, model=tiny_subject.model.model)  # the backbone alone
    with pytest.raises(LatentProbeError, match="no LM head"):
        run_lens(headless, builtin_instances()[:2])
    with pytest.raises(LatentProbeError, match="has 2 blocks"):
        run_lens(tiny_subject, builtin_instances()[:2], layers=[3])


@pytest.mark.parametrize("top_k", [0, -1, float("nan"), float("inf"), 2.5, True])
def test_a_bad_top_k_is_refused_before_the_model_runs(tiny_subject, monkeypatch, top_k):
    from latentprobe import cache

    monkeypatch.setattr(cache, "run_with_cache", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    with pytest.raises(LatentProbeError, match="top_k must be an integer >= 1"):
        run_lens(tiny_subject, builtin_instances()[:2], top_k=top_k)
