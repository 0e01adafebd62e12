"""The report: verdict rules, Markdown sections, and an HTML page that renders on its own in Chromium."""

import json
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from latentprobe import figures
from latentprobe.errors import LatentProbeError
from latentprobe.stats.probes import probe_table
from latentprobe.report.render import FINDING_TITLES, FINDINGS, Margins, reading_guide, tidy_effects, write_report
from latentprobe.stats.similarity import inter_instance_similarity, intra_instance_similarity, similarity_table
from latentprobe.verdicts import NOT_MEASURED, all_verdicts, verdict_latent_answer


def effect(subject, target, intervention, metric, estimate, low, high, n=40, **extra):
    return dict(subject=subject, target=target, intervention=intervention, metric=metric, estimate=estimate,
                ci_low=low, ci_high=high, n=n, **extra)


@pytest.fixture(scope="module")
def effects():
    return pd.DataFrame([
        effect("monet", "input", "blank_image", "change_ratio@step0", 0.05, 0.03, 0.08),
        effect("monet", "input", "blank_image", "change_ratio@step1", 0.04, 0.02, 0.06),
        # issue 18: input_latent decides on the pooled placebo-corrected R2 of information edits
        effect("monet", "input", "image-swap", "latent_r2", 0.05, -0.02, 0.12, step=float("nan")),
        effect("monet", "input", "image-swap", "NIE_correct", 0.0, -0.03, 0.03, mediator="all_layers"),
        effect("monet", "latent", "noise(scale=3)", "flip_rate", 0.03, 0.01, 0.06),
        effect("monet", "latent", "noise(scale=3)", "accuracy_change", -0.01, -0.03, 0.01),
        effect("monet", "latent", "patch(steps=all)", "flip_rate", 0.0, 0.0, 0.045, n=80, k=0),
        effect("monet", "input", "image-swap", "NIE_correct", 0.01, -0.02, 0.04, mediator="fed_back"),
        effect("capimagine", "input", "blank_image", "change_ratio", 0.6, 0.5, 0.7),
        effect("capimagine", "input", "image-swap", "latent_r2", 0.6, 0.5, 0.7, step=float("nan")),
        effect("capimagine", "text", "text-swap", "flip_rate", 0.35, 0.25, 0.46, n=80, k=28),
        effect("capimagine", "text", "text-shuffle", "flip_rate", 0.2, 0.12, 0.3, n=80, k=16),
    ])


@pytest.fixture(scope="module")
def similarity():
    rng = np.random.default_rng(0)
    collapse_point = rng.normal(size=16) * 4
    monet = np.stack([rng.normal(size=(20, 16)) * (1 - s / 3) + collapse_point * s / 3 for s in range(4)], axis=1)
    capimagine = rng.normal(size=(20, 4, 16))
    prompt = rng.normal(size=(20, 16))
    return pd.concat([
        similarity_table(monet, {"image_mean": rng.normal(size=(20, 16)), "prompt_last": prompt}, "monet", n_boot=200),
        similarity_table(capimagine, {"prompt_last": prompt}, "capimagine", n_boot=200),
    ], ignore_index=True), monet


@pytest.fixture(scope="module")
def probes():
    rng = np.random.default_rng(1)
    labels = np.arange(40) % 2
    groups = np.arange(40)
    noise = {(layer, step): rng.normal(size=(40, 6)) for layer in (0, 1) for step in (0, 1)}
    image = rng.normal(size=(40, 6))
    image[:, 0] += 3 * (2 * labels - 1)
    settings = dict(subject="monet", attribute="colour", n_splits=4, Cs=(1.0,))
    return pd.concat([
        probe_table(noise, labels, groups, representation="latent", **settings),
        probe_table({(1, -1): image}, labels, groups, representation="image_mean", **settings),
        probe_table({(1, 0): np.full((40, 6), np.nan)}, labels, groups, representation="random_init", **settings),
    ])


