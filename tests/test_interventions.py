"""Interventions: no-op edits reproduce the clean run, edits land only where asked, prefix reuse equals
re-running from scratch, layer edits by hook equal the same edit through nnsight, and bad input is refused."""

import numpy as np
import pandas as pd
import pytest
import torch

from latentprobe.data import builtin_instances
from latentprobe.model.decoding import LATENT, DecodeConfig, LatentDecoder
from latentprobe.errors import LatentProbeError
from latentprobe.runs.intervene import intervene
from latentprobe.interventions import (LatentFunction, LatentNoise, LatentPatch, LatentStats, LayerEditHooks,
                                       NNsightRunner, RowBinding, make_interventions)
from latentprobe.model.recording import Recorder, RecordSpec
from latentprobe.runs.store import TraceStore

from decoding_helpers import count_live_images, make_instances

SIZES = [(56, 56), (84, 112), (112, 56)]
CONFIG = DecodeConfig(max_new_tokens=10)


@pytest.fixture(scope="module")
def clean(tiny_subject, tmp_path_factory):
    instances = make_instances(tmp_path_factory.mktemp("imgs"), SIZES)
    decoder = LatentDecoder(tiny_subject, CONFIG)
    result = decoder.run(tiny_subject.encode(instances))
    stats = LatentStats.from_vectors(torch.cat([r.latent_vectors for r in result.rows]))
    return instances, result, stats


def _bind(iv, rows, stats, donors=None):
    return [iv.bind(RowBinding(r.instance_id, clean=r.latent_vectors, stats=stats,
                               donor=None if donors is None else donors[i].latent_vectors))
            for i, r in enumerate(rows)]


def test_noop_edits_reproduce_the_clean_run_exactly(tiny_subject, clean):
    instances, result, stats = clean
    decoder = LatentDecoder(tiny_subject, CONFIG)
    for iv in (LatentNoise(scale=0.0), LatentPatch(semantics="pin")):
        donors = result.rows  # patching each instance with itself
        edited = decoder.run(tiny_subject.encode(instances), _bind(iv, result.rows, stats, donors))
        for a, b in zip(result.rows, edited.rows):
            assert a.generated_ids == b.generated_ids
            assert torch.equal(a.latent_vectors, b.latent_vectors)


def test_noise_lands_only_on_chosen_steps_and_rows(tiny_subject, clean):
    instances, result, stats = clean
    decoder = LatentDecoder(tiny_subject, CONFIG)
    iv = LatentNoise(scale=3.0, steps=[2], semantics="pin", seed=4)
    edits = _bind(iv, result.rows, stats)
    edits[1] = None  # row 1 untouched
    edited = decoder.run(tiny_subject.encode(instances), edits)
    for r, (a, b) in enumerate(zip(result.rows, edited.rows)):
        diff = (a.latent_vectors - b.latent_vectors).norm(dim=-1)
        if r == 1:
            assert torch.equal(a.latent_vectors, b.latent_vectors)
        else:
            assert diff[[0, 1, 3]].max() < 1e-5 and diff[2] > 0.1  # pinned: later steps back to clean
            expected = 3.0 * stats.dim_std  # the noise has the per-dimension scale asked for
            ratio = float(((b.latent_vectors[2] - a.latent_vectors[2]) / expected).std())
            assert 0.6 < ratio < 1.4


def test_recompute_semantics_lets_the_edit_propagate(tiny_subject, clean):
    instances, result, stats = clean
    decoder = LatentDecoder(tiny_subject, CONFIG)
    recompute = decoder.run(tiny_subject.encode(instances),
                            _bind(LatentNoise(scale=3.0, steps=[1], semantics="recompute"), result.rows, stats))
    for a, b in zip(result.rows, recompute.rows):
        diff = (a.latent_vectors - b.latent_vectors).norm(dim=-1)
        assert diff[0] < 1e-5 and diff[1] > 0.1 and diff[2] > 1e-4  # later steps were recomputed from it


