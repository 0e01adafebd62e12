"""kill -9 at random moments during trace and intervene, then --resume: nothing lost, nothing written twice, and
the result equal to an uninterrupted run (trace: bit for bit; intervene: within the README's tolerance)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from latentprobe.runs.store import TraceStore

pytestmark = pytest.mark.slow

# Small shards and a batch size that does not divide them, so kills land between and inside shard writes.
RUNNER = textwrap.dedent("""
    import sys
    from latentprobe.data import builtin_instances
    from latentprobe.model.recording import RecordSpec
    from latentprobe.model.subjects import load_subject
    what, out, resume = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    subject, instances = load_subject("tiny"), builtin_instances(24)
    if what == "trace":
        from latentprobe.runs.trace import trace
        trace(subject, instances, out, spec=RecordSpec(layers=[0, 2]), batch_size=4, shard_size=3, resume=resume)
    else:
        from latentprobe.runs.intervene import intervene
        from latentprobe.interventions import make_interventions
        ivs = make_interventions("latent", ["noise", "zero"], scales=[1.0], seed=0) + \\
            make_interventions("input", ["image-blank"], seed=0)
        intervene(subject, instances, ivs, out, batch_size=4, shard_size=3, n_boot=100, resume=resume)
""")

# Documented in the README: an intervene run resumed after a kill matches an uninterrupted one to this
# absolute tolerance on latent vectors (its clean pass re-batches the unfinished instances: float rounding).
INTERVENE_ATOL = 1e-4


def _run(what: str, out: Path, resume: bool, kill_after: float | None = None) -> bool:
    """Run in a child process; with ``kill_after``, SIGKILL it that many seconds after its first index part
    appears. Returns whether it was killed."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, what, str(out), "1" if resume else "0"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if kill_after is None:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-2000:]
        return False
    deadline = time.time() + 120
    while proc.poll() is None and not any((out / "index").glob("*.parquet")) and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(kill_after)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def _records(out: Path) -> dict[tuple[str, str], torch.Tensor]:
    store = TraceStore(out)
    frame = store.index()
    keys = list(zip(frame.instance_id, frame.get("intervention", ["clean"] * len(frame))))
    assert len(keys) == len(set(keys)), "a record was written twice"
    return {key: store.tensor(rid, "latent").clone() for key, rid in zip(keys, frame.record_id)}


@pytest.mark.parametrize("what", ["trace", "intervene"])
def test_kill_nine_then_resume_loses_and_duplicates_nothing(tmp_path, what):
    reference = _records(tmp_path / "whole") if _run(what, tmp_path / "whole", False) is False else None
    rng = np.random.default_rng(12)
    killed = 0
    out = tmp_path / "killed"
    for delay in rng.uniform(0.0, 1.5, size=4):  # several kills in one run folder, each at a random moment
        killed += _run(what, out, resume=out.exists(), kill_after=float(delay))
    _run(what, out, resume=True)
    assert killed >= 2, "the runs finished before they could be killed; the test proves nothing"
    resumed = _records(out)
    assert sorted(resumed) == sorted(reference)  # 0 lost, 0 duplicated (checked in _records)
    atol = 0.0 if what == "trace" else INTERVENE_ATOL
    worst = max(float((resumed[k] - reference[k]).abs().max()) if resumed[k].numel() else 0.0 for k in reference)
    print(f"{what}: killed {killed} times, max |resumed - uninterrupted| = {worst:.3g}")
    assert worst <= atol, f"max difference {worst:.3g} exceeds the documented {atol}"
    assert not list(out.rglob(".*.tmp"))


# -- a whole study -------------------------------------------------------------------------------------------
STUDY_FILE = """
[study]
subjects = ["tiny"]
n_instances = 12
[decoding]
batch_size = 2
max_new_tokens = 12
[edits]
noise_scales = [3.0]
[analyses]
probe_folds = 2
probe_inner_folds = 2
probe_alphas = [1.0]
probe_permutations = 9
bootstrap = 50
"""


def _study(out: Path, config: Path, resume: bool, kill_after: float | None = None) -> bool:
    """`latentprobe study` in a child process; with ``kill_after``, SIGKILL it that many seconds after its study
    file appears. Returns whether it was killed."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-m", "latentprobe", "study", "--out", str(out), "--quiet"]
    args += ["--resume"] if resume else ["--config", str(config)]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if kill_after is None:
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err.decode()[-2000:]
        return False
    deadline = time.time() + 300
    while proc.poll() is None and not (out / "study.toml").exists() and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(kill_after)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def test_kill_nine_during_a_study_then_resume_gives_the_uninterrupted_report(tmp_path):
    config = tmp_path / "study.toml"
    config.write_text(STUDY_FILE)
    _study(tmp_path / "whole", config, resume=False)
    reference = _records(tmp_path / "whole" / "runs" / "tiny")
    rng = np.random.default_rng(24)
    out, killed = tmp_path / "killed", 0
    for delay in rng.uniform(0.0, 6.0, size=4):  # several kills in one study folder, each at a random moment
        killed += _study(out, config, resume=out.exists(), kill_after=float(delay))
    _study(out, config, resume=True)
    assert killed >= 2, "the study finished before it could be killed; the test proves nothing"
    resumed = _records(out / "runs" / "tiny")
    assert sorted(resumed) == sorted(reference)  # 0 lost, 0 duplicated (checked in _records)
    worst = max(float((resumed[k] - reference[k]).abs().max()) if resumed[k].numel() else 0.0 for k in reference)
    assert worst <= INTERVENE_ATOL
    import pandas as pd

    a = pd.read_csv(tmp_path / "whole" / "report" / "verdicts.csv")
    b = pd.read_csv(out / "report" / "verdicts.csv")
    assert a.verdict.tolist() == b.verdict.tolist() and a.finding.tolist() == b.finding.tolist()
    numeric = [c for c in ("estimate", "ci_low", "ci_high", "n") if c in a.columns]
    np.testing.assert_allclose(a[numeric].to_numpy(float), b[numeric].to_numpy(float), atol=1e-4, equal_nan=True)
    assert not list(out.rglob(".*.tmp"))
    print(f"study: killed {killed} times, max |resumed - uninterrupted| latent = {worst:.3g}")
