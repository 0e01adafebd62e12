"""Figures and report blocks for "where and when": patching heatmaps and attention-knockout tables.

Pure presentation over tidy tables (`latentprobe.where.patching.summarize_patching`, the effects summary of
`latentprobe.runs.intervene`); nothing here runs a model.

Entry point for the report: `where_and_when_section(run_dirs, out_dir)` returns the Markdown of the section and
the figures it made, from any patching run folders (``patching_summary.parquet``) and intervention run folders
with knockout rows (``effects_summary.parquet``, target ``attention``) among ``run_dirs``.
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

GROUP_ORDER = PROMPT_GROUPS + DECODE_GROUPS


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


def _panel(ax, wide: pd.DataFrame, title: str, annotate: bool):
    import matplotlib.pyplot as plt

    if wide.empty:
        ax.set_axis_off()
        ax.set_title(f"{title}\n(no sites)", fontsize=9)
        return None
    values = wide.to_numpy(dtype=float)
    image = ax.imshow(values, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(wide.shape[1]), list(wide.columns), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(wide.shape[0]), [str(l) for l in wide.index], fontsize=8)
    ax.set_ylabel("layer (hidden_states index)", fontsize=8)
    ax.set_title(title, fontsize=9)
    if annotate and values.size <= 240:
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if abs(v) > 0.6 else "black")
    plt.setp(ax.spines.values(), visible=False)
    return image


def patching_heatmaps(table: pd.DataFrame, out_dir: str | Path, annotate: bool = True) -> list[Path]:
    """One figure per subject (PNG + SVG): per direction, a (layer x latent step) and a (layer x position group)
    heatmap of exact patching (recovery / damage of the gold probability), and below them attribution patching
    beside exact patching on the gold log-odds when attribution ran. Returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    made = []
    for (subject, corruption, semantics), rows in table.groupby(["subject", "corruption", "semantics"], sort=True):
        directions = [d for d in ("denoise", "noise") if d in set(rows.direction)]
        panels = []  # (row index, title, frame)
        for direction in directions:
            exact = rows[(rows.method == "exact") & (rows.direction == direction) & (rows.metric == METRIC_OF[direction])]
            panels.append((0, f"{direction}: {METRIC_OF[direction]} (exact, p_gold)", exact))
        has_attr = "attribution" in set(rows.method)
        if has_attr:
            for direction in directions:
                attr = rows[(rows.method == "attribution") & (rows.direction == direction)
                            & (rows.metric == LOGODDS_METRIC_OF[direction])]
                panels.append((1, f"{direction}: attribution (log-odds)", attr))
        n_rows = 2 if has_attr else 1
        fig, axes = plt.subplots(n_rows, 2 * len(directions), figsize=(4.2 * len(directions) * 2, 3.8 * n_rows + 0.6),
                                 squeeze=False, gridspec_kw={"width_ratios": [1.3, 1] * len(directions),
                                                             "hspace": 0.75, "wspace": 0.35})
        image = None
        counters = {0: 0, 1: 0}
        for row_index, title, frame in panels:
            col = counters[row_index]
            image = _panel(axes[row_index, col], _matrix(frame, "steps"), f"{title}\nlayer x latent step",
                           annotate) or image
            image = _panel(axes[row_index, col + 1], _matrix(frame, "groups"), f"{title}\nlayer x position group",
                           annotate) or image
            counters[row_index] += 2
        if image is not None:
            fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="fraction of the clean-corrupt gap")
        fig.suptitle(f"{subject}: activation patching under {corruption} ({semantics} later latent steps)",
                     fontsize=10)
        stem = out_dir / safe_name(f"{subject}-patching-{_slug(corruption)}-{semantics}")
        fig.savefig(f"{stem}.png", dpi=130, bbox_inches="tight")
        fig.savefig(f"{stem}.svg", bbox_inches="tight")
        plt.close(fig)
        made.append(Path(f"{stem}.png"))
    return made


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")


# ----------------------------------------------------------------------------------------------- report
@dataclass
class ReportSection:
    """A block of Markdown for the report and the figures it links (paths relative to the report folder)."""

    markdown: str
    figures: list[Path] = field(default_factory=list)


