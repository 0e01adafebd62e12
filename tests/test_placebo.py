"""The placebo edits (`placebo`, `input-placebo`, `text-placebo`): the noise floor of every effect. Each runs the
clean input or latents through exactly the code path of its family's edits; on CPU in float32 that path is
deterministic, so the placebo must give the clean run back exactly -- the same answers, the same latent vectors,
the same gold probabilities -- and every effect under it is zero (the text placebo's probabilities agree to float32
rounding: see below). On a GPU in bf16 it is not, which is why it exists."""

import math

import pytest
import torch

from latentprobe.data.instances import load_jsonl
from latentprobe.interventions import (KINDS_BY_TARGET, ImageSwap, InputPlacebo, LatentNoise, LatentPlacebo,
                                       TextPlacebo, TextSwap, make_interventions)
from latentprobe.runs.intervene import intervene, mediator_states, with_placebos
from latentprobe.runs.store import TraceStore
from latentprobe.model.subjects import load_subject

N = 6

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster (tests/conftest.py)


@pytest.fixture(scope="module")
def instances():
    from latentprobe.study.demo import demo_data

    return load_jsonl(demo_data(), split="test")[:N]


def _placebo_rows_equal_clean(run_dir, expect_latents: bool):
    store = TraceStore(run_dir)
    index = store.index()
    clean = index[index.intervention == "clean"].set_index("instance_id")
    placebo = index[index.role == "placebo"]
    assert len(placebo) and set(placebo.instance_id) == set(clean.index)
    for row in placebo.itertuples():
        base = clean.loc[row.instance_id]
        assert row.parsed_answer == base.parsed_answer
        if row.target != "text":  # a text placebo's output starts after the span forced back into the prompt
            assert row.text == base.text
        if row.target == "text":
            # The span forced back is prefilled in one chunk where the clean run generated it token by token: the
            # same numbers summed in another order, so the probabilities agree to float32 rounding, not bit for bit.
            assert row.gold_prob == pytest.approx(base.gold_prob, rel=1e-5, abs=1e-7)
        else:
            assert row.gold_prob == base.gold_prob  # exactly: the same arithmetic in the same order
        latent, base_latent = store.tensor(row.record_id, "latent"), store.tensor(base.record_id, "latent")
        assert torch.equal(latent, base_latent)
        assert (latent.shape[0] > 0) == expect_latents
    return placebo


def test_each_family_has_a_registered_placebo():
    assert KINDS_BY_TARGET["latent"]["placebo"] is LatentPlacebo
    assert KINDS_BY_TARGET["input"]["input-placebo"] is InputPlacebo
    assert KINDS_BY_TARGET["text"]["text-placebo"] is TextPlacebo
    built = make_interventions("latent", ["placebo"], steps=[1], semantics=["pin"])
    assert [iv.name for iv in built] == ["placebo(steps=1,sem=pin)"] and built[0].role == "placebo"
    assert all(iv.role == "edit" for iv in make_interventions("input", ["image-swap", "image-blank"]))


def test_with_placebos_adds_one_per_family_edited_and_none_twice():
    ivs = with_placebos([LatentNoise(scale=3.0), ImageSwap()])
    assert [iv.kind for iv in ivs] == ["noise", "image-swap", "placebo", "input-placebo"]
    assert [iv.kind for iv in with_placebos(ivs)] == [iv.kind for iv in ivs]
    assert [iv.kind for iv in with_placebos([TextSwap()])] == ["text-swap", "text-placebo"]


def test_latent_and_input_placebos_are_exactly_zero_on_cpu(instances, tmp_path):
    subject = load_subject("organism-bottleneck")
    summary = intervene(subject, instances, [LatentNoise(scale=3.0), ImageSwap()], tmp_path / "run", n_boot=50,
                        batch_size=4, mediators=("fed_back", "all_layers"))
    placebo = _placebo_rows_equal_clean(tmp_path / "run", expect_latents=True)
    assert set(placebo.intervention) == {"placebo(steps=all,sem=recompute)", "input-placebo"}
    table = summary.table
    own = table[table.intervention.isin(set(placebo.intervention))]
    for metric in ("flip_rate", "accuracy_change", "gold_prob_change", "TE_answer_changed", "NDE_answer_changed",
                   "NIE_answer_changed", "latent_relative_l2"):
        values = own[own.metric == metric].estimate
        assert (values == 0).all(), metric
    # every row carries its family's placebo value: zero for a change, the clean value for a level
    swap = table[(table.intervention == "image-swap")].set_index(["metric", "mediator"])
    assert swap.loc[("NIE_answer_changed", "all_layers"), "placebo"] == 0
    assert swap.loc[("accuracy_clean", ""), "placebo"] == swap.loc[("accuracy_clean", ""), "estimate"]
    noise = table[table.intervention.str.startswith("noise")].set_index("metric")
    assert noise.loc["flip_rate", "placebo"] == 0
    assert not table.placebo.isna().any()


def test_text_placebo_and_the_input_to_mediator_data(instances, tmp_path):
    subject = load_subject("organism-capimagine")
    summary = intervene(subject, instances, [TextSwap(), ImageSwap()], tmp_path / "run", n_boot=50, batch_size=4)
    placebo = _placebo_rows_equal_clean(tmp_path / "run", expect_latents=False)
    assert set(placebo.intervention) == {"text-placebo", "input-placebo"}
    index = TraceStore(tmp_path / "run").index()
    rows = index[index.intervention == "input-placebo"]
    assert (rows.mediator_token_edit_distance == 0).all() and (rows.mediator_tokens_clean > 0).all()
    clean, edited = mediator_states(tmp_path / "run")
    assert sorted(clean) == sorted(inst.id for inst in instances)
    assert all(v.shape == (subject.hidden_size,) for v in clean.values())
    assert all((edited["input-placebo"][i] == clean[i]).all() for i in clean)  # same text, same representation
    swapped = index[index.intervention == "image-swap"].set_index("instance_id")
    changed = {i: swapped.loc[i, "mediator_token_edit_distance"] > 0 for i in clean}
    assert any(changed.values())  # the imagination follows the image: another image, another span
    for i in clean:  # and the representation moves exactly when the text does
        assert bool((edited["image-swap"][i] != clean[i]).any()) == changed[i]
    # input -> mediator rows for the verdict (latent_change's columns): floored by the input placebo (0 here)
    import pandas as pd

    change = pd.read_csv(tmp_path / "run" / "latent_change.csv").set_index("intervention")
    assert change.loc["image-swap", "metric"] in ("mediator_r2", "mediator_relative_change")
    assert change.loc["image-swap", "floor"] == 0 and change.loc["image-swap", "placebo"]
    assert change.loc["image-swap", "token_edit_distance"] > 0 == change.loc["input-placebo", "token_edit_distance"]
    assert change.loc["input-placebo", "move"] == 0
    text = summary.table[summary.table.intervention == "text-swap"].set_index("metric")
    assert text.loc["flip_rate", "placebo"] == 0


def test_no_placebo_when_asked_not_to(instances, tmp_path):
    subject = load_subject("organism-shortcut")
    summary = intervene(subject, instances[:2], [ImageSwap()], tmp_path / "run", n_boot=50, placebo=False)
    assert summary.interventions == ["image-swap"]
    assert summary.table.placebo.isna().all()
