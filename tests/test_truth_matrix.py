"""Issue 18, "Done means": the demo's verdict matrix equals the organisms' built-in truth for all four findings,
both directions present. Slow: it runs the demo on every organism whose construction fixes some finding."""

import pandas as pd
import pytest

from latentprobe.organisms.recipes import ORGANISMS
from latentprobe.organisms.truth import DIRECTIONS, both_directions, compare_with_truth, expected_matrix
from latentprobe.study.demo import DEMO_ORGANISMS, run_demo

TRUTH_SUBJECTS = [ORGANISMS[name].subject_name for name in DEMO_ORGANISMS if ORGANISMS[name].truth]


def test_the_demo_runs_every_organism_with_a_truth_and_they_cover_every_finding_both_ways():
    assert set(TRUTH_SUBJECTS) == {r.subject_name for r in ORGANISMS.values() if r.truth}
    assert all(both_directions(expected_matrix(TRUTH_SUBJECTS)).values())


def test_compare_with_truth_marks_wrong_and_missing_verdicts():
    verdicts = pd.DataFrame({"subject": ["organism-blind", "organism-blind"],
                             "finding": ["input_latent", "visual_info"], "verdict": ["disconnect", "informative"]})
    table = compare_with_truth(verdicts, ["blind", "collapsed"]).set_index(["subject", "finding"])
    assert table.loc[("organism-blind", "input_latent"), "match"]
    assert not table.loc[("organism-blind", "visual_info"), "match"]
    assert table.loc[("organism-collapsed", "collapse"), "decided"] == "missing"
    assert set(DIRECTIONS) == {"input_latent", "latent_answer", "collapse", "visual_info"}


@pytest.mark.slow
def test_demo_matrix_equals_the_built_in_truth(tmp_path):
    result = run_demo(tmp_path / "demo", subjects=TRUTH_SUBJECTS, say=lambda *_: None)
    table = pd.read_csv(result["truth"])
    assert len(table) == len(expected_matrix(TRUTH_SUBJECTS))
    wrong = table[~table["match"]]
    assert wrong.empty, "decided differently from the built-in truth:\n" + wrong.to_string(index=False)
