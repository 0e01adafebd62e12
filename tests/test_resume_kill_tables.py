"""kill -9 during patch, ground and lens, then --resume: 0 chunks lost, 0 written twice, and the tables equal to an
uninterrupted run's, bit for bit (each batch is cut from the full instance list and kept on disk when done)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow

RUNNER = textwrap.dedent("""
    import sys
    from latentprobe.model.decoding import DecodeConfig
    from latentprobe.data import builtin_instances
    from latentprobe.model.subjects import load_subject
    what, out, resume = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    subject, instances = load_subject("organism-bottleneck"), builtin_instances(8)
    config = DecodeConfig(max_new_tokens=8)
    if what == "patch":
        from latentprobe.where.patching import patch_map
        patch_map(subject, instances, out, layers=[0, 1], batch_size=2, config=config, n_boot=100, resume=resume)
    elif what == "ground":
        from latentprobe.where.runs import ground_run
        ground_run(subject, instances, out, config=config, batch_size=2, n_random=10, n_boot=100, resume=resume)
    else:
        from latentprobe.where.runs import lens_run
        lens_run(subject, instances, out, config=config, batch_size=2, resume=resume)
""")
TABLES = {"patch": ["patching_rows.parquet", "patching_summary.parquet"],
          "ground": ["grounding.parquet"], "lens": ["lens.parquet", "nearest.parquet"]}


def _run(what: str, out: Path, resume: bool, kill_after: float | None = None) -> bool:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, what, str(out), "1" if resume else "0"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if kill_after is None:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-2000:]
        return False
    deadline = time.time() + 300
    while proc.poll() is None and not any((out / "journal").glob("chunk-*.parquet")) and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(kill_after)
    if proc.poll() is not None:
        return False
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


@pytest.mark.parametrize("what", ["patch", "ground", "lens"])
def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path, what):
    reference = tmp_path / "reference"
    _run(what, reference, resume=False)
    out = tmp_path / "killed"
    kills = 0
    for kill_after in (0.0, 0.3):  # once right after the first finished batch, once later
        kills += _run(what, out, resume=kills > 0, kill_after=kill_after)
    assert kills >= 1, "the run finished before it could be killed: make it longer"
    _run(what, out, resume=True)
    for table in TABLES[what]:
        pd.testing.assert_frame_equal(pd.read_parquet(out / table), pd.read_parquet(reference / table))
    rows = pd.read_parquet(out / TABLES[what][0])
    key = [c for c in ("instance_id", "method", "direction", "site", "measure", "layer", "latent_step", "step",
                       "image_index", "rank") if c in rows.columns]
    assert not rows.duplicated(subset=key).any()  # nothing written twice
    assert set(rows.instance_id) == set(pd.read_parquet(reference / TABLES[what][0]).instance_id)  # nothing lost
