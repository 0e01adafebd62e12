"""The component controls (no-latent, markers-only, dummy, oracle), the text-model ablations (noise-norm,
mean-step) and the contribution table, held against independent references: a fresh prefill of the prompt
without its start token, the organisms' own training targets (`encode_rows`), scipy's exact intervals, and the
closed forms of the ablations."""

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from latentprobe.errors import LatentProbeError
from latentprobe.interventions import (DummyToken, LatentNoise, MarkersOnly, NoLatent, NormNoise, OracleLatents,
                                       OracleOther, RowBinding, StepMean, make_interventions, step_means)
from latentprobe.interventions.latent import LatentStats
from latentprobe.model.decoding import DecodeConfig, LatentDecoder, prefill_without_start
from latentprobe.model.protocol import LVR

from decoding_helpers import make_instances, with_protocol


@pytest.fixture(scope="module")
def bottleneck(one_thread):
    from latentprobe.model.subjects import load_subject

    return load_subject("organism-bottleneck")


@pytest.fixture(scope="module")
def held_out():
    from latentprobe.data.instances import load_jsonl
    from latentprobe.organisms.recipes import ORGANISMS
    from latentprobe.organisms.training import organism_held_out_data

    return load_jsonl(organism_held_out_data(ORGANISMS["bottleneck"], 8))


def _bind(intervention, instance_id="x", **binding):
    return intervention.bind(RowBinding(instance_id, **binding))


def _stripped_prompts(subject, instances):
    start = subject.protocol.start_token
    prompts = [subject.prompt_text(inst) for inst in instances]
    assert all(p.endswith(start) for p in prompts)
    return [p[: -len(start)] for p in prompts]


# ------------------------------------------------------------------------------------------- no-latent
def test_no_latent_prefill_is_a_fresh_prefill_without_the_start_token(bottleneck, held_out):
    decoder = LatentDecoder(bottleneck, DecodeConfig(max_new_tokens=6))
    instances = held_out[:4]
    derived = prefill_without_start(decoder, decoder.prefill(bottleneck.encode(instances)))
    fresh = decoder.prefill(bottleneck.encode(instances, prompts=_stripped_prompts(bottleneck, instances)))
    assert torch.equal(derived.batch.input_ids, fresh.batch.input_ids)
    assert torch.equal(derived.position_ids, fresh.position_ids)
    torch.testing.assert_close(derived.hidden, fresh.hidden, atol=1e-5, rtol=1e-5)
    edits = [_bind(NoLatent(), inst.id, clean=torch.zeros((4, 96))) for inst in instances]
    a = decoder.decode(derived, edits)
    b = decoder.decode(fresh, edits)
    start = bottleneck.resolved_protocol.start_id
    for row_a, row_b in zip(a.rows, b.rows):
        assert row_a.generated_ids == row_b.generated_ids
        assert row_a.n_latent_steps == 0 and start not in row_a.generated_ids
        torch.testing.assert_close(row_a.answer_logits, row_b.answer_logits, atol=1e-4, rtol=1e-4)


def test_no_latent_answer_region_of_the_bottleneck_is_blind_to_the_image_from_its_first_token(bottleneck, held_out):
    """One layer, answer blind to image tokens from the first generated token on: only the first choice (made from
    the prompt's last state, which sees the image in every subject) can depend on the image; a row that makes the
    same first choice under another image continues exactly alike (the organism's mask, applied at once)."""
    decoder = LatentDecoder(bottleneck, DecodeConfig(max_new_tokens=4))
    from latentprobe.data.instances import load_images

    instances = held_out[:8]
    own = [load_images(inst) for inst in instances]
    swapped = own[1:] + own[:1]
    results = []
    for images in (own, swapped):
        prefill = prefill_without_start(decoder, decoder.prefill(bottleneck.encode(instances, images=images)))
        edits = [_bind(NoLatent(), inst.id, clean=torch.zeros((4, 96))) for inst in instances]
        results.append(decoder.decode(prefill, edits))
    same_start = [(a, b) for a, b in zip(*(r.rows for r in results)) if a.generated_ids[0] == b.generated_ids[0]]
    assert same_start
    for a, b in same_start:
        assert a.generated_ids == b.generated_ids
        torch.testing.assert_close(a.answer_logits, b.answer_logits)