def patching_markdown(table: pd.DataFrame, agreement: pd.DataFrame | None, figures: Sequence[Path],
                      relative_to: Path | None = None, top: int = 5) -> str:
    """Markdown for one patching run: heatmaps, the sites that matter most, and attribution agreement."""
    lines = []
    for subject, rows in table.groupby("subject", sort=True):
        exact = rows[rows.method == "exact"]
        corruption = ", ".join(sorted(set(rows.corruption)))
        semantics = ", ".join(sorted(set(rows.semantics)))
        lines += [f"#### {subject}: activation patching ({corruption}; later latent steps {semantics})", ""]
        for fig in figures:
            if Path(fig).name.startswith(f"{subject}-patching"):
                shown = Path(fig).relative_to(relative_to) if relative_to and Path(fig).is_relative_to(relative_to) \
                    else Path(fig)
                lines += [f"![{subject} patching maps]({shown.as_posix()})", ""]
        lines += ["| direction | site | metric | estimate [95% CI] | n | excluded (gap < min_gap) | flip rate [95% CI] |",
                  "|---|---|---|---|---|---|---|"]
        for direction in ("denoise", "noise"):
            metric = METRIC_OF[direction]
            part = exact[(exact.direction == direction) & (exact.metric == metric)]
            flips = exact[(exact.direction == direction) & (exact.metric == "flip_rate")].set_index("site")
            for row in part.sort_values("estimate", ascending=False).head(top).itertuples():
                flip = flips.loc[row.site] if row.site in flips.index else None
                flip_text = "-" if flip is None else \
                    f"{interval_text(flip.estimate, flip.ci_low, flip.ci_high, flip.n, 2, False)} (n={int(flip.n)})"
                lines.append(f"| {direction} | `{row.site}` | {metric} | "
                             f"{interval_text(row.estimate, row.ci_low, row.ci_high, row.n)} | {row.n} | "
                             f"{row.n_excluded} | {flip_text} |")
        lines.append("")
        if agreement is not None and len(agreement):
            part = agreement[agreement.subject == subject]
            for row in part.itertuples():
                lines.append(f"Attribution patching vs exact patching ({row.direction}, gold log-odds): Spearman "
                             f"rho = {row.spearman_rho:+.2f} over {row.n_sites} sites (p = {row.p_value:.3g}).")
            lines.append("")
    lines.append("Recovery = (p_patched - p_corrupt) / (p_clean - p_corrupt) when one clean state is restored in the "
                 "corrupted run; damage = (p_clean - p_patched) / (p_clean - p_corrupt) when one corrupted state is "
                 "inserted in the clean run. Patching latent step k recomputes the later latent steps from it "
                 "(unless pinned). Instances whose corruption barely moved the gold probability are excluded and "
                 "counted.")
    return "\n".join(lines) + "\n"


def knockout_markdown(effects: pd.DataFrame) -> str:
    """Markdown table of attention-knockout effects (rows with target ``attention`` of an effects summary)."""
    rows = effects[(effects.target == "attention")
                   & effects.metric.isin(["accuracy_clean", "accuracy_intervened", "accuracy_change", "flip_rate",
                                          "gold_prob_change"])]
    if rows.empty:
        return ""
    lines = ["| subject | knockout | accuracy (clean -> knocked out) | accuracy change [95% CI] | flip rate [95% CI] |",
             "|---|---|---|---|---|"]
    for (subject, name), part in rows.groupby(["subject", "intervention"], sort=True):
        get = part.set_index("metric")
        def fmt(metric, digits=3):
            if metric not in get.index:
                return "-"
            r = get.loc[metric]
            return interval_text(r.estimate, r.ci_low, r.ci_high, r.get("n"), digits)
        clean = get.estimate.get("accuracy_clean", np.nan)
        after = get.estimate.get("accuracy_intervened", np.nan)
        lines.append(f"| {subject} | `{name}` | {clean:.3f} -> {after:.3f} | {fmt('accuracy_change')} | "
                     f"{fmt('flip_rate')} |")
    lines += ["", "A knockout blocks attention edges (no vector is replaced), so a drop means the blocked positions "
                  "are read, not that an off-distribution input disrupted the model."]
    return "\n".join(lines) + "\n"


def where_and_when_section(run_dirs: Sequence[str | Path], out_dir: str | Path) -> ReportSection:
    """The report's "where and when" section from patching runs and knockout runs among ``run_dirs``.

    Heatmaps are redrawn into ``out_dir/figures`` from the runs' tidy tables; image links are relative to
    ``out_dir`` (the report folder). Folders holding neither kind of result are ignored. Returns an empty
    section when there is nothing to show.
    """
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
        blocks.append(patching_markdown(table, agreement, figures, relative_to=out_dir))
    if knockouts:
        blocks.append("#### Attention knockout\n\n" + knockout_markdown(pd.concat(knockouts, ignore_index=True)))
    if not blocks:
        return ReportSection("", [])
    return ReportSection("### Where and when\n\n" + "\n".join(blocks), figures)


__all__ = ["patching_heatmaps", "patching_markdown", "knockout_markdown", "where_and_when_section", "ReportSection"]


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
