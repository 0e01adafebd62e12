"""Figures for what the latents contribute: the contribution table (`latentprobe.stats.contributions`) and the
decodability gap (`latentprobe.stats.decodability`), in the house style of `latentprobe.report.figures`. Each
``plot_*`` writes ``<path>.png`` and ``<path>.svg`` and returns both paths; nothing here runs a model."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import LatentProbeError
from .figures import _grid, _style, save_figure, subject_colour

CONDITION_ORDER = ("full", "no-latent", "markers-only", "dummy", "oracle", "oracle-other")


def plot_contributions(table: pd.DataFrame, path, *, chance: float | None = None) -> list:
    """Accuracy under each component control with its exact 95% interval, one panel per subject, beside the full
    run; the markers' share of the latent phase's gain over no-latent in each panel's title."""
    rows = table[table.metric == "accuracy"]
    if rows.empty:
        raise LatentProbeError("the contribution table has no accuracy rows", "run intervene with the controls")
    subjects = sorted(rows.subject.unique())
    with _style():
        fig, axes = _grid(len(subjects), max_columns=3, panel_size=(4.2, 3.2))
        for ax, subject in zip(axes, subjects):
            part = rows[rows.subject == subject].drop_duplicates("condition")
            part = part.set_index("condition").reindex([c for c in CONDITION_ORDER if c in set(part.condition)])
            x = np.arange(len(part))
            est = part.estimate.to_numpy(float)
            err = np.vstack([est - part.ci_low.to_numpy(float), part.ci_high.to_numpy(float) - est])
            colour = subject_colour(subject)
            ax.bar(x, est, color=[colour if c == "full" else (*colour, 0.55) for c in part.index], edgecolor=colour)
            ax.errorbar(x, est, yerr=np.nan_to_num(err), fmt="none", ecolor="black", capsize=3, linewidth=1)
            if chance is not None:
                ax.axhline(chance, color="grey", linestyle=(0, (4, 2)), linewidth=1, label=f"chance {chance:g}")
                ax.legend(loc="upper right", fontsize="small", frameon=False)
            ax.set_xticks(x, part.index, rotation=30, ha="right")
            ax.set_ylim(0, 1.05)
            ax.set_ylabel("accuracy (exact 95% CI)")
            share = table[(table.subject == subject) & (table.metric == "markers_share")]
            title = subject
            if len(share) and np.isfinite(share.estimate.iloc[0]):
                s = share.iloc[0]
                title += f"\nmarkers keep {s.estimate:.0%} [{s.ci_low:.0%}, {s.ci_high:.0%}] of the gain"
            ax.set_title(title, fontsize="medium")
        return save_figure(fig, path)


def plot_decodability(cells: pd.DataFrame, path) -> list:
    """Out-of-fold accuracy of the best layer (chosen inside the training folds) at each latent step and after
    the latent phase, with exact 95% intervals and the majority-class chance, one line per subject."""
    rows = cells[cells.selection == "nested"]
    if rows.empty:
        raise LatentProbeError("the decodability table has no nested rows", "run latentprobe decodability first")
    with _style():
        fig, [ax] = _grid(1, panel_size=(5.5, 3.4))
        labels: list[str] = []
        for subject, part in rows.groupby("subject", sort=True):
            part = part.sort_values(["position", "step"], key=lambda c: c.map({"latent": 0, "after": 1})
                                    if c.name == "position" else c)
            names = [f"{'z' if p == 'latent' else 'after '}{s}" for p, s in zip(part.position, part.step)]
            labels = names if len(names) > len(labels) else labels
            x = np.arange(len(part))
            est = part.accuracy.to_numpy(float)
            err = np.vstack([est - part.ci_low.to_numpy(float), part.ci_high.to_numpy(float) - est])
            ax.errorbar(x, est, yerr=err, marker="o", capsize=3, color=subject_colour(subject), label=subject)
            ax.axhline(float(part.chance.iloc[0]), color=subject_colour(subject), linestyle=(0, (4, 2)),
                       linewidth=0.8)
        ax.set_xticks(np.arange(len(labels)), labels)
        ax.set_xlabel("latent step (z k) and answer-region position after the latents")
        ax.set_ylabel("gold option decoded (accuracy)")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize="small", frameon=False)
        ax.set_title("Where the answer becomes decodable (dashed: chance)", fontsize="medium")
        return save_figure(fig, path)