def test_no_latent_from_a_prefill_with_the_forced_start_is_refused(bottleneck, held_out):
    decoder = LatentDecoder(bottleneck, DecodeConfig(max_new_tokens=4))
    prefill = decoder.prefill(bottleneck.encode(held_out[:2]))
    with pytest.raises(LatentProbeError, match="prefill_without_start"):
        decoder.decode(prefill, _bind(NoLatent(), clean=torch.zeros((4, 96))))


# ---------------------------------------------------------------------------------------- markers-only
def test_markers_only_keeps_both_markers_and_the_clean_positions(bottleneck, held_out):
    decoder = LatentDecoder(bottleneck, DecodeConfig(max_new_tokens=6))
    prefill = decoder.prefill(bottleneck.encode(held_out[:2]))
    clean = decoder.decode(prefill)
    end = bottleneck.resolved_protocol.end_id
    k = clean.rows[0].n_latent_steps
    for positions, offset in (("kept", k), ("shifted", 0)):
        edits = [_bind(MarkersOnly(positions=positions), clean=row.latent_vectors) for row in clean.rows]
        result = decoder.decode(prefill, edits)
        for r, row in enumerate(result.rows):
            assert row.n_latent_steps == 0 and row.generated_ids[0] == end
            # the end token's position: right after the start token, plus the slots' positions when kept
            start_position = int(prefill.position_ids[0, r, -1])
            assert int(result.position_ids[0, r, result.prompt_length]) == start_position + 1 + offset
    kept = decoder.decode(prefill, [_bind(MarkersOnly(), clean=row.latent_vectors) for row in clean.rows])
    end_column = clean.prompt_length + k
    assert torch.equal(kept.position_ids[:, :, kept.prompt_length], clean.position_ids[:, :, end_column])


def test_markers_only_writes_the_end_marker_under_a_model_choice_exit(tiny_subject, tmp_path):
    subject = with_protocol(tiny_subject, LVR, force_start=True)  # LVR: after the slots, the model's own choice
    decoder = LatentDecoder(subject, DecodeConfig(max_new_tokens=5))
    batch = subject.encode(make_instances(tmp_path, [(56, 56), (84, 112)]))
    result = decoder.run(batch, _bind(MarkersOnly(), clean=torch.zeros((4, subject.hidden_size))))
    end = subject.resolved_protocol.end_id
    assert all(row.generated_ids[0] == end and row.n_latent_steps == 0 for row in result.rows)


def test_controls_without_a_latent_phase_in_the_clean_run_are_not_applied():
    binding = RowBinding("x", clean=torch.zeros((0, 8)))
    for control in (NoLatent(), MarkersOnly()):
        assert "no latent phase" in control.not_applied_reason(binding, set(), 0)
        assert control.not_applied_reason(RowBinding("x", clean=torch.zeros((3, 8))), set(), 0) is None


# ------------------------------------------------------------------------------------------------ dummy
def test_dummy_feeds_one_token_embedding_and_refuses_a_multi_token_string(bottleneck, held_out):
    dummy = DummyToken()
    dummy.check_subject(bottleneck)
    pad = bottleneck.resolved_protocol.pad_id
    decoder = LatentDecoder(bottleneck, DecodeConfig(max_new_tokens=6))
    result = decoder.run(bottleneck.encode(held_out[:2]), _bind(dummy, clean=torch.zeros((4, 96))))
    embedding = bottleneck.model.get_input_embeddings().weight[pad].detach()
    for row in result.rows:
        assert row.n_latent_steps == 4
        torch.testing.assert_close(row.latent_vectors, embedding.expand(4, -1))
    with pytest.raises(LatentProbeError, match="not one"):
        DummyToken(token="red green blue").check_subject(bottleneck)
    with pytest.raises(LatentProbeError, match="layer"):
        DummyToken(layer=1)


