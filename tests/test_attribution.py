"""Attribution patching: its replay reproduces the decoder's run, its gradients match finite differences of exact
patching through the whole unrolled latent loop, and structurally dead sites get exactly zero."""

import dataclasses

import numpy as np
import pytest
import torch

from latentprobe.where.attribution import attribution_map, slot_steps
from latentprobe.data import load_images
from latentprobe.model.decoding import DecodeConfig, LatentDecoder
from latentprobe.where.patching import PatchGrid, _outcomes, default_instances, reference_run, resolve_grid, run_cells
from latentprobe.model.sites import Site
from latentprobe.model.subjects import load_subject


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster (tests/conftest.py)


@pytest.fixture(scope="module")
def setup():
    out = {}

    def get(name, n=4):
        if name not in out:
            subject = load_subject(f"organism-{name}")
            instances = default_instances(subject.name, limit=n)[0]
            grid = resolve_grid(subject)
            decoder = LatentDecoder(subject, DecodeConfig(max_new_tokens=subject.max_new_tokens))
            images = [load_images(i) for i in instances]
            clean = reference_run(decoder, subject.encode(instances, images=images), grid, None)
            corrupt = reference_run(decoder, subject.encode(instances, images=images[1:] + images[:1]), grid, None)
            out[name] = (subject, instances, grid, decoder, clean, corrupt)
        return out[name]

    return get


@pytest.mark.parametrize("name", ["bottleneck", "mirage"])
def test_replay_reproduces_the_decoded_run(setup, name):
    """Mirage stops latent mode by its own choice, so its rows reach the answer slot at different steps."""
    subject, instances, grid, decoder, clean, corrupt = setup(name)
    _, replayed = attribution_map(decoder, subject, instances, grid, corrupt, clean, return_replay=True)
    expected = [lo for _, lo in _outcomes(subject, instances, corrupt.result)]
    np.testing.assert_allclose(replayed, expected, atol=1e-4)
    assert all(step >= 0 for step in slot_steps(corrupt.result))


def test_gradients_match_finite_differences_of_exact_patching(setup):
    """For a site, exact patching towards the source by a small fraction eps changes the log-odds by eps times the
    attribution estimate (to first order): autograd through the unrolled feedback loop agrees with the model."""
    subject, instances, grid, decoder, clean, corrupt = setup("bottleneck")
    sites = [Site("latent", 0, 2), Site("latent", 0, 3), Site("latent", 1, 2), Site("image", 0)]
    small = PatchGrid(layers=(0, 1), steps=(2, 3), groups=("image",))
    estimates = attribution_map(decoder, subject, instances, small, clean, corrupt)
    eps = 1e-3
    nudged = dataclasses.replace(
        corrupt, latent=clean.latent + eps * (corrupt.latent - clean.latent),
        prompt={l: clean.prompt[l] + eps * (corrupt.prompt[l] - clean.prompt[l]) for l in corrupt.prompt})
    patched = run_cells(decoder, subject, instances, small, clean, nudged, None, "recompute", max_rows=512)
    base = np.array([lo for _, lo in _outcomes(subject, instances, clean.result)])
    checked = 0
    for site in sites:
        change = (np.array([lo for _, lo in patched[site]]) - base) / eps
        predicted = np.array(estimates[site], dtype=float)
        np.testing.assert_allclose(change, predicted, atol=2e-2 * max(1.0, np.abs(predicted).max()), err_msg=str(site))
        checked += int(np.abs(predicted).max() > 1e-3)
    assert checked >= 2  # the comparison is not between zeros


def test_dead_sites_get_exactly_zero(setup):
    """In the one-layer bottleneck nothing reads the image tokens' final-norm states, the question's states (the
    answer is blind to the image, the question precedes it) or the last latent step's output."""
    subject, instances, grid, decoder, clean, corrupt = setup("bottleneck")
    estimates = attribution_map(decoder, subject, instances, grid, corrupt, clean)
    for site in (Site("image", 1), Site("latent", 1, 3), Site("question", 0)):
        assert all(v == 0.0 for v in estimates[site]), site
    assert any(abs(v) > 1e-3 for v in estimates[Site("latent", 0, 3)])
