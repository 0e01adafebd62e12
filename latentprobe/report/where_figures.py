"""Figures for "where and when": grounding overlays, grounding hit-rate maps and the lens's gold-rank map.

Built on :class:`matplotlib.figure.Figure` without pyplot (importing this module does not switch the caller's
backend); each function takes the tidy tables of `latentprobe.where.grounding` / `latentprobe.where.lens` and returns a
Figure; `save_png` writes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ..errors import LatentProbeError
from ..fileio import NameBook, path_inside

DPI = 130


def save_png(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG (parents created) and return the path."""
    path = Path(path)
    if path.suffix != ".png":  # append, never replace: an instance id "a.b" must not become "a.png"
        path = path.with_name(path.name + ".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", facecolor="white")
    return path


def grounding_overlay(image: np.ndarray, table: pd.DataFrame, *, title: str = "",
                      layers: Sequence[int] | None = None, alpha: float = 0.8) -> Figure:
    """One instance's grounding maps over its image: one row per latent step, one column per layer (the first
    column shows the image itself).

    ``table`` holds that instance's rows of the grounding table for one measure. The map of each cell is
    stretched over the whole image (each token covers its patch of the resized image); the ground-truth
    region, when known, is outlined in white and the map's peak token marked with a cross.
    """
    if table.empty:
        raise LatentProbeError("no grounding rows to draw", "pass one instance's rows of the grounding table")
    layers = sorted(table["layer"].unique()) if layers is None else list(layers)
    steps = sorted(table["latent_step"].unique())
    fig = Figure(figsize=(1.9 * (len(layers) + 1) + 0.6, 1.9 * len(steps) + 0.5))
    axes = np.atleast_2d(fig.subplots(len(steps), len(layers) + 1, squeeze=False))
    height, width = image.shape[:2]
    # the maps are drawn over a grey copy: a colourful image would fight with the colour map
    grey = image[..., :3].astype(float).mean(-1) if image.ndim == 3 else image.astype(float)
    for i, step in enumerate(steps):
        axes[i, 0].imshow(image)
        axes[i, 0].set_xticks([])
        axes[i, 0].set_yticks([])
        axes[i, 0].set_ylabel("prompt end" if step < 0 else f"latent {step}", fontsize=8)
        if i == 0:
            axes[i, 0].set_title("image", fontsize=8)
        for j, layer in enumerate(layers, start=1):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            cell = table[(table["latent_step"] == step) & (table["layer"] == layer)]
            ax.imshow(grey, cmap="gray", vmin=0, vmax=255)
            if i == 0:
                ax.set_title(f"layer {layer}", fontsize=8)
            if cell.empty:
                continue
            row = cell.iloc[0]
            rows, cols = int(row["grid_rows"]), int(row["grid_cols"])
            grid = np.asarray(row["similarity"], dtype=float).reshape(rows, cols)
            ax.imshow(grid, cmap="magma", alpha=alpha, extent=(0, width, height, 0), interpolation="nearest")
            cell_h, cell_w = height / rows, width / cols
            for token in row["region_tokens"]:
                r, c = divmod(int(token), cols)
                ax.add_patch(Rectangle((c * cell_w, r * cell_h), cell_w, cell_h, fill=False, edgecolor="white",
                                       linewidth=1.5))
            pr, pc = divmod(int(row["peak_token"]), cols)
            ax.plot((pc + 0.5) * cell_w, (pr + 0.5) * cell_h, marker="x", color="cyan", markersize=7, mew=2)
    fig.suptitle(title or "grounding: similarity of each latent step to the image tokens", fontsize=9)
    return fig


def _pivot(summary: pd.DataFrame, value: str) -> pd.DataFrame:
    frame = summary.copy()
    frame["latent_step"] = frame["latent_step"].astype(str)
    table = frame.pivot_table(index="layer", columns="latent_step", values=value, aggfunc="first")
    order = sorted([c for c in table.columns if c.isdigit()], key=int) + \
        [c for c in ("all", "prompt_last") if c in table.columns]
    return table[order].sort_index(ascending=False)


def _annotated_heatmap(ax, table: pd.DataFrame, fmt: str, **imshow):
    image = ax.imshow(table.to_numpy(dtype=float), aspect="auto", **imshow)
    ax.set_xticks(range(table.shape[1]), [str(c) for c in table.columns], fontsize=8)
    ax.set_yticks(range(table.shape[0]), [str(i) for i in table.index], fontsize=8)
    for (y, x), value in np.ndenumerate(table.to_numpy(dtype=float)):
        if np.isfinite(value):
            ax.text(x, y, format(value, fmt), ha="center", va="center", fontsize=7, color="black",
                    bbox=dict(facecolor="white", alpha=0.6, pad=0.5, edgecolor="none"))
    return image