# ----------------------------------------------------------------------------------------------- oracle
@pytest.mark.parametrize("organism, source_name", [("bottleneck", "answer-region"), ("mirage", "helper-image")])
def test_oracle_sources_are_the_organisms_training_targets(organism, source_name, one_thread):
    """The training code's alignment targets (`encode_rows`: LVR's region tokens, Mirage's pooled helper cells)
    are the independent reference."""
    from latentprobe.data.instances import load_images, load_jsonl
    from latentprobe.model.subjects import load_subject
    from latentprobe.organisms.recipes import ORGANISMS
    from latentprobe.organisms.training import encode_rows, organism_held_out_data
    from latentprobe.where.oracle_sources import make_oracle_source

    recipe = ORGANISMS[organism]
    subject = load_subject(f"organism-{organism}")
    instances = load_jsonl(organism_held_out_data(recipe, 3))
    reference = encode_rows(subject, recipe, instances).align_targets
    source = make_oracle_source("auto", subject)
    assert source.name == source_name
    for i, inst in enumerate(instances):
        torch.testing.assert_close(source.targets(subject, inst, load_images(inst), 4), reference[i].float())


def test_oracle_rows_feed_the_targets_and_a_missing_target_is_not_applied(bottleneck, held_out, tmp_path):
    from latentprobe.runs.intervene import intervene
    from latentprobe.runs.store import TraceStore
    from latentprobe.where.oracle_sources import AnswerRegionTokens
    from latentprobe.data.instances import load_images

    instances = list(held_out[:3])
    instances[2] = replace(instances[2], attributes={})  # no answer region: no oracle target
    source = AnswerRegionTokens()
    own, other = OracleLatents(source=source), OracleOther(source=source)
    summary = intervene(bottleneck, instances, [own, other], tmp_path / "run", batch_size=3, n_boot=50)
    rows = pd.read_csv(tmp_path / "run" / "effects_rows.csv")
    missing = rows[rows.instance_id == instances[2].id]
    own_missing = missing[missing.intervention == own.name]
    assert not own_missing.applied.iloc[0] and "names no answer region" in own_missing.not_applied_reason.iloc[0]
    store = TraceStore(tmp_path / "run")
    index = store.index()
    fed = index[(index.intervention == own.name) & (index.instance_id == instances[0].id)].record_id.iloc[0]
    expected = source.targets(bottleneck, instances[0], load_images(instances[0]), 4)
    torch.testing.assert_close(store.tensor(fed, "latent"), expected)
    assert summary.contributions is not None
    own_accuracy = summary.contributions.query("condition == 'oracle' and metric == 'accuracy'")
    assert int(own_accuracy.n.iloc[0]) == 2  # the instance without a target is left out, not counted as unchanged


def test_oracle_without_a_source_is_refused_before_any_model_runs(bottleneck):
    [oracle] = make_interventions("latent", ["oracle"])
    with pytest.raises(LatentProbeError, match="no oracle source"):
        oracle.check_subject(bottleneck)
    [other] = make_interventions("latent", ["oracle-other"])
    with pytest.raises(LatentProbeError, match="another instance"):
        other.check(4, 1)


# -------------------------------------------------------------------------------- noise-norm, mean-step
def test_noise_norm_is_noise_relative_to_the_mean_norm():
    rng = torch.Generator().manual_seed(0)
    clean = torch.randn((50, 4096), generator=rng) * 3
    stats = LatentStats.from_vectors(clean)
    binding = RowBinding("i0", stats=stats)
    steps = torch.tensor([0, 1])
    norm = NormNoise(seed=7).transform(clean[:2], steps, binding)
    reference = LatentNoise(scale=0.5, relative_to="norm", seed=7).transform(clean[:2], steps, binding)
    torch.testing.assert_close(norm, reference)
    sigma = 0.5 * stats.mean_norm / 4096 ** 0.5  # causal-latent-cot: 0.5 x mean||h|| / sqrt(d)
    assert float((norm - clean[:2]).std()) == pytest.approx(sigma, rel=0.03)
    assert NormNoise().name == "noise-norm(scale=0.5,steps=all,sem=recompute)"


