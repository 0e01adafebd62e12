"""Activation patching maps: exact against independent code paths (the decoder's own latent edits), against
what the organisms' wiring forces, and refusing bad grids before any model runs."""


import numpy as np
import pandas as pd
import pytest

from latentprobe.cli import main
from latentprobe.model.decoding import DecodeConfig, LatentDecoder
from latentprobe.errors import LatentProbeError
from latentprobe.interventions import LatentPatch, LayerEditHooks, RowBinding
from latentprobe.where.patching import (PatchGrid, attribution_agreement, default_instances, normalized_effect,
                                  patch_map, reference_run, resolve_grid, run_cells, summarize_patching)
from latentprobe.model.subjects import load_subject

from decoding_helpers import count_live_images


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster (tests/conftest.py)


@pytest.fixture(scope="module")
def subjects():
    return {}


def _subject(subjects, name):
    if name not in subjects:
        subjects[name] = load_subject(f"organism-{name}")
    return subjects[name]


@pytest.fixture(scope="module")
def held_out():
    return default_instances("organism-bottleneck", limit=64)[0]


def _runs(subject, instances, grid):
    """Clean and image-swapped reference runs of ``instances`` (donor: the next instance)."""
    from latentprobe.data import load_images

    decoder = LatentDecoder(subject, DecodeConfig(max_new_tokens=subject.max_new_tokens))
    images = [load_images(i) for i in instances]
    clean = reference_run(decoder, subject.encode(instances, images=images), grid, None)
    corrupt = reference_run(decoder, subject.encode(instances, images=images[1:] + images[:1]), grid, None)
    return decoder, clean, corrupt


def _logodds(outcomes):
    return np.array([lo for _, lo in outcomes])


def test_bottleneck_map_matches_its_wiring(subjects, held_out):
    """One layer, answer blind to the image: restoring the image tokens' embeddings or every fed-back latent
    restores the clean answer exactly; the image tokens' final-norm states and the question are never read; and
    the final-norm state at latent step k is exactly z_{k+1}, so cell (1, k) equals cell (0, k + 1)."""
    subject = _subject(subjects, "bottleneck")
    result = patch_map(subject, held_out[:12], None, attribution=False, n_boot=50)
    rows = result.rows.set_index(["direction", "site", "instance_id"])
    for direction in ("denoise", "noise"):
        part = rows.loc[direction]
        for site in ("image.layer[0]", "latent.layer[0]", "answer.layer[1]"):
            values = part.loc[site].value.dropna()
            assert len(values) >= 6
            np.testing.assert_allclose(values, 1.0, atol=1e-4)
        for site in ("image.layer[1]", "question.layer[0]", "question.layer[1]", "latent[3].layer[1]"):
            np.testing.assert_allclose(part.loc[site].value.dropna(), 0.0, atol=1e-4)
        for k in range(3):
            np.testing.assert_allclose(part.loc[f"latent[{k}].layer[1]"].p_patched,
                                       part.loc[f"latent[{k + 1}].layer[0]"].p_patched, atol=1e-6)
    assert set(result.table.metric) >= {"recovery", "damage", "flip_rate", "recovery_logodds"}


def test_grid_from_one_prefill_equals_the_decoders_own_latent_patch(subjects, held_out):
    """Denoising latent step k at layer L with prefill reuse and side-by-side rows gives what an independent run
    gives: the corrupted input decoded alone with the decoder's own LatentPatch edit (donor = the clean run's
    states at that layer; layer 0 through the fed-back vector, layer 1 through LayerEditHooks), both for
    recomputed and pinned later steps."""
    subject = _subject(subjects, "shortcut")  # two blocks: layer 1 is a block output, not the final norm
    instances = held_out[:4]
    grid = PatchGrid(layers=(0, 1), steps=(1, 2), groups=())
    decoder, clean, corrupt = _runs(subject, instances, grid)
    for semantics in ("recompute", "pin"):
        patched = run_cells(decoder, subject, instances, grid, corrupt, clean, None, semantics, max_rows=512)
        for site in grid.step_sites():
            edits = []
            for b, inst in enumerate(instances):
                pos = clean.layer_pos(site.layer)
                donor = clean.latent[b, : int(clean.latent_count[b]), pos].cpu()
                own = corrupt.latent[b, : int(corrupt.latent_count[b]), pos].cpu()
                iv = LatentPatch(steps=[site.step], layer=site.layer, semantics=semantics)
                edits.append(iv.bind(RowBinding(inst.id, clean=own, donor=donor)))
            if semantics == "pin" and site.layer:
                continue  # LatentPatch pins at the edited layer; patching pins the fed-back vectors (layer 0)
            with LayerEditHooks(decoder, edits):
                alone = decoder.run(corrupt.batch, edits)
            for b, inst in enumerate(instances):
                expected = subject.answer_probabilities(inst, alone.rows[b].answer_logits)
                np.testing.assert_allclose(patched[site][b][0], expected, atol=1e-5)


