"""`latentprobe plan`: instances needed to decide and the smallest effect a pilot run rules out."""

import math

import pandas as pd
import pytest

from latentprobe.errors import LatentProbeError
from latentprobe.report.build import plan_runs
from latentprobe.verdicts.planning import PLAN_COLUMNS, plan_lines, plan_table
from latentprobe.verdicts import Margins, clopper_pearson


def rate(subject, intervention, k, n, target="latent", metric="flip_rate"):
    low, high = clopper_pearson(k, n, 0.05)
    return dict(subject=subject, target=target, intervention=intervention, metric=metric, estimate=k / n,
                ci_low=low, ci_high=high, n=n, k=k)


def test_a_pilot_of_twelve_without_changes_needs_seventy_two():
    effects = pd.DataFrame([rate("shortcut", "patch(steps=all)", 0, 12),
                            rate("bottleneck", "patch(steps=all)", 9, 12)])
    table = plan_table(effects).set_index(["subject", "finding"])
    assert list(plan_table(effects).columns) == PLAN_COLUMNS
    shortcut = table.loc[("shortcut", "latent_answer")]
    assert shortcut.verdict == "inconclusive" and shortcut.needed_n == 72 and shortcut.needed_n_disconnect == 72
    assert shortcut.ruled_out_beyond == pytest.approx(clopper_pearson(0, 12, 0.05)[1])  # 0.265
    assert shortcut.detectable_effect == pytest.approx(1 - 0.2 ** (1 / 12))
    bottleneck = table.loc[("bottleneck", "latent_answer")]
    assert bottleneck.verdict == "connected" and bottleneck.needed_n == 12
    assert math.isinf(bottleneck.needed_n_disconnect)
    # a tighter margin needs more instances
    tight = plan_table(effects, Margins(answer_change=0.02)).set_index(["subject", "finding"])
    assert tight.loc[("shortcut", "latent_answer"), "needed_n"] == math.ceil(math.log(0.025) / math.log(0.98))
    assert any("shortcut" in line and "inconclusive" in line for line in plan_lines(plan_table(effects)))


def test_plan_needs_effects_tables(tmp_path):
    with pytest.raises(LatentProbeError, match="no effects tables"):
        plan_runs([tmp_path])
    with pytest.raises(LatentProbeError, match="not found"):
        plan_runs([tmp_path / "missing"])


def test_plan_command_reads_a_run_folder(tmp_path, capsys):
    from latentprobe.cli import main

    pd.DataFrame([rate("shortcut", "patch(steps=all)", 0, 12)]).to_parquet(tmp_path / "effects_summary.parquet")
    main(["plan", str(tmp_path), "--margin", "0.1"])
    out = capsys.readouterr().out
    assert "shortcut" in out and "inconclusive" in out
    assert " 36 " in out  # 0 changes: the exact bound 1 - 0.025^(1/n) falls below 0.1 from n = 36 on
    assert 1 - 0.025 ** (1 / 36) < 0.1 <= 1 - 0.025 ** (1 / 35)