def grounding_hit_heatmap(summary: pd.DataFrame, *, measure: str = "centred") -> Figure:
    """Pointing-game hit rate by layer (rows) and latent step (columns), per subject, with the chance rate."""
    part = summary[summary["measure"] == measure]
    if part.empty:
        raise LatentProbeError(f"no grounding summary rows for measure {measure!r}",
                               "pass the output of grounding_summary with that measure")
    subjects = list(dict.fromkeys(part["subject"]))
    fig = Figure(figsize=(3.3 * len(subjects) + 0.8, 2.8))
    axes = fig.subplots(1, len(subjects), squeeze=False)[0]
    for ax, subject in zip(axes, subjects):
        rows = part[part["subject"] == subject]
        image = _annotated_heatmap(ax, _pivot(rows, "hit_rate"), ".2f", cmap="viridis", vmin=0, vmax=1)
        chance = rows.loc[rows["latent_step"].astype(str) == "all", "chance_hit"]
        chance_text = f" (chance {chance.mean():.2f})" if len(chance) else ""
        ax.set_title(f"{subject}{chance_text}", fontsize=8)
        ax.set_xlabel("latent step", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="hit rate (peak in the answer region)")
    fig.suptitle(f"grounding: pointing-game hit rate ({measure} similarity)", fontsize=9)
    return fig


def lens_heatmap(summary: pd.DataFrame) -> Figure:
    """The lens by layer (rows) and latent step (columns), per subject: the median rank of the gold answer token
    in the vocabulary (log colour scale) and how often the gold option outranks the other options."""
    if summary.empty:
        raise LatentProbeError("no lens summary rows (no instance had a gold answer token)",
                               "use instances with options whose first tokens differ")
    subjects = list(dict.fromkeys(summary["subject"]))
    fig = Figure(figsize=(6.4, 2.7 * len(subjects) + 0.4))
    axes = fig.subplots(len(subjects), 2, squeeze=False)
    top = max(float(summary["median_gold_rank"].max()), 2.0)
    for (rank_ax, option_ax), subject in zip(axes, subjects):
        part = summary[summary["subject"] == subject]
        image = _annotated_heatmap(rank_ax, _pivot(part, "median_gold_rank") + 1, ".0f", cmap="viridis_r",
                                   norm=LogNorm(vmin=1, vmax=top + 1))
        fig.colorbar(image, ax=rank_ax, shrink=0.8)
        rank_ax.set_title(f"{subject}: median gold rank + 1", fontsize=8)
        chance = float(part["candidate_chance"].mean())
        image = _annotated_heatmap(option_ax, _pivot(part, "candidate_top1"), ".2f", cmap="viridis", vmin=0, vmax=1)
        fig.colorbar(image, ax=option_ax, shrink=0.8)
        option_ax.set_title(f"gold option on top of the options (chance {chance:.2f})", fontsize=8)
        for ax in (rank_ax, option_ax):
            ax.set_xlabel("latent step", fontsize=8)
            ax.set_ylabel("layer", fontsize=8)
    fig.suptitle("logit lens on latent steps", fontsize=9)
    return fig


def draw_grounding_run(run_dir: str | Path, instances, subject_name: str, n_overlays: int = 4) -> list[Path]:
    """Draw a ground run folder's figures from its tables: the hit-rate heatmap per measure and an overlay of the
    centred map on the image for the first ``n_overlays`` instances (``figures/`` and ``figures/overlays/``)."""
    import numpy as np
    import pandas as pd

    from ..data.instances import load_images

    if n_overlays < 0:
        raise LatentProbeError(f"n_overlays must be >= 0, got {n_overlays}", "pass 0 for no overlays")
    run_dir = Path(run_dir)
    table = pd.read_parquet(run_dir / "grounding.parquet")
    summary = _read_table(run_dir / "grounding-summary.csv")
    figures = []
    if not summary.empty:
        for measure in summary["measure"].unique():
            figures.append(save_png(grounding_hit_heatmap(summary, measure=measure),
                                    run_dir / "figures" / f"grounding-hit-rate-{measure}"))
    by_id = {inst.id: inst for inst in instances}
    overlay_names = NameBook()  # instance ids are data: never a path out of the folder, never two on one file
    for instance_id in list(dict.fromkeys(table["instance_id"]))[:n_overlays]:
        image = np.asarray(load_images(by_id[instance_id])[0].convert("RGB"))
        rows = table[(table["instance_id"] == instance_id) & (table["measure"] == "centred")]
        figures.append(save_png(grounding_overlay(image, rows, title=f"{subject_name} · {instance_id} · centred "
                                                  "cosine; white: answer region, x: peak"),
                                path_inside(run_dir / "figures" / "overlays", overlay_names.name(instance_id))))
    return figures


def draw_lens_run(run_dir: str | Path) -> list[Path]:
    """Draw a lens run folder's gold-rank heatmap from its summary table."""
    import pandas as pd

    run_dir = Path(run_dir)
    summary = _read_table(run_dir / "lens-summary.csv")
    return [save_png(lens_heatmap(summary), run_dir / "figures" / "lens-gold-rank")] if not summary.empty else []


def _read_table(path: Path):
    """A summary CSV a run wrote; an empty summary (no rows, perhaps no header) reads as an empty frame."""
    import pandas as pd

    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