def test_mean_step_feeds_each_steps_dataset_mean():
    runs = [torch.arange(12.).reshape(3, 4), torch.arange(12., 20.).reshape(2, 4), torch.zeros((0, 4))]
    means = step_means(runs, n_steps=4)
    assert means.shape == (3, 4)
    np.testing.assert_allclose(means[0], (runs[0][0] + runs[1][0]) / 2)
    np.testing.assert_allclose(means[2], runs[0][2])  # only the first run reached step 2
    stats = LatentStats(mean_norm=1.0, dim_std=torch.ones(4), mean_vector=torch.zeros(4), step_means=means)
    out = StepMean().transform(torch.ones((2, 4)), torch.tensor([2, 0]), RowBinding("x", stats=stats))
    torch.testing.assert_close(out, torch.stack([means[2], means[0]]))


# ------------------------------------------------------------------------------------- contribution table
def _rows(subject, condition, correct, clean_correct, parsed, clean_parsed, **extra):
    n = len(correct)
    return pd.DataFrame(dict(subject=subject, intervention=condition, instance_id=[f"i{k}" for k in range(n)],
                             applied=True, clean_correct=clean_correct, intervened_correct=correct,
                             clean_parsed=clean_parsed, intervened_parsed=parsed, **extra))


def test_contribution_table_against_exact_intervals_and_the_share_formula():
    from scipy.stats import binomtest

    from latentprobe.stats.contributions import contribution_table

    n = 40
    clean = [True] * 36 + [False] * 4
    clean_parsed = ["A"] * n
    none = [True] * 10 + [False] * 30
    markers = [True] * 28 + [False] * 12
    frames = [_rows("s", "no-latent", none, clean, ["A" if c else "B" for c in none], clean_parsed),
              _rows("s", "markers-only", markers, clean, ["A" if c else "B" for c in markers], clean_parsed)]
    table = contribution_table(pd.concat(frames), n_boot=400, seed=1)
    get = lambda condition, metric: table[(table.condition == condition) & (table.metric == metric)].iloc[0]
    full = get("full", "accuracy")
    ci = binomtest(36, 40).proportion_ci(method="exact")
    assert full.estimate == pytest.approx(0.9) and full.ci_low == pytest.approx(ci.low)
    change = get("markers-only", "answer_change")
    ci = binomtest(12, 40).proportion_ci(method="exact")
    assert change.k == 12 and change.ci_high == pytest.approx(ci.high)
    share = get("markers-only", "markers_share")
    assert share.estimate == pytest.approx((0.7 - 0.25) / (0.9 - 0.25))
    assert share.ci_low < share.estimate < share.ci_high
    # no gain over no-latent: the share is undefined, with the reason, never a number
    flat = contribution_table(pd.concat([_rows("s", "no-latent", clean, clean, clean_parsed, clean_parsed),
                                         frames[1]]), n_boot=100)
    row = flat[flat.metric == "markers_share"].iloc[0]
    assert np.isnan(row.estimate) and "not above 0" in row.note


def test_moved_to_target_counts_only_donors_with_another_answer():
    from latentprobe.stats.contributions import contribution_table

    parsed = ["B", "B", "C", "A"]
    rows = _rows("s", "oracle-other(source=answer-region)", [False, False, False, True], [True] * 4, parsed,
                 ["A"] * 4, oracle_target_answer=["B", "C", "C", "A"], oracle_own_answer=["A"] * 4, n_options=4)
    table = contribution_table(rows, n_boot=50)
    moved = table[table.metric == "moved_to_target"].iloc[0]
    assert (moved.k, moved.n, moved.chance) == (2, 3, 0.25)  # the donor with the same answer is left out


