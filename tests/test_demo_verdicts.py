"""The demo decides as the organisms were built (issue 9, "Done means")."""

import pandas as pd
import pytest

from latentprobe.study.demo import DEMO_N_INSTANCES, run_demo
from latentprobe.errors import LatentProbeError
from latentprobe.verdicts import VERDICT_COLUMNS


@pytest.mark.parametrize("bad", [0, 1, -5, 2.5, True])
def test_demo_refuses_impossible_instance_counts(tmp_path, bad):
    with pytest.raises(LatentProbeError, match="n_instances"):
        run_demo(tmp_path / "demo", n_instances=bad, say=lambda *_: None)


def test_demo_default_reaches_a_disconnect_at_the_default_margin():
    # 0 changes in n: exact two-sided 95% upper bound 1 - 0.025^(1/n) must fall below the 0.05 margin
    assert 1 - 0.025 ** (1 / DEMO_N_INSTANCES) < 0.05


def test_cli_takes_n_instances():
    from latentprobe.cli import build_parser

    assert build_parser().parse_args(["demo", "--n-instances", "12"]).instances == 12
    assert build_parser().parse_args(["demo"]).instances is None


def _verdicts(result):
    table = pd.read_csv(result["verdicts"])
    assert list(table.columns) == VERDICT_COLUMNS
    return table.set_index(["subject", "finding"]).verdict


@pytest.mark.slow
def test_demo_organisms_decide_as_built(tmp_path):
    subjects = ["organism-bottleneck", "organism-shortcut", "organism-lvr", "organism-mirage"]
    result = run_demo(tmp_path / "demo", subjects=subjects, say=lambda *_: None)
    verdicts = _verdicts(result)
    assert verdicts[("organism-bottleneck", "latent_answer")] == "connected"
    assert verdicts[("organism-shortcut", "latent_answer")] == "disconnect"
    assert verdicts[("organism-lvr", "latent_answer")] == "disconnect"
    # Mirage: disrupted by noise and constants, but no information reaches the answer through its latents
    table = pd.read_csv(result["verdicts"]).set_index(["subject", "finding"])
    assert table.loc[("organism-mirage", "latent_answer"), "verdict"] != "connected"
    assert table.loc[("organism-mirage", "latent_answer"), "disruption"] == "connected"


@pytest.mark.slow
def test_demo_with_twelve_instances_cannot_affirm_the_shortcut_null(tmp_path):
    result = run_demo(tmp_path / "demo", subjects=["organism-shortcut"], n_instances=12, say=lambda *_: None)
    assert _verdicts(result)[("organism-shortcut", "latent_answer")] == "inconclusive"