def test_patching_nothing_different_changes_nothing(subjects, held_out):
    """Restoring a state from a run of the same input is the run itself: recovery cannot come from the hooks."""
    subject = _subject(subjects, "bottleneck")
    instances = held_out[:4]
    grid = resolve_grid(subject)
    decoder, clean, _ = _runs(subject, instances, grid)
    patched = run_cells(decoder, subject, instances, grid, clean, clean, None, "recompute", max_rows=512)
    from latentprobe.where.patching import _outcomes

    expected = _logodds(_outcomes(subject, instances, clean.result))
    for site, outcomes in patched.items():
        np.testing.assert_allclose(_logodds(outcomes), expected, atol=1e-4, err_msg=str(site))


def test_shortcut_latent_step_map_is_flat(subjects, held_out):
    """The shortcut's answer cannot attend its latents: every latent cell recovers exactly nothing."""
    subject = _subject(subjects, "shortcut")
    result = patch_map(subject, held_out[:10], None, groups=("latent", "image"), attribution=False, n_boot=50)
    table = result.table
    latent = table[(table.group == "latent") & table.metric.isin(["recovery", "damage"])]
    assert len(latent) == 2 * 3 * 5  # directions x layers x (4 steps + all)
    np.testing.assert_allclose(latent.estimate, 0.0, atol=1e-4)
    image0 = table[(table.site == "image.layer[0]") & table.metric.isin(["recovery", "damage"])]
    np.testing.assert_allclose(image0.estimate, 1.0, atol=1e-4)


def test_image_noise_corruption_is_seeded_and_moves_the_answer(subjects, held_out):
    subject = _subject(subjects, "bottleneck")
    one = patch_map(subject, held_out[:6], None, groups=("image",), steps=[], corruption="image-noise",
                    directions=["denoise"], attribution=False, n_boot=20, seed=3)
    two = patch_map(subject, held_out[:6], None, groups=("image",), steps=[], corruption="image-noise",
                    directions=["denoise"], attribution=False, n_boot=20, seed=3)
    pd.testing.assert_frame_equal(one.rows, two.rows)
    assert one.rows.corruption.iloc[0] == "image-noise(scale=3,rel=std)"
    assert (one.rows.p_clean - one.rows.p_corrupt).abs().max() > 0.3  # 3x std noise does corrupt
    restored = one.rows[(one.rows.site == "image.layer[0]") & ~one.rows.excluded]
    np.testing.assert_allclose(restored.value, 1.0, atol=1e-4)


def test_normalised_metric_and_exclusion():
    assert normalized_effect("denoise", 0.8, 0.2, 0.5) == pytest.approx(0.5)
    assert normalized_effect("noise", 0.8, 0.2, 0.35) == pytest.approx(0.75)
    assert np.isnan(normalized_effect("denoise", 0.5, 0.5, 0.9))
    rows = pd.DataFrame({
        "subject": "s", "method": "exact", "direction": "denoise", "corruption": "c", "semantics": "recompute",
        "site": "latent[0].layer[0]", "layer": 0, "group": "latent", "step": 0, "seed": 0,
        "excluded": [False] * 8 + [True] * 2, "value": [0.5, 1.0, 0.0, 0.5, 1.0, 0.5, 0.5, 1.0, np.nan, np.nan],
        "value_logodds": np.linspace(0, 1, 10), "flipped": [True] * 3 + [False] * 5 + [None, None]})
    table = summarize_patching(rows, n_boot=500, seed=0).set_index("metric")
    assert table.loc["recovery", "estimate"] == pytest.approx(0.625)
    assert table.loc["recovery", "n"] == 8 and table.loc["recovery", "n_excluded"] == 2
    assert table.loc["recovery", "ci_low"] < 0.625 < table.loc["recovery", "ci_high"]
    # flips: 3 of 8, exact Clopper-Pearson 95% interval (hand-computed with the beta quantiles)
    from scipy.stats import beta

    assert table.loc["flip_rate", "estimate"] == pytest.approx(3 / 8)
    assert table.loc["flip_rate", "ci_low"] == pytest.approx(beta.ppf(0.025, 3, 6))
    assert table.loc["flip_rate", "ci_high"] == pytest.approx(beta.ppf(0.975, 4, 5))


