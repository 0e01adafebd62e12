"""The report's grounding and lens parts of "where and when", from `ground` and `lens` run folders (no model runs).

`where_blocks(run_dirs)` returns report blocks (headings, tables, the runs' figures with captions) for every
ground / lens run among ``run_dirs`` ([] when there is none); `where_and_when_markdown` is the same as Markdown;
`where_run_kind` / `is_where_run` tell such folders apart from trace / intervention runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import pandas as pd

from .blocks import Figure, Heading, Paragraph, Table

WHERE_KINDS = ("ground", "lens")


def where_run_kind(run_dir: str | Path) -> str | None:
    """``"ground"`` or ``"lens"`` for a folder written by `latentprobe ground` / `lens`, else None."""
    manifest = Path(run_dir) / "manifest.json"
    if not manifest.exists():
        return None
    try:
        kind = json.loads(manifest.read_text()).get("kind")
    except (OSError, json.JSONDecodeError):
        return None
    return kind if kind in WHERE_KINDS else None


def is_where_run(run_dir: str | Path) -> bool:
    return where_run_kind(run_dir) is not None


def grounding_blocks(run_dir: str | Path) -> list:
    """One subject's grounding: pooled hit rate vs chance per layer and measure, the hit-rate map, an overlay."""
    run_dir = Path(run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    subject = manifest["subject"]["name"]
    summary = pd.read_csv(run_dir / "grounding-summary.csv", dtype={"latent_step": str})
    blocks = [Heading(3, f"Grounding: {subject}"), Paragraph(
        f"{manifest['data']['n_instances']} instances. For each latent step and layer, the cosine similarity "
        "between the latent state and every image token; hit = the most similar token lies in the answer region "
        "(pointing game), mass = share of the min-max normalised map inside it; chance = random regions of the "
        "same size. centred subtracts the mean image token first. The prompt's last token is the baseline a "
        "model without latents has.")]
    if summary.empty:
        blocks.append(Paragraph("no instance has a known answer region: maps only (grounding.parquet).", "Note"))
    else:
        pooled = summary[summary["latent_step"].isin(["all", "prompt_last"])].copy()
        pooled["query"] = pooled["latent_step"].map({"all": "latent steps", "prompt_last": "prompt end"})
        pooled["hit rate [95% CI]"] = [f"{h:.2f} [{lo:.2f}, {hi:.2f}]" for h, lo, hi in
                                       zip(pooled.hit_rate, pooled.hit_ci_low, pooled.hit_ci_high)]
        pooled["chance"] = pooled["chance_hit"].map("{:.2f}".format)
        pooled["p (> chance)"] = pooled["p_above_chance"].map("{:.2g}".format)
        pooled["mass vs chance"] = [f"{m:.2f} vs {c:.2f}" for m, c in zip(pooled.mass_inside, pooled.chance_mass)]
        pooled = pooled.sort_values(["measure", "layer", "query"])
        blocks.append(Table(pooled[["measure", "layer", "query", "n", "hit rate [95% CI]", "chance", "p (> chance)",
                                    "mass vs chance"]].reset_index(drop=True),
                            "pointing-game hit rate of the latent steps (pooled) and of the prompt's end, per layer"))
    for figure in sorted((run_dir / "figures").glob("grounding-hit-rate-*.png")):
        measure = figure.stem.removeprefix("grounding-hit-rate-")
        blocks.append(Figure(figure, f"{subject}: pointing-game hit rate per layer (rows) and latent step (columns), "
                                     f"{measure} maps; compare with the chance level in the table."))
    overlays = sorted((run_dir / "figures" / "overlays").glob("*.png"))
    if overlays:
        blocks.append(Figure(overlays[0], f"{subject}, instance {overlays[0].stem}: where each latent step (rows) "
                                          "looks at each layer (columns); white outline: the answer region, x: the "
                                          "map's peak."))
    return blocks


def lens_blocks(run_dir: str | Path) -> list:
    """One subject's lens: gold-rank summary per layer, the gold-rank map, and what the fed-back vectors are near."""
    run_dir = Path(run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    subject = manifest["subject"]["name"]
    summary = pd.read_csv(run_dir / "lens-summary.csv")
    blocks = [Heading(3, f"Lens: {subject}"), Paragraph(
        f"{manifest['data']['n_instances']} instances. Final norm and LM head applied to each layer's state at each "
        "latent step; rank 0 = the gold answer token is the lens's top token; gold beats options = the gold "
        "option's token outranks the other options' (chance = 1 / options).")]
    if summary.empty:
        blocks.append(Paragraph("no instance has a gold answer token the tokenizer tells apart from the other "
                                "options.", "Note"))
    else:
        per_layer = summary.groupby("layer").agg(steps=("latent_step", "nunique"),
                                                 median_gold_rank=("median_gold_rank", "median"),
                                                 mrr=("mrr", "mean"), gold_on_top=("gold_top1", "mean"),
                                                 candidate_rank=("mean_candidate_rank", "mean"),
                                                 gold_beats_options=("candidate_top1", "mean"),
                                                 chance=("candidate_chance", "mean")).reset_index()
        for column in ("mrr", "gold_on_top", "candidate_rank", "gold_beats_options", "chance"):
            per_layer[column] = per_layer[column].map("{:.3f}".format)
        blocks.append(Table(per_layer, "the lens per layer, averaged over latent steps"))
    nearest_path = run_dir / "nearest.parquet"
    if nearest_path.exists():
        nearest = pd.read_parquet(nearest_path)
        if len(nearest):
            top = nearest["nearest_tokens"].map(lambda tokens: tokens[0]).value_counts().head(3)
            listed = ", ".join(f"{token!r} ({count})" for token, count in top.items())
            blocks.append(Paragraph(f"most frequent top-1 tokens: {listed}; median cosine rank of the gold token: "
                                    f"{nearest['gold_cosine_rank'].median():.0f}.",
                                    "Nearest input embedding of the fed-back vectors"))
    figure = run_dir / "figures" / "lens-gold-rank.png"
    if figure.exists():
        blocks.append(Figure(figure, f"{subject}: median rank of the gold answer token under the logit lens, per "
                                     "layer and latent step (0 = the lens's top token)."))
    return blocks


def where_blocks(run_dirs: Sequence[str | Path]) -> list:
    """Grounding and lens blocks for every ground / lens run among ``run_dirs`` ([] when there is none)."""
    blocks = []
    for run_dir in run_dirs:
        kind = where_run_kind(run_dir)
        if kind == "ground":
            blocks += grounding_blocks(run_dir)
        elif kind == "lens":
            blocks += lens_blocks(run_dir)
    return blocks


def grounding_markdown(run_dir: str | Path, relative_to: str | Path | None = None) -> str:
    from .html import render_markdown

    return render_markdown(grounding_blocks(run_dir), Path(relative_to or "."))


def lens_markdown(run_dir: str | Path, relative_to: str | Path | None = None) -> str:
    from .html import render_markdown

    return render_markdown(lens_blocks(run_dir), Path(relative_to or "."))


def where_and_when_markdown(run_dirs: Sequence[str | Path], relative_to: str | Path | None = None) -> str:
    """The "Where and when" section for every ground / lens run among ``run_dirs`` as Markdown ("" when none)."""
    from .html import render_markdown

    blocks = where_blocks(run_dirs)
    if not blocks:
        return ""
    return render_markdown([Heading(2, "Where and when")] + blocks, Path(relative_to or "."))
