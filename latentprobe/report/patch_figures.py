"""Figures and report blocks for "where and when": patching heatmaps and attention-knockout tables.

Pure presentation over tidy tables (`latentprobe.where.patching.summarize_patching`, the effects summary of
`latentprobe.runs.intervene`); nothing here runs a model.

Entry points for the report: `patching_blocks(run_dirs, out_dir)` returns the report blocks (and the figures it
drew) for any patching run folders (``patching_summary.parquet``) and intervention run folders with knockout
rows (``effects_summary.parquet``, target ``attention``) among ``run_dirs``; `where_and_when_section` is the same
as Markdown.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..fileio import safe_name
from ..stats.effects import interval_text
from ..where.patching import DECODE_GROUPS, LOGODDS_METRIC_OF, METRIC_OF, PROMPT_GROUPS
from .blocks import Figure, Heading, Paragraph, Table

GROUP_ORDER = PROMPT_GROUPS + DECODE_GROUPS
RECOVERY_LABEL = "share of the clean-corrupt gap in p(gold)\n(1 = fully restored / destroyed)"
LOGODDS_LABEL = "attribution estimate\n(gold log-odds, first-order)"


def _matrix(rows: pd.DataFrame, kind: str) -> pd.DataFrame:
    """Layers (rows, top = last layer) x steps or groups (columns) of estimates."""
    if kind == "steps":
        part = rows[(rows.group == "latent") & (rows.step >= 0)]
        wide = part.pivot_table(index="layer", columns="step", values="estimate")
        wide.columns = [f"latent[{c}]" for c in wide.columns]
    else:
        part = rows[rows.step < 0]
        wide = part.pivot_table(index="layer", columns="group", values="estimate")
        wide = wide[[g for g in GROUP_ORDER if g in wide.columns]]
    return wide.sort_index(ascending=False)


def _panel(ax, wide: pd.DataFrame, title: str, annotate: bool, limit: float):
    """One heatmap on a symmetric scale [-limit, limit]; returns its image (None when there is no site)."""
    if wide.empty:
        ax.set_axis_off()
        ax.set_title(f"{title}\n(no sites)", fontsize=9)
        return None
    values = wide.to_numpy(dtype=float)
    image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(wide.shape[1]), list(wide.columns), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(wide.shape[0]), [str(l) for l in wide.index], fontsize=8)
    ax.set_ylabel("layer (hidden_states index)", fontsize=8)
    ax.set_title(title, fontsize=9)
    if annotate and values.size <= 240:
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if abs(v) > 0.6 * limit else "black")
    for spine in ax.spines.values():
        spine.set_visible(False)
    return image


def _symmetric_limit(frames: Sequence[pd.DataFrame]) -> float:
    values = np.concatenate([f.estimate.to_numpy(dtype=float) for f in frames if len(f)] or [np.zeros(1)])
    finite = np.abs(values[np.isfinite(values)])
    return float(max(finite.max(), 1e-6)) if finite.size else 1.0


def patching_heatmaps(table: pd.DataFrame, out_dir: str | Path, annotate: bool = True) -> list[Path]:
    """One figure per subject (PNG + SVG): per direction, a (layer x latent step) and a (layer x position group)
    heatmap of exact patching (recovery / damage of the gold probability, on a fixed -1..1 scale), and below
    them attribution patching on the gold log-odds with its own colour bar (a different unit). Returns the PNGs."""
    from matplotlib.figure import Figure as MplFigure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    made = []
    for (subject, corruption, semantics), rows in table.groupby(["subject", "corruption", "semantics"], sort=True):
        directions = [d for d in ("denoise", "noise") if d in set(rows.direction)]
        exact = {d: rows[(rows.method == "exact") & (rows.direction == d) & (rows.metric == METRIC_OF[d])]
                 for d in directions}
        attribution = {d: rows[(rows.method == "attribution") & (rows.direction == d)
                               & (rows.metric == LOGODDS_METRIC_OF[d])] for d in directions}
        has_attr = any(len(f) for f in attribution.values())
        n_rows = 2 if has_attr else 1
        fig = MplFigure(figsize=(4.2 * len(directions) * 2 + 1.2, 3.9 * n_rows + 0.6), layout="constrained")
        axes = fig.subplots(n_rows, 2 * len(directions), squeeze=False,
                            gridspec_kw={"width_ratios": [1.3, 1] * len(directions)})
        limits = [1.0, _symmetric_limit(list(attribution.values()))]
        for row_index, (frames, what) in enumerate([(exact, "exact, p_gold"), (attribution, "attribution, log-odds")]
                                                   [:n_rows]):
            image = None
            for k, direction in enumerate(directions):
                title = f"{direction}: {METRIC_OF[direction]} ({what})" if row_index == 0 else \
                    f"{direction}: attribution (gold log-odds)"
                for j, kind in enumerate(("steps", "groups")):
                    label = "layer x latent step" if kind == "steps" else "layer x position group"
                    image = _panel(axes[row_index, 2 * k + j], _matrix(frames[direction], kind), f"{title}\n{label}",
                                   annotate, limits[row_index]) or image
            if image is not None:  # one colour bar per row: the rows have different units
                fig.colorbar(image, ax=axes[row_index, :].tolist(), shrink=0.85,
                             label=RECOVERY_LABEL if row_index == 0 else LOGODDS_LABEL)
        fig.suptitle(f"{subject}: activation patching under {corruption} ({semantics} later latent steps)",
                     fontsize=10)
        stem = out_dir / safe_name(f"{subject}-patching-{_slug(corruption)}-{semantics}")
        fig.savefig(f"{stem}.png", dpi=130, facecolor="white")
        fig.savefig(f"{stem}.svg")
        made.append(Path(f"{stem}.png"))
    return made


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")


def patching_caption(subject: str, corruption: str, semantics: str, has_attribution: bool) -> str:
    text = (f"{subject}, {corruption}: each cell restores one clean state in the corrupted run (denoise: share of "
            "the clean-corrupt gap in the gold probability recovered) or inserts one corrupted state in the clean "
            f"run (noise: share destroyed); later latent steps {semantics}d. Left of each pair: latent steps by "
            "layer; right: position groups by layer.")
    if has_attribution:
        text += (" Bottom row: attribution patching (a first-order estimate on the gold log-odds, in its own "
                 "units and colour bar).")
    return text


# ----------------------------------------------------------------------------------------------- report
@dataclass
class ReportSection:
    """A block of Markdown for the report and the figures it links (paths relative to the report folder)."""

    markdown: str
    figures: list[Path] = field(default_factory=list)
    blocks: list = field(default_factory=list)


def _top_sites_table(exact: pd.DataFrame, top: int) -> pd.DataFrame:
    records = []
    for direction in ("denoise", "noise"):
        metric = METRIC_OF[direction]
        part = exact[(exact.direction == direction) & (exact.metric == metric)]
        flips = exact[(exact.direction == direction) & (exact.metric == "flip_rate")].set_index("site")
        for row in part.dropna(subset=["estimate"]).sort_values("estimate", ascending=False).head(top).itertuples():
            flip = flips.loc[row.site] if row.site in flips.index else None
            records.append({
                "direction": direction, "site": row.site, "metric": metric,
                "estimate [95% CI]": interval_text(row.estimate, row.ci_low, row.ci_high, row.n),
                "n": int(row.n), "excluded (gap < min_gap)": int(row.n_excluded),
                "answer flips [95% CI]": "-" if flip is None else
                f"{interval_text(flip.estimate, flip.ci_low, flip.ci_high, flip.n, 2, False)} (n={int(flip.n)})"})
    return pd.DataFrame(records)


def patching_section_blocks(table: pd.DataFrame, agreement: pd.DataFrame | None, figures: Sequence[Path],
                            top: int = 5) -> list:
    """Blocks for patching runs: per subject its heatmaps, the sites that matter most, attribution agreement."""
    blocks = []
    for subject, rows in table.groupby("subject", sort=True):
        exact = rows[rows.method == "exact"]
        corruption = ", ".join(sorted(set(rows.corruption)))
        semantics = ", ".join(sorted(set(rows.semantics)))
        blocks.append(Heading(3, f"Activation patching: {subject} ({corruption}; later latent steps {semantics})"))
        has_attr = "attribution" in set(rows.method)
        for fig in figures:
            if Path(fig).name.startswith(f"{subject}-patching"):
                blocks.append(Figure(Path(fig), patching_caption(subject, corruption, semantics, has_attr)))
        sites = _top_sites_table(exact, top)
        if len(sites):
            blocks.append(Table(sites, f"the {top} sites with the largest effect per direction"))
        if agreement is not None and len(agreement):
            for row in agreement[agreement.subject == subject].dropna(subset=["spearman_rho"]).itertuples():
                blocks.append(Paragraph(f"attribution patching vs exact patching ({row.direction}, gold log-odds): "
                                        f"Spearman rho = {row.spearman_rho:+.2f} over {row.n_sites} sites "
                                        f"(p = {row.p_value:.3g}).", "Agreement"))
    blocks.append(Paragraph(
        "Recovery = (p_patched - p_corrupt) / (p_clean - p_corrupt) when one clean state is restored in the "
        "corrupted run; damage = (p_clean - p_patched) / (p_clean - p_corrupt) when one corrupted state is "
        "inserted in the clean run. Patching latent step k recomputes the later latent steps from it (unless "
        "pinned). Instances whose corruption barely moved the gold probability are excluded and counted.",
        "How to read"))
    return blocks


def patching_markdown(table: pd.DataFrame, agreement: pd.DataFrame | None, figures: Sequence[Path],
                      relative_to: Path | None = None, top: int = 5) -> str:
    """Markdown for patching runs (the blocks of `patching_section_blocks`, links relative to ``relative_to``)."""
    from .html import render_markdown

    return render_markdown(patching_section_blocks(table, agreement, figures, top), Path(relative_to or "."))


def knockout_table(effects: pd.DataFrame) -> pd.DataFrame:
    """Attention-knockout effects (rows with target ``attention`` of an effects summary), one row per knockout."""
    rows = effects[(effects.target == "attention")
                   & effects.metric.isin(["accuracy_clean", "accuracy_intervened", "accuracy_change", "flip_rate",
                                          "gold_prob_change"])]
    records = []
    for (subject, name), part in rows.groupby(["subject", "intervention"], sort=True):
        get = part.drop_duplicates("metric").set_index("metric")

        def fmt(metric, digits=3):
            if metric not in get.index:
                return "-"
            r = get.loc[metric]
            return interval_text(r.estimate, r.ci_low, r.ci_high, r.get("n"), digits)

        clean = get.estimate.get("accuracy_clean", np.nan)
        after = get.estimate.get("accuracy_intervened", np.nan)
        records.append({"subject": subject, "knockout": name, "accuracy (clean -> knocked out)":
                        f"{clean:.3f} -> {after:.3f}", "accuracy change [95% CI]": fmt("accuracy_change"),
                        "answer flips [95% CI]": fmt("flip_rate")})
    return pd.DataFrame(records)


KNOCKOUT_NOTE = ("A knockout blocks attention edges (no vector is replaced), so a drop means the blocked positions "
                 "are read, not that an off-distribution input disrupted the model.")


def knockout_blocks(effects: pd.DataFrame) -> list:
    table = knockout_table(effects)
    if table.empty:
        return []
    return [Heading(3, "Attention knockout"), Table(table, "accuracy and answer changes when attention edges are "
                                                           "blocked"), Paragraph(KNOCKOUT_NOTE, "How to read")]


def knockout_markdown(effects: pd.DataFrame) -> str:
    """Markdown table of attention-knockout effects (rows with target ``attention`` of an effects summary)."""
    from .html import render_markdown

    blocks = knockout_blocks(effects)
    return render_markdown(blocks[1:], Path(".")) if blocks else ""


def patching_blocks(run_dirs: Sequence[str | Path], out_dir: str | Path) -> tuple[list, list[Path]]:
    """Report blocks for the patching runs and knockout runs among ``run_dirs`` (heatmaps redrawn into
    ``out_dir/figures`` from the runs' tidy tables), and the figures drawn. Other folders are ignored."""
    out_dir = Path(out_dir)
    patch_tables, agreements, knockouts = [], [], []
    for run in map(Path, run_dirs):
        if (run / "patching_summary.parquet").exists():
            patch_tables.append(pd.read_parquet(run / "patching_summary.parquet"))
            if (run / "patching_agreement.csv").exists():
                agreements.append(pd.read_csv(run / "patching_agreement.csv"))
        summary = run / "effects_summary.parquet"
        if summary.exists():
            effects = pd.read_parquet(summary)
            if "target" in effects.columns and (effects.target == "attention").any():
                knockouts.append(effects)
    blocks, figures = [], []
    if patch_tables:
        table = pd.concat(patch_tables, ignore_index=True)
        agreement = pd.concat(agreements, ignore_index=True) if agreements else None
        figures = patching_heatmaps(table, out_dir / "figures")
        blocks += patching_section_blocks(table, agreement, figures)
    if knockouts:
        blocks += knockout_blocks(pd.concat(knockouts, ignore_index=True))
    return blocks, figures


def where_and_when_section(run_dirs: Sequence[str | Path], out_dir: str | Path) -> ReportSection:
    """The "where and when" section from patching runs and knockout runs among ``run_dirs`` as Markdown (image
    links relative to ``out_dir``); empty when there is nothing to show."""
    from .html import render_markdown

    blocks, figures = patching_blocks(run_dirs, out_dir)
    if not blocks:
        return ReportSection("", [], [])
    return ReportSection("### Where and when\n\n" + render_markdown(blocks, Path(out_dir)), figures, blocks)



def draw_patching_run(run_dir: str | Path) -> list[Path]:
    """Draw a patching run folder's heatmaps from its summary table (``figures/``) and list them in its manifest.

    The patching computation only writes tables; whoever runs it (the CLI, a study) draws them here."""
    import json

    from ..fileio import atomic_write_json

    run_dir = Path(run_dir)
    table = pd.read_parquet(run_dir / "patching_summary.parquet")
    paths = patching_heatmaps(table, run_dir / "figures") if not table.empty else []
    manifest_path = run_dir / "patching_manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        manifest["figures"] = [str(path) for path in paths]
        atomic_write_json(manifest_path, manifest)
    return paths


__all__ = ["patching_heatmaps", "patching_markdown", "patching_blocks", "knockout_markdown", "knockout_blocks",
           "where_and_when_section", "ReportSection", "draw_patching_run"]
