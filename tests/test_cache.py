"""run_with_cache: the same names and arrays as the Recorder and the TraceStore, and the states a no-cache
recompute of the whole decoded sequence gives (HF ``hidden_states``)."""

import numpy as np
import pytest
import torch

from latentprobe.model.cache import run_with_cache
from latentprobe.model.decoding import LATENT, DecodeConfig, replay
from latentprobe.errors import LatentProbeError
from latentprobe.model.recording import RecordSpec
from latentprobe.model.sites import Site
from latentprobe.runs.store import TraceStore
from latentprobe.runs.trace import trace

from decoding_helpers import make_instances

CONFIG = DecodeConfig(max_new_tokens=10)
SIZES = [(56, 56), (84, 112), (112, 56)]


@pytest.fixture(scope="module")
def cached(tiny_subject, tmp_path_factory):
    instances = make_instances(tmp_path_factory.mktemp("imgs"), SIZES)
    result, cache = run_with_cache(tiny_subject, instances, config=CONFIG)
    return instances, result, cache


def test_cache_equals_the_trace_store_for_the_same_instances(tiny_subject, cached, tmp_path):
    instances, result, cache = cached
    trace(tiny_subject, instances, tmp_path / "t", config=CONFIG,
          spec=RecordSpec(layers="all", image="all", answer=True), batch_size=2)
    store = TraceStore(tmp_path / "t")
    ids = store.index().set_index("instance_id").loc[[i.id for i in instances], "record_id"]
    n = tiny_subject.num_layers
    sites = [Site(g, layer) for g in ("latent", "image", "prompt_last", "answer") for layer in range(n + 1)]
    sites += [Site("latent", 1, step=2), Site("answer", n, step=0)]
    assert set(Site(s.group, s.layer) for s in store.sites) == set(cache)
    for site in sites:
        from_store = store.site_array(ids, site)
        from_cache = cache[site].numpy()
        assert from_store.shape == from_cache.shape, site
        np.testing.assert_allclose(from_store, from_cache, atol=1e-5, rtol=1e-4, err_msg=str(site))
    np.testing.assert_allclose(store.site_array(ids, "image.layer[1]", image="mean"),
                               cache.stack("image.layer[1]", image="mean").numpy(), atol=1e-5)


def test_cache_equals_a_no_cache_recompute_of_hidden_states(tiny_subject, cached):
    instances, result, cache = cached
    batch = tiny_subject.encode(instances)
    hidden_states = replay(tiny_subject, batch, result, output_hidden_states=True)
    n = tiny_subject.num_layers
    assert len(hidden_states) == n + 1  # the numbering sites use: 0 = embeddings .. N = final norm
    for r, row in enumerate(result.rows):
        latent_positions = (result.input_kinds[r] == LATENT).nonzero().flatten()
        image_positions = batch.mm_token_type_ids[r].bool().nonzero().flatten()
        assert len(latent_positions) == row.n_latent_steps == 4
        for layer in range(n + 1):
            torch.testing.assert_close(cache[Site("latent", layer)][r], hidden_states[layer][r, latent_positions],
                                       atol=1e-4, rtol=1e-4)
            images = cache[Site("image", layer)][r]
            images = images[~torch.isnan(images[:, 0])]
            torch.testing.assert_close(images, hidden_states[layer][r, image_positions], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(cache[Site("prompt_last", layer)][r],
                                       hidden_states[layer][r, result.prompt_length - 1], atol=1e-4, rtol=1e-4)
        # layer 0 at a latent step is exactly the fed-back vector
        torch.testing.assert_close(cache["latent.layer[0]"][r], row.latent_vectors)
        assert len(cache.image_grids[r]) == 1 and np.prod(cache.image_grids[r][0]) == len(image_positions)


def test_bad_sites_fail_before_the_model_runs(tiny_subject, monkeypatch):
    from latentprobe.data import builtin_instances
    from latentprobe import decoding

    def boom(*a, **k):
        raise AssertionError("the model ran")

    monkeypatch.setattr(decoding.LatentDecoder, "run", boom)
    instances = builtin_instances()[:2]
    for sites, fragment in ((["latent.layer[5]"], "has 2 blocks"), (["latent[9].layer[1]"], "latent steps 0..3"),
                            (["question.layer[1]"], "does not provide")):
        with pytest.raises(LatentProbeError, match=fragment.replace("[", r"\[")):
            run_with_cache(tiny_subject, instances, sites=sites)
    with pytest.raises(LatentProbeError, match="max_instances"):
        run_with_cache(tiny_subject, instances * 40, sites=["latent.layer[0]"])