@pytest.fixture(scope="module")
def report(tmp_path_factory, effects, similarity, probes):
    table, monet_latents = similarity
    out = tmp_path_factory.mktemp("report")
    made = {
        "input_latent": figures.plot_effects_forest(effects, out / "figures" / "effects_forest",
                                                    reference_lines={"change_ratio": 0.2, "flip_rate": 0.1}),
        "collapse": figures.plot_similarity_by_step(table, out / "figures" / "monet_similarity", subject="monet")
        + figures.plot_similarity_heatmaps(inter_instance_similarity(monet_latents), out / "figures" / "monet_heatmaps")
        + figures.plot_intra_instance_heatmap(intra_instance_similarity(monet_latents), out / "figures" / "monet_intra")
        + figures.plot_subject_comparison(table, out / "figures" / "subjects"),
        "visual_info": figures.plot_probe_heatmap(probes, out / "figures" / "probe_heatmap")
        + figures.plot_probe_bars(probes, out / "figures" / "probe_bars"),
    }
    subjects = [
        {"name": "monet", "checkpoint": "NOVAglow646/Monet-7B", "protocol": "end token or 10 latent steps"},
        {"name": "capimagine", "checkpoint": "Michael4933/CapImagine-7B", "protocol": "text imagination"},
    ]
    data = {"benchmark": "synthetic shapes", "instances": 40, "seed": 0}
    md_path, html_path = write_report(out, subjects=subjects, data=data, effects=effects, similarity=table,
                                      probes=probes, figures=made)
    return md_path, html_path, made


# ------------------------------------------------------------------------------------------- verdicts


def test_effect_steps_come_from_a_suffix_or_a_column():
    table = pd.DataFrame([effect("s", "input", "swap", "change_ratio@step2", 0.1, 0.0, 0.2),
                          effect("s", "input", "swap", "change_ratio", 0.1, 0.0, 0.2, step=4)])
    tidy = tidy_effects(table)
    assert tidy.metric_base.tolist() == ["change_ratio", "change_ratio"]
    assert tidy.step.tolist() == [2.0, 4.0]
    mediation = tidy_effects(pd.DataFrame([effect("s", "latent", "patch", m, 0.0, -0.1, 0.1)
                                           for m in ("NIE", "NIE_correct", "TE_gold_prob", "NIEX", "flip_rate")]))
    assert mediation.mediation_effect.tolist() == ["NIE", "NIE", "TE", "", ""]
    with pytest.raises(LatentProbeError, match="lacks columns"):
        tidy_effects(table.drop(columns=["ci_high"]))


def test_report_verdicts_come_from_the_verdicts_package(effects):
    verdicts = all_verdicts(["monet", "capimagine"], effects=effects).set_index(["subject", "finding"])
    assert verdicts.loc[("monet", "input_latent"), "verdict"] == "disconnect"
    assert verdicts.loc[("monet", "latent_answer"), "verdict"] == "disconnect"
    assert verdicts.loc[("capimagine", "input_latent"), "verdict"] == "connected"
    assert verdicts.loc[("capimagine", "latent_answer"), "verdict"] == "connected"
    assert verdicts.loc[("capimagine", "latent_answer"), "disruption"] == "connected"


def test_missing_inputs_are_not_measured(tmp_path):
    verdicts = all_verdicts(["monet"])
    assert set(verdicts.verdict) == {NOT_MEASURED}
    md_path, html_path = write_report(tmp_path)
    text = md_path.read_text()
    assert text.count("**Not measured:**") >= 6
    assert html_path.exists()


# ------------------------------------------------------------------------------------------- markdown


def test_markdown_has_every_finding_its_verdicts_rules_and_explanations(report):
    md_path, _, made = report
    text = md_path.read_text()
    for number, finding in enumerate(FINDINGS, start=1):
        assert f"## Finding {number}: {FINDING_TITLES[finding]}" in text
    assert "placebo-corrected R2" in text  # issue 18: the input_latent rule
    assert "answer-change rate minus its placebo" in text
    assert "- **monet: disconnect.**" in text and "- **capimagine: connected.**" in text
    assert "0.050 [0.030, 0.080]" in text  # a measured number with its interval
    # the verdict table carries the evidence columns
    for column in ("| margin |", "| estimate [CI] |", "| n |", "| detectable effect |", "| needed n |"):
        assert column in text
    # plain words: the paper, why a null needs an equivalence test, the multiplicity method, every metric
    assert "CapImagine (arXiv 2602.22766)" in text
    assert "equivalence test" in text and "TOST" in text
    assert "Holm" in text and "intersection-union" in text
    for metric in ("change_ratio:", "flip_rate:", "answer_changed:", "NIE = ", "fed_back", "all_layers",
                   "kl_clean_to_intervened:", "selectivity"):
        assert metric in text, metric
    assert f"Margins in force: {Margins().describe()}" in text
    for path in made["collapse"]:
        if path.suffix == ".png":
            assert f"(figures/{path.name})" in text