def test_prefix_reuse_equals_rerunning_from_scratch(tiny_subject, clean):
    instances, result, stats = clean
    decoder = LatentDecoder(tiny_subject, CONFIG)
    ivs = [LatentNoise(scale=1.0, seed=1), LatentNoise(scale=3.0, steps=[0], semantics="pin"),
           LatentPatch(), LatentFunction(lambda v, s: -v, name="negate")]
    donors = result.rows[1:] + result.rows[:1]
    prefill = decoder.prefill(tiny_subject.encode(instances))
    edits = [iv.bind(RowBinding(r.instance_id, clean=r.latent_vectors, stats=stats, donor=d.latent_vectors))
             for r, d in zip(result.rows, donors) for iv in ivs]
    swept = decoder.decode(prefill, edits, repeats=len(ivs))
    for m, iv in enumerate(ivs):
        alone = decoder.run(tiny_subject.encode(instances), edits[m::len(ivs)])
        for b, row in enumerate(alone.rows):
            other = swept.rows[b * len(ivs) + m]
            assert other.generated_ids == row.generated_ids
            torch.testing.assert_close(other.latent_vectors, row.latent_vectors, atol=1e-5, rtol=1e-4)


def test_layer_edit_by_hook_equals_the_same_edit_through_nnsight(tiny_subject, clean):
    instances, result, stats = clean
    layer, step = 1, 2  # edit block 0's output (hidden-state layer 1) at latent step 2 only
    decoder = LatentDecoder(tiny_subject, CONFIG)
    iv = LatentFunction(lambda v, s: v * 0.0 + 1.0, name="ones", steps=[step], layer=layer)
    edits = _bind(iv, result.rows, stats)
    with LayerEditHooks(decoder, edits):
        by_hook = decoder.run(tiny_subject.encode(instances), edits)

    def ones_at_step(model, ctx):
        rows = ((ctx.kinds == LATENT) & (ctx.latent_index == step)).nonzero().flatten().tolist()
        if rows:
            model.language_model.layers[layer - 1].output[rows, -1] = 1.0

    with NNsightRunner(decoder, ones_at_step):
        by_nnsight = decoder.run(tiny_subject.encode(instances))
    for a, b, c in zip(by_hook.rows, by_nnsight.rows, result.rows):
        assert a.generated_ids == b.generated_ids
        torch.testing.assert_close(a.latent_vectors, b.latent_vectors, atol=1e-5, rtol=1e-4)
        # the latent fed at step 3 is computed from the edited position: it changed; step <= 2 did not
        assert torch.allclose(a.latent_vectors[:3], c.latent_vectors[:3], atol=1e-5)
        assert not torch.allclose(a.latent_vectors[3], c.latent_vectors[3], atol=1e-4)


def test_intervene_writes_tidy_rows_and_summaries(tiny_subject, tmp_path):
    instances = builtin_instances(4)
    ivs = make_interventions("latent", ["noise", "patch"], scales=[0.0, 3.0]) + \
        make_interventions("input", ["image-swap", "image-blank"])
    intervene(tiny_subject, instances, ivs, tmp_path / "iv", batch_size=3, n_boot=100, placebo=False)
    rows = pd.read_parquet(tmp_path / "iv" / "effects_rows.parquet")
    assert len(rows) == len(instances) * len(ivs)
    assert {"subject", "intervention", "seed", "instance_id", "clean_parsed", "intervened_parsed", "latent_cosine",
            "clean_gold_prob", "intervened_gold_prob"} <= set(rows.columns)
    zero = rows[rows.intervention.str.startswith("noise(scale=0")]
    assert (zero.latent_cosine > 0.99999).all() and (zero.clean_parsed.fillna("-") == zero.intervened_parsed.fillna("-")).all()
    assert np.allclose(zero.clean_gold_prob, zero.intervened_gold_prob, atol=1e-6)
    swap = rows[rows.intervention == "image-swap"]
    assert swap[["correct_x0_z0", "correct_x1_z1", "correct_x0_z1", "correct_x1_z0"]].notna().all().all()
    table = pd.read_csv(tmp_path / "iv" / "effects_summary.csv")
    assert {"TE_correct", "NDE_correct", "NIE_correct", "flip_rate", "kl_clean_to_intervened"} <= set(table.metric)
    change = pd.read_csv(tmp_path / "iv" / "latent_change.csv")
    assert set(change.metric) >= {"change_ratio", "cosine", "relative_l2"}
    # issue 18: the rows input_latent decides on, pooled over steps (step NaN), and the distances behind them
    r2 = change[change.metric.isin(["latent_r2", "latent_relative_change"])]
    assert set(r2.intervention) == {"image-swap", "image-blank(colour=gray)"} and r2.step.isna().sum() == 2
    distances = pd.read_parquet(tmp_path / "iv" / "latent_change_instances.parquet")
    assert {"instance_id", "step", "move", "floor", "spread", "intervention"} <= set(distances.columns)
    assert (distances.floor == 0).all()  # no placebo in this run: the floor is taken as 0
    from latentprobe.report.build import effect_tables
    from latentprobe.verdicts import verdict_input_latent

    verdict = verdict_input_latent(effect_tables([tmp_path / "iv"]), tiny_subject.name)
    assert verdict.verdict in ("disconnect", "connected", "inconclusive") and "no placebo run" in verdict.evidence
    # resuming a finished run redoes nothing and keeps the same rows
    intervene(tiny_subject, instances, ivs, tmp_path / "iv", batch_size=3, n_boot=100, resume=True, placebo=False)
    assert len(pd.read_parquet(tmp_path / "iv" / "effects_rows.parquet")) == len(rows)


