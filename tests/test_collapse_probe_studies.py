"""The collapse and probe studies on a real (tiny) trace: tables, control types, verdicts, CLI."""

import numpy as np
import pytest

from latentprobe.report.build import clean_records, collapse_study, control_types, probe_study
from latentprobe.data import builtin_instances
from latentprobe.errors import LatentProbeError
from latentprobe.model.recording import RecordSpec
from latentprobe.stats.similarity import SIMILARITY_COLUMNS
from latentprobe.runs.store import TraceStore
from latentprobe.runs.trace import trace
from latentprobe.verdicts.collapse import verdict_collapse
from latentprobe.verdicts.visual_info import verdict_visual_info


@pytest.fixture(scope="module")
def tiny_trace(tiny_subject, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-trace") / "run"
    trace(tiny_subject, builtin_instances(), out, spec=RecordSpec(layers="all", image="all"), batch_size=8)
    return out


def test_collapse_study_writes_the_spread_table_and_decides(tiny_trace, tmp_path):
    table, made = collapse_study([tiny_trace], tmp_path, n_boot=200)
    assert table.columns.tolist() == SIMILARITY_COLUMNS
    assert {"relative_spread", "spread_ratio", "cosine", "collapse_ratio", "participation_ratio"} <= set(table.statistic)
    # issue 18: every image token was recorded, so one of them per instance is the yardstick
    ratio = table[table.statistic == "collapse_ratio"]
    assert set(ratio.reference) == {"image_token", "image_mean"}
    assert set(ratio[ratio.reference == "image_token"].yardstick) == {"single token"}
    assert (tmp_path / "similarity.csv").exists() and made["collapse"]
    verdict = verdict_collapse(table, table.subject.iloc[0])
    assert verdict.verdict in ("collapsed", "not collapsed", "inconclusive") and verdict.n == 8


def test_control_types_follow_the_request(tiny_trace):
    store = TraceStore(tiny_trace)
    frame = clean_records(store)
    images, used = control_types(store, frame, "auto")
    assert used == "image" and len(set(images)) == len(frame)  # each built-in image is shown once
    questions, used = control_types(store, frame, "question")
    assert used == "question" and len(set(questions)) == 1
    combined, used = control_types(store, frame, "colour+quadrant")
    assert used == "colour+quadrant" and all("|" in v for v in combined)
    with pytest.raises(LatentProbeError, match="not in the data"):
        control_types(store, frame, "no_such_attribute")


def test_probe_study_has_nested_rows_with_p_values_and_a_verdict(tiny_trace, tmp_path):
    table, _ = probe_study(tiny_trace, ["colour"], tmp_path, n_splits=2, inner_splits=2, alphas=(1.0, 100.0),
                           n_permutations=9, n_boot=100, control_type="question")
    nested = table[table.selection == "nested"]
    assert set(nested.representation) >= {"latent", "image_mean", "prompt_last"}
    assert (table.control_type == "question").all() and (table.n_types == 1).all()
    ran = nested[nested.skipped_reason == ""]
    assert ran.p_value.between(0.1, 1.0).all()  # 9 permutations: the smallest possible p is 0.1
    assert verdict_visual_info(table, table.subject.iloc[0]).verdict in ("limited", "informative", "inconclusive",
                                                                          "not measured")
    assert np.isfinite(ran.score).all()
