"""Scale-out: two CPU ranks under torchrun (gloo) write one run whose union equals a single-process run."""

import os
import subprocess
import sys

import numpy as np
import pytest

from latentprobe.runs.store import TraceStore


def _run(args, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", LATENTPROBE_CACHE=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_torchrun_union_equals_single_process(tmp_path):
    common = ["trace", "--limit", "6", "--layers", "0,2", "--batch-size", "2"]
    _run(["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29617",
          "-m", "latentprobe", *common, "--out", str(tmp_path / "ranks")], tmp_path)
    _run(["-m", "latentprobe", *common, "--out", str(tmp_path / "single")], tmp_path)
    ranks, single = TraceStore(tmp_path / "ranks"), TraceStore(tmp_path / "single")
    a = ranks.index().set_index("instance_id").sort_index()
    b = single.index().set_index("instance_id").sort_index()
    assert list(a.index) == list(b.index) and len(a) == 6
    assert a.shard.str.contains("rank0of2").any() and a.shard.str.contains("rank1of2").any()
    assert (a.text == b.text).all()
    np.testing.assert_allclose(ranks.latent_array(a.record_id), single.latent_array(b.record_id), atol=1e-5)


def test_shard_flag_splits_instances_without_overlap(tmp_path):
    for i in range(2):
        _run(["-m", "latentprobe", "trace", "--limit", "5", "--shard", f"{i}/2", "--out", str(tmp_path / "run"),
              *(["--resume"] if i else [])], tmp_path)
    frame = TraceStore(tmp_path / "run").index()
    assert sorted(frame.instance_id) == [f"builtin-{i:03d}" for i in range(5)]


@pytest.mark.slow  # a whole study under torchrun; the trace and intervene unions stay in the default run
def test_torchrun_study_union_equals_single_process(tmp_path):
    """A study under torchrun: every rank decodes its share of clean runs and edits; donors and latent statistics
    come from every rank's clean runs, so records, effects and verdicts equal a single-process study."""
    import pandas as pd

    config = tmp_path / "study.toml"
    config.write_text('[study]\nsubjects = ["tiny"]\nn_instances = 6\n[decoding]\nbatch_size = 2\nmax_new_tokens = 12\n'
                      '[edits]\nnoise_scales = [3.0]\n[analyses]\nprobe_folds = 2\nprobe_inner_folds = 2\n'
                      'probe_alphas = [1.0]\nprobe_permutations = 9\nbootstrap = 50\n')
    common = ["study", "--config", str(config), "--quiet"]
    _run(["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29618",
          "-m", "latentprobe", *common, "--out", str(tmp_path / "ranks")], tmp_path)
    _run(["-m", "latentprobe", *common, "--out", str(tmp_path / "single")], tmp_path)
    ranks = TraceStore(tmp_path / "ranks" / "runs" / "tiny")
    single = TraceStore(tmp_path / "single" / "runs" / "tiny")
    key = ["instance_id", "intervention"]
    a = ranks.index().set_index(key).sort_index()
    b = single.index().set_index(key).sort_index()
    assert list(a.index) == list(b.index) and len(a.index.unique()) == len(a)
    assert a.shard.str.contains("rank0of2").any() and a.shard.str.contains("rank1of2").any()
    assert (a.text == b.text).all()
    # clean records equal to float rounding; edited ones within 1e-3: a rank's batches differ from one process's,
    # and the noise statistics sum the ranks' latents in another order, which the recomputed steps amplify
    for (_, edit), rid_a, rid_b in zip(a.index, a.record_id, b.record_id):
        np.testing.assert_allclose(ranks.tensor(rid_a, "latent"), single.tensor(rid_b, "latent"),
                                   atol=1e-5 if edit == "clean" else 1e-3)
    va = pd.read_csv(tmp_path / "ranks" / "report" / "verdicts.csv")
    vb = pd.read_csv(tmp_path / "single" / "report" / "verdicts.csv")
    assert va.verdict.tolist() == vb.verdict.tolist()
    np.testing.assert_allclose(va.estimate.to_numpy(float), vb.estimate.to_numpy(float), atol=1e-4, equal_nan=True)