def test_agreement_is_spearman_over_shared_sites():
    from scipy.stats import spearmanr

    exact = [0.9, 0.1, 0.5, 0.0, 0.3]
    attr = [0.2, 0.05, 0.1, 0.0, 0.12]
    base = dict(subject="s", direction="denoise", corruption="c", semantics="recompute", metric="recovery_logodds")
    table = pd.DataFrame([{**base, "method": m, "site": f"s{i}", "estimate": v}
                          for m, values in (("exact", exact), ("attribution", attr)) for i, v in enumerate(values)])
    agreement = attribution_agreement(table)
    assert agreement.spearman_rho.iloc[0] == pytest.approx(spearmanr(exact, attr)[0])
    assert agreement.n_sites.iloc[0] == 5


@pytest.mark.parametrize("argv, needle", [
    (["--layers", "0,5"], "layer 5 is out of range"),
    (["--steps", "4"], "latent step 4 is out of range"),
    (["--groups", "image,pixels"], "unknown position group 'pixels'"),
    (["--direction", "sideways"], "unknown patching direction"),
    (["--sites", "latent[9].layer[0]"], "latent step 9 is out of range"),
    (["--sites", "latent[0].layer[0],pixels.layer[0]"], "unknown position group 'pixels'"),
    (["--sites", "latent[0].layer[0],latent-2"], "cannot read 'latent-2' as a site"),
])
def test_bad_grid_is_one_line_before_any_model_runs(argv, needle, capsys, monkeypatch, tmp_path):
    import latentprobe.model.decoding as decoding

    def refuse(*args, **kwargs):
        raise AssertionError("a model ran")

    monkeypatch.setattr(decoding.LatentDecoder, "prefill", refuse)
    code = main(["patch", "--subject", "organism-bottleneck", "--out", str(tmp_path / "p"), "--limit", "4"] + argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err


def test_latent_groups_refused_for_a_subject_without_latent_phase(subjects):
    direct = _subject(subjects, "direct")
    with pytest.raises(LatentProbeError, match="no latent phase"):
        resolve_grid(direct, steps=[0])
    with pytest.raises(LatentProbeError, match="needs a latent phase"):
        resolve_grid(direct, steps=[], groups=["latent"])
    grid = resolve_grid(direct)
    assert grid.steps == () and set(grid.groups) == {"image", "question", "prompt_last"}


def test_cli_patch_runs_on_the_subjects_default_data(tmp_path, capsys):
    out = tmp_path / "patch"
    code = main(["patch", "--subject", "organism-bottleneck", "--out", str(out), "--limit", "6", "--bootstrap", "100",
                 "--quiet"])
    assert code == 0, capsys.readouterr().err
    summary = pd.read_parquet(out / "patching_summary.parquet")
    for column in ("subject", "direction", "corruption", "site", "layer", "group", "step", "metric", "estimate",
                   "ci_low", "ci_high", "n", "seed"):
        assert column in summary.columns
    assert set(summary.direction) == {"denoise", "noise"} and set(summary.method) == {"exact", "attribution"}
    assert (out / "figures" / "organism-bottleneck-patching-image-swap-recompute.png").exists()
    assert "split test" in capsys.readouterr().out  # the organism's own held-out split, with nothing else given
    from latentprobe.report.patch_figures import where_and_when_section

    section = where_and_when_section([out], tmp_path / "report")
    assert "### Where and when" in section.markdown and "latent.layer[0]" in section.markdown
    assert section.figures and section.figures[0].exists()


def test_exact_patching_of_the_sites_attribution_ranks_first(subjects, held_out):
    """The large-map workflow: attribution over the whole grid, then exact patching of its top sites only; the
    exact values equal the full exact map's at those sites."""
    from latentprobe.where.patching import top_attribution_sites

    subject = _subject(subjects, "bottleneck")
    full = patch_map(subject, held_out[:6], None, directions=["denoise"], n_boot=20)
    top = top_attribution_sites(full.table, k=3)
    assert len(top) == 3 and str(top[0]) == "answer.layer[1]"  # the slot's own final-norm state is linear in m
    only = patch_map(subject, held_out[:6], None, sites=top, directions=["denoise"], attribution=False, n_boot=20)
    assert set(only.rows.site) == {str(s) for s in top}
    merged = only.rows.merge(full.rows[full.rows.method == "exact"], on=["site", "instance_id"])
    np.testing.assert_allclose(merged.p_patched_x, merged.p_patched_y, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bottleneck", "shortcut", "lvr", "mirage"])
def test_organism_patching_numbers(subjects, held_out, name, capsys):
    """The numbers quoted in the README (64 held-out instances, image-swap)."""
    subject = _subject(subjects, name)
    result = patch_map(subject, held_out[:64], None, n_boot=1000)
    table = result.table.set_index(["method", "direction", "site", "metric"]).sort_index()
    fed_back = table.loc[("exact", "denoise", "latent.layer[0]", "recovery")]
    steps = table.loc["exact", "denoise"].reset_index()
    steps = steps[(steps.metric == "recovery") & (steps.step >= 0)]
    with capsys.disabled():
        print(f"\n{name}: denoise latent.layer[0] recovery {fed_back.estimate:.3f} "
              f"[{fed_back.ci_low:.3f}, {fed_back.ci_high:.3f}] n={fed_back.n}; max |latent step cell| "
              f"{steps.estimate.abs().max():.3f}; agreement\n{result.agreement.to_string()}")
    image = table.loc[("exact", "denoise", "image.layer[0]", "recovery")]
    assert image.estimate == pytest.approx(1.0, abs=1e-3)  # restoring every image token restores the clean run
    if name == "bottleneck":
        assert fed_back.ci_low > 0.95
    else:  # the others' answers read the image directly: nothing passes through a single latent state
        assert steps.estimate.abs().max() < 0.01


def test_non_finite_min_gap_is_refused_by_the_parser(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["patch", "--subject", "organism-bottleneck", "--out", str(tmp_path / "p"), "--min-gap", "nan"])
    assert exit_info.value.code == 2 and "--min-gap: 'nan' is not a finite number" in capsys.readouterr().err


@pytest.mark.parametrize("min_gap", [0.0, -0.1, 1.0, float("nan"), float("inf")])
def test_min_gap_outside_open_unit_interval_is_refused(min_gap):
    from latentprobe.where.patching import check_patch_request

    with pytest.raises(LatentProbeError, match="min_gap"):
        check_patch_request(None, None, 2, ("denoise",), "image-noise", 3.0, min_gap, "recompute")


@pytest.mark.parametrize("n_boot", [0, -1, float("nan"), float("inf"), 2.5])
def test_a_bad_bootstrap_count_is_refused_before_the_model_runs(subjects, held_out, monkeypatch, n_boot):
    from latentprobe import decoding

    monkeypatch.setattr(decoding.LatentDecoder, "prefill", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    with pytest.raises(LatentProbeError, match="n_boot must be an integer >= 1"):
        patch_map(_subject(subjects, "bottleneck"), held_out[:4], None, n_boot=n_boot)


def test_a_map_holds_only_its_chunks_images_never_the_datasets(subjects, held_out, monkeypatch):
    """Issue 22 (memory flat in the number of instances): patch_map read every instance's images up front and kept
    them to the end (1,024 instances: 1.15x the peak of 64); now it reads a chunk's own and its donors' images when
    the chunk runs, so at most two chunks' worth are alive at any prefill."""
    import latentprobe.where.patching as patching

    most = count_live_images(monkeypatch, [patching])
    subject = _subject(subjects, "bottleneck")
    patch_map(subject, held_out[:24], layers=[0], steps=[0], groups=[], batch_size=4, n_boot=20, attribution=False,
              directions=("denoise",))
    assert 0 < most[0] <= 2 * 4, most[0]  # one chunk's clean images and its donors' (24 instances in 6 chunks)