def test_control_roles_in_the_latent_answer_verdict():
    from latentprobe.verdicts.causal import edit_role

    assert edit_role("oracle-other(source=answer-region,steps=all,sem=recompute)") == "information"
    assert edit_role("oracle(source=answer-region,steps=all,sem=recompute)") == "reference"
    for name in ("no-latent", "markers-only", "dummy(token=pad,steps=all,sem=recompute)", "mean-step(steps=all)",
                 "noise-norm(scale=0.5,steps=all,sem=recompute)"):
        assert edit_role(name) == "disruption"


def test_cli_refuses_bad_control_settings_in_one_line(capsys, tmp_path):
    from latentprobe.cli import main

    status = main(["intervene", "--subject", "organism-bottleneck", "--limit", "2", "--target", "latent",
                   "--kind", "dummy", "--dummy-token", "red green blue", "--out", str(tmp_path / "x"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "not one" in err[0]


# ------------------------------------------------------------------------------------------- decodability
def test_decodability_finds_where_a_planted_answer_appears():
    """Answer planted in the 'after' states only at layer 1, in latent step 1 at half strength: the nested rows
    find it there, the gap's interval lies above 0, and nothing is decodable at step 0 (pure noise)."""
    from latentprobe.stats.decodability import decodability

    rng = np.random.default_rng(1)
    n, d = 160, 6
    labels = np.repeat(np.arange(4), n // 4)
    onehot = np.eye(4)[labels]
    noise = lambda: rng.normal(size=(n, d))  # noqa: E731
    features = {("latent", 0, 0): noise(), ("latent", 0, 1): noise(),
                ("latent", 1, 0): noise(), ("latent", 1, 1): noise() + np.pad(onehot, ((0, 0), (0, 2))) * 0.8,
                ("after", 0, 0): noise(), ("after", 0, 1): noise() + np.pad(onehot, ((0, 0), (0, 2))) * 4}
    cells, gap = decodability(features, labels, [f"i{k}" for k in range(n)], subject="s", n_boot=300)
    nested = cells[cells.selection == "nested"].set_index(["position", "step"])
    assert not nested.loc[("latent", 0), "decodable"] and nested.loc[("latent", 1), "decodable"]
    assert nested.loc[("after", 0), "layer"] == 1 and nested.loc[("after", 0), "accuracy"] > 0.9
    g = gap.iloc[0]
    assert g.first_decodable == "latent[1]" and g.gap_ci_low > 0 and g.after_decodable
    with pytest.raises(LatentProbeError, match="'after' states"):
        decodability({k: v for k, v in features.items() if k[0] == "latent"}, labels, np.arange(n))


def test_decodability_study_refuses_a_trace_without_answer_states(tmp_path, bottleneck, held_out):
    from latentprobe.model.recording import RecordSpec
    from latentprobe.runs.trace import trace
    from latentprobe.where.decodability import decodability_study

    trace(bottleneck, held_out[:4], tmp_path / "t", spec=RecordSpec(layers="all"))
    with pytest.raises(LatentProbeError, match="--answer-states"):
        decodability_study(tmp_path / "t")
    with pytest.raises(LatentProbeError, match="answer_positions"):
        decodability_study(tmp_path / "t", answer_positions=0)


# ------------------------------------------------------------------------------------------- step x step
def test_step_influence_map_is_causal_and_its_placebo_is_zero(bottleneck, held_out):
    from latentprobe.where.step_influence import step_influence

    rows, table = step_influence(bottleneck, held_out[:6], kind="mean", batch_size=6, n_boot=100)
    placebo = rows[rows.source_step == -1]
    assert (placebo.value == 0).all()  # float32 on CPU: the same path reproduces the clean run exactly
    latent = table[table.target != "answer"].assign(target=lambda t: t.target.astype(int))
    earlier = latent[latent.target < latent.source_step]
    assert (earlier.estimate == 0).all()  # an edit at step i cannot move an earlier step
    own = latent[latent.target == latent.source_step]
    assert (own.estimate > 0).all()
    assert len(table[table.target == "answer"]) == 4  # K = 4 rows of the K x (K + 1) map


def test_step_influence_refuses_bad_settings_before_running(bottleneck, held_out, tiny_subject):
    from latentprobe.model.decoding import DecodeConfig
    from latentprobe.where.step_influence import check_step_influence

    config = DecodeConfig()
    with pytest.raises(LatentProbeError, match="choose from"):
        check_step_influence(bottleneck, held_out, "shuffle", 3.0, config)
    with pytest.raises(LatentProbeError, match="noise scale"):
        check_step_influence(bottleneck, held_out, "noise", float("nan"), config)
    with pytest.raises(LatentProbeError, match="at least 2 latent steps"):
        check_step_influence(bottleneck, held_out, "patch", 3.0, DecodeConfig(latent_steps=1))


# ------------------------------------------------------------------------------------------ LatentLens
def test_latent_lens_neighbours_are_the_nearest_reference_states(bottleneck, held_out, tmp_path):
    """Against a brute-force cosine search over the reference file's token states, computed here with a plain
    forward of each line."""
    from latentprobe.where.latent_lens import latent_lens_table

    reference = tmp_path / "reference.txt"
    reference.write_text("the top-left cell is red\nthe bottom-right cell is blue\n\nA B C D\n", encoding="utf-8")
    table = latent_lens_table(bottleneck, held_out[:2], layers=[1], top_k=3, reference_file=reference)
    assert len(table) == 2 * 4 and set(table.layer) == {1}
    tokenizer = bottleneck.tokenizer
    states, tokens = [], []
    for line in ("the top-left cell is red", "the bottom-right cell is blue", "A B C D"):
        ids = tokenizer(line, add_special_tokens=False)["input_ids"]
        positions = torch.arange(len(ids)).view(1, 1, -1).expand(3, 1, -1)
        with torch.no_grad():
            out = bottleneck.model.model(input_ids=torch.tensor([ids]), position_ids=positions, use_cache=False,
                                         output_hidden_states=True)
        states.append(out.hidden_states[1][0])
        tokens += tokenizer.convert_ids_to_tokens(ids)
    states = torch.nn.functional.normalize(torch.cat(states), dim=-1)
    from latentprobe.model.decoding import LatentDecoder, replay

    decoder = LatentDecoder(bottleneck)
    batch = bottleneck.encode(held_out[:2])
    result = decoder.run(batch)
    hidden = replay(bottleneck, batch, result, output_hidden_states=True)[1]
    row = table[(table.instance_id == held_out[0].id) & (table.latent_step == 2)].iloc[0]
    position = result.prompt_length + result.rows[0].latent_segments[0][0] + 2
    cosines = states @ torch.nn.functional.normalize(hidden[0, position], dim=0)
    best = int(cosines.argmax())
    assert row.neighbour_tokens[0] == tokens[best]
    assert row.neighbour_cosines[0] == pytest.approx(float(cosines[best]), abs=1e-4)
    with pytest.raises(LatentProbeError, match="no non-empty line"):
        (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
        latent_lens_table(bottleneck, held_out[:1], reference_file=tmp_path / "empty.txt")
    with pytest.raises(LatentProbeError, match="out of range"):
        latent_lens_table(bottleneck, held_out[:1], layers=[7])


# --------------------------------------------------------------------------- the organisms, as built (slow)
@pytest.mark.slow
def test_controls_recover_what_the_organisms_were_built_with(tmp_path, one_thread):
    """80 held-out questions each (0 changes in 80 is the first count whose exact bound falls below 0.05)."""
    from latentprobe.model.subjects import load_subject
    from latentprobe.runs.common import default_instances
    from latentprobe.runs.intervene import intervene
    from latentprobe.where.oracle_sources import attach_oracle_sources

    def table(name):
        subject = load_subject(name)
        instances, _ = default_instances(name, limit=80)
        ivs = make_interventions("latent", ["no-latent", "markers-only", "dummy", "oracle", "oracle-other"])
        attach_oracle_sources(ivs, subject)
        out = intervene(subject, instances, ivs, tmp_path / name, batch_size=16, n_boot=500).contributions
        return lambda condition, metric: out[(out.condition == condition) & (out.metric == metric)].iloc[0]

    shortcut = table("organism-shortcut")
    for condition in ("markers-only", "dummy", "oracle", "oracle-other"):  # slot content never reaches its answer
        assert shortcut(condition, "answer_change").ci_high < 0.05
    assert shortcut("markers-only", "markers_share").estimate == pytest.approx(1.0)
    bottleneck = table("organism-bottleneck")
    markers = bottleneck("markers-only", "accuracy")
    assert markers.ci_low <= 0.25 <= markers.ci_high  # chance without the slots' content
    assert bottleneck("no-latent", "accuracy").ci_high < 0.5
    assert bottleneck("oracle-other", "moved_to_target").ci_low > 0.25  # another cell's targets move the answer
    lvr = table("organism-lvr")
    assert lvr("oracle", "answer_change").ci_high < 0.05  # its own targets keep its accuracy


@pytest.mark.slow
def test_decodability_gap_separates_bottleneck_and_shortcut(tmp_path, one_thread):
    from latentprobe.model.recording import RecordSpec
    from latentprobe.model.subjects import load_subject
    from latentprobe.runs.common import default_instances
    from latentprobe.runs.trace import trace
    from latentprobe.where.decodability import decodability_study

    gaps = {}
    for name in ("organism-bottleneck", "organism-shortcut"):
        instances, _ = default_instances(name, limit=120)
        trace(load_subject(name), instances, tmp_path / name, spec=RecordSpec(layers="all", answer=True))
        gaps[name] = decodability_study(tmp_path / name, n_boot=500)[1].iloc[0]
    bottleneck, shortcut = gaps["organism-bottleneck"], gaps["organism-shortcut"]
    assert bottleneck.at_accuracy > 0.8 and bottleneck.gap_ci_high < 0.25  # decodable at the latent steps
    assert shortcut.at_accuracy < 0.6 and shortcut.gap_ci_low > 0.3  # mostly only after them


def test_step_influence_cells_are_the_placebo_corrected_r2_of_the_input_latent_verdict():
    # The map's latent cells read on the input -> latent verdict's scale: squared change over the mean squared
    # distance between two instances, corrected by the placebo floor in numerator and denominator.
    from latentprobe.stats.latent_effect import latent_r2
    from latentprobe.stats.step_influence import influence_map, relative_sq_change, step_spread

    rng = np.random.default_rng(5)
    clean = rng.normal(size=(40, 6))
    edited = clean + rng.normal(scale=0.8, size=clean.shape)
    placebo = clean + rng.normal(scale=0.1, size=clean.shape)
    spread = step_spread([c[None] for c in clean], 1)[0]
    rows = []
    for i in range(40):
        rows.append(dict(subject="s", instance_id=i, kind="noise", source_step=0, target="0", applied=True,
                         value=relative_sq_change(clean[i], edited[i], spread)))
        rows.append(dict(subject="s", instance_id=i, kind="noise", source_step=-1, target="0", applied=True,
                         value=relative_sq_change(clean[i], placebo[i], spread)))
    cell = influence_map(pd.DataFrame(rows), n_boot=200).iloc[0]
    oracle = latent_r2(clean, edited, placebo=placebo, n_boot=200)
    assert cell.metric == "latent_r2"
    assert cell.estimate == pytest.approx(oracle["r2"], rel=1e-9)
    assert cell.ci_low < cell.estimate < cell.ci_high
