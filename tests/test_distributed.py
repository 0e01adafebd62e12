"""Scale-out: two CPU ranks under torchrun (gloo) write one run whose union equals a single-process run."""

import os
import subprocess
import sys

import numpy as np

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
