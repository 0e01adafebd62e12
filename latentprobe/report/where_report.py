"""The report's "where and when" section, rendered from `ground` and `lens` run folders (no model runs).

Entry point: `where_and_when_markdown(run_dirs, relative_to=report_dir)` returns Markdown (headings, small
tables, image links to the runs' PNGs) or "" when none of ``run_dirs`` is a ground or lens run;
`is_where_run` tells such folders apart from trace / intervention runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import pandas as pd

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


def _link(path: Path, relative_to: Path | None) -> str:
    return os.path.relpath(path, relative_to) if relative_to is not None else str(path)


def _table(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    lines = [header, rule]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines)


def grounding_markdown(run_dir: str | Path, relative_to: str | Path | None = None) -> str:
    """One subject's grounding: pooled hit rate vs chance per layer and measure, the hit-rate map, an overlay."""
    run_dir = Path(run_dir)
    relative_to = Path(relative_to) if relative_to is not None else None
    manifest = json.loads((run_dir / "manifest.json").read_text())
    subject = manifest["subject"]["name"]
    summary = pd.read_csv(run_dir / "grounding-summary.csv", dtype={"latent_step": str})
    lines = [f"### Grounding: {subject}", "",
             f"{manifest['data']['n_instances']} instances ({manifest['data']['source']}). For each latent step "
             "and layer, the cosine similarity between the latent state and every image token; *hit* = the most "
             "similar token lies in the answer region (pointing game), *mass* = share of the min-max normalised "
             "map inside it; chance = random regions of the same size. *centred* subtracts the mean image token "
             "first. The prompt's last token is the baseline a model without latents has.", ""]
    if summary.empty:
        lines += ["No instance has a known answer region: maps only (`grounding.parquet`).", ""]
    else:
        pooled = summary[summary["latent_step"].isin(["all", "prompt_last"])].copy()
        pooled["query"] = pooled["latent_step"].map({"all": "latent steps", "prompt_last": "prompt end"})
        pooled["hit rate [95% CI]"] = [f"{h:.2f} [{lo:.2f}, {hi:.2f}]" for h, lo, hi in
                                       zip(pooled.hit_rate, pooled.hit_ci_low, pooled.hit_ci_high)]
        pooled["chance"] = pooled["chance_hit"].map("{:.2f}".format)
        pooled["p (> chance)"] = pooled["p_above_chance"].map("{:.2g}".format)
        pooled["mass vs chance"] = [f"{m:.2f} vs {c:.2f}" for m, c in zip(pooled.mass_inside, pooled.chance_mass)]
        pooled = pooled.sort_values(["measure", "layer", "query"])
        lines += [_table(pooled[["measure", "layer", "query", "n", "hit rate [95% CI]", "chance", "p (> chance)",
                                 "mass vs chance"]]), ""]
    for figure in sorted((run_dir / "figures").glob("grounding-hit-rate-*.png")):
        lines += [f"![grounding hit rate, {subject}]({_link(figure, relative_to)})", ""]
    overlays = sorted((run_dir / "figures" / "overlays").glob("*.png"))
    if overlays:
        lines += [f"![grounding maps of one instance, {subject}]({_link(overlays[0], relative_to)})", ""]
    return "\n".join(lines)


def lens_markdown(run_dir: str | Path, relative_to: str | Path | None = None) -> str:
    """One subject's lens: gold-rank summary per layer, the gold-rank map, and what the fed-back vectors are near."""
    run_dir = Path(run_dir)
    relative_to = Path(relative_to) if relative_to is not None else None
    manifest = json.loads((run_dir / "manifest.json").read_text())
    subject = manifest["subject"]["name"]
    summary = pd.read_csv(run_dir / "lens-summary.csv")
    lines = [f"### Lens: {subject}", "",
             f"{manifest['data']['n_instances']} instances. Final norm and LM head applied to each layer's state at "
             "each latent step; rank 0 = the gold answer token is the lens's top token; *gold beats options* = the "
             "gold option's token outranks the other options' (chance = 1 / options).", ""]
    if summary.empty:
        lines += ["No instance has a gold answer token the tokenizer tells apart from the other options.", ""]
    else:
        per_layer = summary.groupby("layer").agg(steps=("latent_step", "nunique"),
                                                 median_gold_rank=("median_gold_rank", "median"),
                                                 mrr=("mrr", "mean"), gold_on_top=("gold_top1", "mean"),
                                                 candidate_rank=("mean_candidate_rank", "mean"),
                                                 gold_beats_options=("candidate_top1", "mean"),
                                                 chance=("candidate_chance", "mean")).reset_index()
        for column in ("mrr", "gold_on_top", "candidate_rank", "gold_beats_options", "chance"):
            per_layer[column] = per_layer[column].map("{:.3f}".format)
        lines += [_table(per_layer), ""]
    nearest_path = run_dir / "nearest.parquet"
    if nearest_path.exists():
        nearest = pd.read_parquet(nearest_path)
        if len(nearest):
            top = nearest["nearest_tokens"].map(lambda tokens: tokens[0]).value_counts().head(3)
            listed = ", ".join(f"`{token!r}` ({count})" for token, count in top.items())
            lines += [f"Nearest input embedding of the fed-back vectors (most frequent top-1 tokens): {listed}; "
                      f"median cosine rank of the gold token: {nearest['gold_cosine_rank'].median():.0f}.", ""]
    figure = run_dir / "figures" / "lens-gold-rank.png"
    if figure.exists():
        lines += [f"![lens gold rank, {subject}]({_link(figure, relative_to)})", ""]
    return "\n".join(lines)


def where_and_when_markdown(run_dirs: Sequence[str | Path], relative_to: str | Path | None = None) -> str:
    """The "Where and when" section for every ground / lens run among ``run_dirs`` ("" when there is none)."""
    blocks = []
    for run_dir in run_dirs:
        kind = where_run_kind(run_dir)
        if kind == "ground":
            blocks.append(grounding_markdown(run_dir, relative_to))
        elif kind == "lens":
            blocks.append(lens_markdown(run_dir, relative_to))
    if not blocks:
        return ""
    return "\n".join(["## Where and when", ""] + blocks)