def test_bad_interventions_are_refused_before_running(tiny_subject, tmp_path):
    with pytest.raises(LatentProbeError, match="unknown latent intervention kind"):
        make_interventions("latent", ["nosie"])
    with pytest.raises(LatentProbeError, match="beyond the protocol"):
        intervene(tiny_subject, builtin_instances(2), make_interventions("latent", ["noise"], steps=[9]), tmp_path / "a")
    with pytest.raises(LatentProbeError, match="no text mediator"):
        intervene(tiny_subject, builtin_instances(2), make_interventions("text", ["text-swap"]), tmp_path / "b")
    with pytest.raises(LatentProbeError, match="only one"):
        intervene(tiny_subject, builtin_instances(1), make_interventions("latent", ["patch"]), tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_latent_stats_equal_direct_computation():
    vectors = torch.randn(37, 16, generator=torch.Generator().manual_seed(0)) * 3 + 1
    stats = LatentStats.from_vectors(vectors)
    torch.testing.assert_close(stats.mean_vector, vectors.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.dim_std, vectors.std(0), atol=1e-4, rtol=1e-4)
    assert abs(stats.mean_norm - float(vectors.norm(dim=-1).mean())) < 1e-4


def test_out_of_memory_halves_the_batch_and_loses_nothing(tiny_subject, monkeypatch):
    from latentprobe.runs.common import decode_with_isolation

    decoder = LatentDecoder(tiny_subject, CONFIG)
    sizes = []
    real_run = decoder.run

    def run(batch, *args, **kwargs):
        sizes.append(batch.batch_size)
        if batch.batch_size > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_run(batch, *args, **kwargs)

    monkeypatch.setattr(decoder, "run", run)
    results = list(decode_with_isolation(decoder, tiny_subject, builtin_instances(8), None))
    assert sizes == [8, 4, 2, 2, 4, 2, 2]
    assert [r[0].id for r in results] == [i.id for i in builtin_instances(8)]
    assert all(r[4] is None for r in results)


def test_recorded_states_at_an_edited_layer_are_the_edited_ones(tiny_subject, clean):
    instances, result, stats = clean
    decoder = LatentDecoder(tiny_subject, CONFIG)
    iv = LatentFunction(lambda v, s: torch.full_like(v, 2.0), name="twos", steps=[1], layer=1)
    edits = _bind(iv, result.rows, stats)
    with Recorder(decoder, RecordSpec(layers=[1])) as recorder, LayerEditHooks(decoder, edits):
        decoder.run(tiny_subject.encode(instances), edits)
        records = recorder.records()
    for record in records:
        assert torch.all(record["latent_layers"][0, 1] == 2.0)
        assert not torch.all(record["latent_layers"][0, 0] == 2.0)


def test_text_mediator_interventions_and_mediation(tmp_path):
    from latentprobe.model.subjects import SUBJECTS, _register_builtin_families, load_subject

    _register_builtin_families()
    if "organism-capimagine" not in SUBJECTS:
        pytest.skip("the capimagine organism is not shipped")
    from latentprobe.study.demo import demo_data
    from latentprobe.data import load_jsonl

    subject = load_subject("organism-capimagine")
    instances = load_jsonl(demo_data(), split="test")[:6]
    ivs = make_interventions("text", ["text-swap", "text-shuffle", "text-truncate"], scales=[0.0]) + \
        make_interventions("input", ["image-swap"])
    intervene(subject, instances, ivs, tmp_path / "text", batch_size=6, n_boot=100, placebo=False)
    rows = pd.read_parquet(tmp_path / "text" / "effects_rows.parquet")
    assert set(rows.target) == {"text", "input"} and len(rows) == 6 * len(ivs)
    truncated = rows[rows.intervention.str.startswith("text-truncate")]
    assert (truncated.mediator_text_given == "").all()
    swap = rows[rows.intervention == "image-swap"]
    assert swap[["correct_x0_z1", "correct_x1_z0"]].notna().all().all()
    table = pd.read_csv(tmp_path / "text" / "effects_summary.csv")
    assert "NIE_correct" in set(table.metric)
    similarity = table[(table.metric == "mediator_text_similarity") & (table.intervention == "image-swap")]
    assert len(similarity) == 1 and 0.0 <= similarity.estimate.iloc[0] <= 1.0


def test_resuming_a_partly_written_batch_writes_no_row_twice(tiny_subject, tmp_path):
    instances = builtin_instances(4)
    ivs = make_interventions("latent", ["noise", "zero"], scales=[3.0]) + make_interventions("input", ["image-blank"])
    out = tmp_path / "iv"
    intervene(tiny_subject, instances, ivs, out, batch_size=4, n_boot=50, shard_size=3, placebo=False)
    full = pd.read_parquet(out / "effects_rows.parquet")
    # lose the last written group of records, as an interrupted run would
    last = sorted((out / "index").glob("*.parquet"))[-1]
    last.unlink()
    (out / "shards" / f"{last.stem}.safetensors").unlink(missing_ok=True)
    assert len(TraceStore(out).index()) < len(instances) * (len(ivs) + 1)
    intervene(tiny_subject, instances, ivs, out, batch_size=4, n_boot=50, shard_size=3, resume=True, placebo=False)
    rows = pd.read_parquet(out / "effects_rows.parquet")
    assert len(rows) == len(full) == len(instances) * len(ivs)
    assert not rows.duplicated(["instance_id", "intervention"]).any()


# -- applied / not applied --------------------------------------------------------------------------------------
def _with_broken_instance(instances):
    from latentprobe.data import Instance

    broken = Instance(id="broken", question="q", answer="red", images=["/nonexistent/broken.png"],
                      options=["red", "green", "blue", "yellow"])
    return list(instances) + [broken]


def test_edits_with_a_failed_donor_are_not_applied_and_not_counted(tiny_subject, tmp_path, caplog):
    instances = _with_broken_instance(builtin_instances(3))
    ivs = make_interventions("latent", ["patch", "drop"], scales=[9]) + make_interventions("input", ["image-swap"])
    summary = intervene(tiny_subject, instances, ivs, tmp_path / "iv", batch_size=4, n_boot=50, placebo=False,
                        config=DecodeConfig(max_new_tokens=6))
    rows = pd.read_parquet(tmp_path / "iv" / "effects_rows.parquet")
    assert {"applied", "not_applied_reason"} <= set(rows.columns)
    from latentprobe.interventions import derangement

    donor_of = {inst.id: instances[d].id for inst, d in zip(instances, derangement(len(instances), 0))}
    for _, row in rows.iterrows():
        donor_failed = donor_of[row.instance_id] == "broken"
        if row.intervention in ("patch(steps=all,sem=recompute)", "image-swap"):
            assert row.applied == (not donor_failed)
            if donor_failed:
                assert "donor instance broken failed" in row.not_applied_reason
        if row.intervention == "drop(keep=9)":  # 4 clean latent steps: keeping 9 drops nothing
            assert not row.applied and "drops nothing" in row.not_applied_reason
    table = pd.read_csv(tmp_path / "iv" / "effects_summary.csv")
    n_applied = rows.groupby("intervention").applied.sum()
    for name in ("patch(steps=all,sem=recompute)", "image-swap"):
        flip = table[(table.intervention == name) & (table.metric == "flip_rate")]
        assert int(flip.n.iloc[0]) == int(n_applied[name]) == 2  # 3 ok instances, one of them the broken's heir
        rate = table[(table.intervention == name) & (table.metric == "applied_rate")]
        assert abs(rate.estimate.iloc[0] - 2 / 3) < 1e-9 and int(rate.n.iloc[0]) == 3
    drop = table[table.intervention == "drop(keep=9)"]
    assert set(drop.metric) == {"applied_rate"} and drop.estimate.iloc[0] == 0.0  # no effect is claimed for it
    lines = "\n".join(summary.lines())
    assert "WARNING: drop(keep=9) was NOT APPLIED in 3 of 3 rows" in lines
    assert "not applied     patch(steps=all,sem=recompute): 1 of 3 rows" in lines
    assert any("NOT APPLIED" in rec.message for rec in caplog.records)


def test_text_edits_without_markers_are_not_applied(tiny_subject, tmp_path):
    from latentprobe.model.subject import Subject

    subject = Subject(name="tiny-text", model=tiny_subject.model, tokenizer=tiny_subject.tokenizer,
                      image_processor=tiny_subject.image_processor, protocol=None, mediator="text",
                      text_mediator_markers=("<imagine>", "</imagine>"), max_new_tokens=6)
    ivs = make_interventions("text", ["text-truncate", "text-swap"], scales=[0.5])
    summary = intervene(subject, builtin_instances(3), ivs, tmp_path / "text", batch_size=3, n_boot=50, placebo=False)
    rows = pd.read_parquet(tmp_path / "text" / "effects_rows.parquet")
    assert len(rows) == 6 and not rows.applied.any()  # a random model never writes the open marker
    assert rows.not_applied_reason.str.contains("open marker was not found").all()
    table = pd.read_csv(tmp_path / "text" / "effects_summary.csv")
    assert set(table.metric) == {"applied_rate"} and (table.estimate == 0).all()
    assert sum("NOT APPLIED" in line for line in summary.lines()) == 2


def test_bound_edits_know_which_steps_they_edited(tiny_subject, clean):
    instances, result, stats = clean
    decoder = LatentDecoder(tiny_subject, CONFIG)
    short_donor = result.rows[1].latent_vectors[:2]  # the donor has only steps 0 and 1
    patch = LatentPatch(steps=[1, 3])
    edits = [patch.bind(RowBinding("i0", donor=short_donor)), patch.bind(RowBinding("i1", donor=None)),
             LatentNoise(scale=1.0, steps=[3]).bind(RowBinding("i2", stats=stats))]
    edited = decoder.run(tiny_subject.encode(instances), edits)
    assert edits[0].edited_steps == {1} and edits[0].not_applied_reason(4) is None
    assert edits[1].edited_steps == set() and "donor has no clean latent" in edits[1].not_applied_reason(4)
    assert edits[2].edited_steps == {3}
    torch.testing.assert_close(edited.rows[0].latent_vectors[1], short_donor[1])


def test_an_edit_that_makes_values_non_finite_fails_its_rows(tiny_subject, tmp_path):
    nan = LatentFunction(lambda v, s: v * float("inf") * 0.0, name="nan-edit", steps=[2])
    ivs = [nan] + make_interventions("latent", ["zero"])
    intervene(tiny_subject, builtin_instances(3), ivs, tmp_path / "nan", batch_size=3, n_boot=50, placebo=False,
              config=DecodeConfig(max_new_tokens=6))
    index = TraceStore(tmp_path / "nan").index()
    failed = index[index.intervention == nan.name]
    assert len(failed) == 3 and (failed.status == "failed").all()
    assert failed.error.str.contains("non-finite values").all()
    rows = pd.read_parquet(tmp_path / "nan" / "effects_rows.parquet")
    assert nan.name not in set(rows.intervention) and len(rows) == 3  # the zero edit's rows go on


@pytest.mark.parametrize("kind_target, value", [(("latent", "noise"), float("nan")), (("latent", "noise"), -1.0),
                                                (("latent", "noise"), float("inf")), (("input", "image-noise"), float("nan")),
                                                (("input", "image-mask"), 1.5), (("text", "text-truncate"), float("nan"))])
def test_a_scale_outside_its_range_is_refused_by_the_class_too(kind_target, value):
    from latentprobe.errors import LatentProbeError

    target, kind = kind_target
    with pytest.raises(LatentProbeError, match="must be in"):
        make_interventions(target, [kind], scales=[value])


def test_intervene_holds_only_a_batchs_images_never_the_datasets(tiny_subject, tmp_path, monkeypatch):
    """Issue 22 (memory flat in the number of instances): the clean runs kept every instance's decoded images to
    the end of the run (a benchmark's photographs are about 10 MB each, decoded); now a batch's own images and its
    donors' are decoded when the batch's edits run and let go after it, so at most two batches' worth are alive
    at any prefill (24 here before: every instance's)."""
    import latentprobe.runs.common as common
    import latentprobe.runs.intervene as intervene_module

    instances = builtin_instances(24)
    ivs = make_interventions("latent", ["noise"], scales=[3.0]) + make_interventions("input", ["image-swap"])
    most = count_live_images(monkeypatch, [common, intervene_module])
    summary = intervene(tiny_subject, instances, ivs, tmp_path / "iv", batch_size=4, n_boot=20, placebo=False)
    assert 0 < most[0] <= 2 * 4, most[0]  # a batch's own images and its donors' (24 instances in 6 batches)
    rows = pd.read_parquet(tmp_path / "iv" / "effects_rows.parquet")
    assert summary.n_failed == 0 and len(rows) == len(instances) * len(ivs)
    assert rows[rows.intervention == "image-swap"].applied.all()  # every swap read its donor's image