# ----------------------------------------------------------------------------------------------- html


def test_html_is_self_contained(report):
    _, html_path, _ = report
    page = html_path.read_text()
    sources = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    assert sources and all(source.startswith("data:image/") for source in sources)
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert "<link" not in page and "@import" not in page


RENDER_CHECK = """<script>
window.addEventListener("load", function () {
  var images = Array.from(document.images);
  var tables = Array.from(document.querySelectorAll("table"));
  var result = {
    images: images.length,
    images_loaded: images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length,
    tables: tables.length,
    tables_with_rows: tables.filter(function (t) { return t.querySelectorAll("tbody tr").length > 0; }).length
  };
  var out = document.createElement("pre");
  out.id = "render-check";
  out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
});
</script>"""


def test_html_renders_in_headless_chromium(report, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("headless Chromium not found: apt-get install chromium")
    _, html_path, _ = report
    checked = tmp_path / "checked.html"
    checked.write_text(html_path.read_text().replace("</body>", RENDER_CHECK + "</body>"))
    command = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
        "--host-resolver-rules=MAP * ~NOTFOUND",  # any network request the page made would fail
        "--virtual-time-budget=10000", "--dump-dom", checked.as_uri(),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    match = re.search(r'<pre id="render-check">(.*?)</pre>', result.stdout)
    assert match, f"no render check in the DOM; chromium said: {result.stderr[-2000:]}"
    check = json.loads(match.group(1))
    assert check["images"] >= 5 and check["images_loaded"] == check["images"], check
    assert check["tables"] >= 5 and check["tables_with_rows"] == check["tables"], check


def test_unmeasured_effect_rows_are_no_evidence():
    effects = pd.DataFrame({
        "subject": "s", "target": ["latent", "latent", "input"], "intervention": ["patch", "patch", "image-swap"],
        "metric": ["flip_rate", "NIE_correct", "NIE_answer_changed"], "estimate": [0.0, np.nan, 0.0],
        "ci_low": [0.0, np.nan, 0.0], "ci_high": [0.045, np.nan, 0.045], "n": [80, 0, 80], "k": [0, np.nan, 0]})
    # issue 18: a disconnect needs the all_layers mediator too
    assert verdict_latent_answer(effects, "s").verdict == "inconclusive"
    both = pd.concat([effects, effects.iloc[[2]].assign(mediator="all_layers")], ignore_index=True)
    assert verdict_latent_answer(both, "s").verdict == "disconnect"


def test_reading_guide_states_the_margins_given():
    text = " ".join(item for _, items in reading_guide(Margins(answer_change=0.02)) for item in items)
    assert "answer_change=0.02" in text


def test_the_demos_subjects_have_different_colours():
    """Every figure colours a subject the same way; the demo's eight organisms must get eight different colours
    (organism-blind and organism-collapsed once hashed onto organism-capimagine's)."""
    from latentprobe.organisms.recipes import ORGANISMS
    from latentprobe.report.figures import subject_colour

    names = [f"organism-{name}" for name in ORGANISMS]
    assert len(names) >= 8
    assert len({subject_colour(name) for name in names}) == len(names)


def test_the_collapse_comparison_plots_the_ratio_the_verdict_reads():
    # It plotted the old spread ratio against the image-token mean, where the LVR organism (verdict: collapsed,
    # collapse ratio 0.04) sat at 0.2-0.5, above the margin drawn on the same panel.
    from latentprobe.report.figures import _collapse_panel
    from latentprobe.stats.similarity import similarity_table

    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(12, 4, 6))
    table = similarity_table(rng.normal(size=(12, 2, 6)), {"image_mean": tokens.mean(axis=1)}, "s", n_boot=20,
                             single_tokens={"image_token": tokens[:, 0]}, token_pool=tokens.reshape(-1, 6))
    title, rows, value, _ = _collapse_panel(table)
    assert "one image token" in title and value == "estimate"
    assert set(rows.statistic) == {"collapse_ratio"} and set(rows.reference) == {"image_token"}
    assert len(rows) == 2  # one per latent step
    pooled_only = table[~((table.statistic == "collapse_ratio") & (table.reference == "image_token"))]
    assert set(_collapse_panel(pooled_only)[1].reference) == {"image_mean"}
    old = table[table.statistic != "collapse_ratio"]  # a table from before issue 18
    assert set(_collapse_panel(old)[1].statistic) == {"spread_ratio"}
