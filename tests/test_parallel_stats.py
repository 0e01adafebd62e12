"""Issue 22 (the demo's minute): the refitted collapse bootstrap and the probe cells run in threads; a result must
not depend on how many."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from latentprobe.errors import LatentProbeError
from latentprobe.stats.collapse_spread import collapse_ratio
from latentprobe.stats.parallel import map_in_threads, worker_count
from latentprobe.stats.probes import probe_table


def _collapse(monkeypatch, threads):
    monkeypatch.setenv("LATENTPROBE_THREADS", str(threads))
    rng = np.random.default_rng(3)
    latents = rng.normal(size=(60, 12)) @ rng.normal(size=(12, 12))
    return collapse_ratio(latents, rng.normal(size=(60, 12)), rng.normal(size=(200, 12)), n_boot=300, seed=1)


def _probes(monkeypatch, threads):
    monkeypatch.setenv("LATENTPROBE_THREADS", str(threads))
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 3, size=90)
    features = {(layer, step): rng.normal(size=(90, 8)) + labels[:, None] * (layer + step) * 0.2
                for layer in range(3) for step in range(2)}
    return probe_table(features, labels, np.arange(90), subject="s", attribute="a", representation="latent",
                       n_splits=3, n_permutations=19, n_boot=100, seed=0)


def test_the_refitted_collapse_interval_is_the_same_in_one_thread_and_in_three(monkeypatch):
    assert _collapse(monkeypatch, 1) == _collapse(monkeypatch, 3)


def test_probe_cells_are_the_same_in_one_thread_and_in_three(monkeypatch):
    pd.testing.assert_frame_equal(_probes(monkeypatch, 1), _probes(monkeypatch, 3))


def test_items_come_back_in_order_and_a_bad_thread_count_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("LATENTPROBE_THREADS", "4")
    assert worker_count() == 4
    assert map_in_threads(lambda x: -x, range(50)) == [-x for x in range(50)]
    monkeypatch.setenv("LATENTPROBE_THREADS", "zero")
    with pytest.raises(LatentProbeError, match="LATENTPROBE_THREADS='zero'.*unset it"):
        worker_count()