def plot_step_influence(table: pd.DataFrame, path) -> list:
    """The K x (K + 1) step x step map per subject: rows = the edited latent step i, columns = each latent step j
    (placebo-corrected R2: squared change over the clean spread between two instances) and the answer (answer-change rate), each
    cell annotated with its estimate; cells whose interval contains 0 are hatched."""
    from ..stats.step_influence import map_matrix

    if table.empty:
        raise LatentProbeError("the step-influence table is empty", "run latentprobe step-influence first")
    subjects = sorted(table.subject.unique())
    with _style():
        fig, axes = _grid(len(subjects), max_columns=3, panel_size=(4.4, 3.6))
        for ax, subject in zip(axes, subjects):
            matrix, sources, columns = map_matrix(table, subject)
            part = table[table.subject == subject]
            steps = matrix[:, :-1]
            top = float(np.nanmax(steps)) if np.isfinite(steps).any() and np.nanmax(steps) > 0 else 1.0
            shown = np.column_stack([steps / top, matrix[:, -1]])  # latents scaled to their max, answer a rate
            image = ax.imshow(shown, cmap="cividis", vmin=0, vmax=1, aspect="auto")
            for i, source in enumerate(sources):
                for j, target in enumerate(columns):
                    value = matrix[i, j]
                    if not np.isfinite(value):
                        continue
                    cell = part[(part.source_step == source) & (part.target == str(target))]
                    null = len(cell) and cell.ci_low.iloc[0] <= 0 <= cell.ci_high.iloc[0]
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize="x-small",
                            color="white" if shown[i, j] < 0.6 else "black")
                    if null:
                        ax.add_patch(_hatch(j, i))
            ax.grid(False)
            ax.axvline(len(columns) - 1.5, color="white", linewidth=2)
            ax.set_xticks(range(len(columns)), [f"z{c}" if c != "answer" else "answer" for c in columns])
            ax.set_yticks(range(len(sources)), [f"edit z{s}" for s in sources])
            kind = ", ".join(sorted(part.kind.unique()))
            ax.set_title(f"{subject} ({kind})\nlatents: change / clean spread (max {top:.2f}); answer: rate",
                         fontsize="small")
        fig.colorbar(image, ax=axes, shrink=0.8, label="scaled change / answer-change rate")
        return save_figure(fig, path)


def _hatch(x, y):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, hatch="///", edgecolor="grey", linewidth=0)


def plot_latent_lens(summary: pd.DataFrame, path) -> list:
    """Per subject: how often the gold answer's token is among a latent state's nearest contextual neighbours
    (left) and among the logit lens's top tokens (right), by layer x latent step."""
    if summary.empty:
        raise LatentProbeError("the latent-lens summary is empty", "run latentprobe lens --neighbours first")
    subjects = sorted(summary.subject.unique())
    with _style():
        fig, axes = _grid(2 * len(subjects), max_columns=2, panel_size=(3.6, 3.0))
        for s, subject in enumerate(subjects):
            part = summary[summary.subject == subject]
            for a, (column, label) in enumerate((("gold_in_neighbours", "nearest neighbours"),
                                                 ("gold_in_lens", "logit lens"))):
                ax = axes[2 * s + a]
                grid = part.pivot(index="layer", columns="latent_step", values=column).sort_index(ascending=False)
                image = ax.imshow(grid.to_numpy(float), cmap="cividis", vmin=0, vmax=1, aspect="auto")
                ax.grid(False)
                ax.set_xticks(range(grid.shape[1]), [f"z{c}" for c in grid.columns])
                ax.set_yticks(range(grid.shape[0]), [str(i) for i in grid.index])
                ax.set_xlabel("latent step")
                ax.set_ylabel("layer")
                ax.set_title(f"{subject}\ngold token in {label}", fontsize="small")
        fig.colorbar(image, ax=axes, shrink=0.8, label="share of instances")
        return save_figure(fig, path)
