"""Figures for the similarity, probe and effect tables, in one colour-blind-safe style.

Every ``plot_*`` function takes the arrays or DataFrames made by :mod:`latentprobe.stats.similarity`,
:mod:`latentprobe.stats.probes` and the effects summary, writes ``<path>.png`` and ``<path>.svg`` and returns both
paths. Figures are built on :class:`matplotlib.figure.Figure` without pyplot: ``savefig`` renders PNGs with
the non-interactive Agg backend (SVGs with the SVG backend) whatever backend the caller has selected, no
window opens, no global pyplot state is touched (no figure to close, safe in notebooks and threads), and
importing this module does not switch the caller's backend.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.ticker import MaxNLocator
from matplotlib.figure import Figure

from ..errors import LatentProbeError
from ..stats.probes import best_probe_rows, ran_probes
from ..verdicts.tidy import tidy_effects

PALETTE = "colorblind"  # seaborn's colour-blind-safe qualitative palette
SEQUENTIAL_CMAP = "cividis"  # perceptually uniform and colour-blind safe, for 0..1 scales
DIVERGING_CMAP = "RdBu_r"  # ColorBrewer diverging, colour-blind safe, for -1..1 scales
DPI = 150
SIMILARITY_LABEL = "cosine similarity (unitless)"
STEP_LABEL = "latent step (0 = first)"
BASELINE_STYLES = {"image_mean": (0, (5, 2)), "prompt_last": (0, (1, 1.5))}  # dashed, dotted


# One colour per subject in every figure: known subjects have fixed places in the palette (organisms and the
# real families they imitate share a colour, as they never share a figure in the demo); others hash into it.
# Palette places: 0 blue, 1 orange, 2 green, 3 vermillion, 4 purple, 5 brown, 6 pink, 7 grey, 8 yellow, 9 sky.
# The demo's eight organisms take eight different places (blind and collapsed hashed onto capimagine's
# vermillion, so three subjects of one figure looked alike); they share theirs only with real models (Qwen2.5-VL,
# Monet) that never appear beside them.
_SUBJECT_PLACES = {"organism-bottleneck": 0, "organism-shortcut": 1, "organism-mirage": 2, "organism-capimagine": 3,
                   "organism-lvr": 4, "qwen2.5-vl": 5, "random-init": 6, "organism-direct": 7, "tiny": 8, "monet": 9,
                   "organism-blind": 5, "organism-collapsed": 9}
_SUBJECT_ALIASES = {"lvr": "organism-lvr", "mirage": "organism-mirage", "capimagine": "organism-capimagine"}


def subject_colour(subject: str):
    """The RGB colour ``subject`` has in every figure (seaborn's colour-blind palette, 10 colours).

    >>> subject_colour("organism-bottleneck") == subject_colour("organism-bottleneck")
    True
    """
    import zlib

    palette = sns.color_palette(PALETTE, 10)
    name = _SUBJECT_ALIASES.get(str(subject), str(subject))
    if name in _SUBJECT_PLACES:
        return palette[_SUBJECT_PLACES[name]]
    return palette[zlib.crc32(name.encode()) % len(palette)]  # stable across runs, unlike hash()


@contextmanager
def _style() -> Iterator[None]:
    """The one house style: white grid, readable fonts, colour-blind palette, applied only inside."""
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=1.05), sns.color_palette(PALETTE):
        yield


def save_figure(fig: Figure, path_without_suffix: str | Path) -> list[Path]:
    """Write ``fig`` as PNG and SVG next to each other and return both paths.

    >>> from matplotlib.figure import Figure
    >>> import tempfile, pathlib
    >>> fig = Figure(); _ = fig.add_subplot().plot([0, 1])
    >>> [p.suffix for p in save_figure(fig, pathlib.Path(tempfile.mkdtemp()) / "line")]
    ['.png', '.svg']
    """
    base = Path(path_without_suffix)
    if base.suffix in (".png", ".svg"):
        base = base.with_suffix("")  # tolerate a path given with a suffix
    base.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix in (".png", ".svg"):
        target = base.with_name(base.name + suffix)
        fig.savefig(target, dpi=DPI, bbox_inches="tight", facecolor="white")
        paths.append(target)
    return paths


def _grid(n_panels: int, max_columns: int = 5, panel_size=(3.2, 3.0)) -> tuple[Figure, list]:
    columns = min(n_panels, max_columns)
    rows = math.ceil(n_panels / columns)
    fig = Figure(figsize=(panel_size[0] * columns + 1.0, panel_size[1] * rows + 0.6), layout="constrained")
    fig.get_layout_engine().set(h_pad=0.1, hspace=0.06)  # room between a panel's ticks and the title below
    axes = fig.subplots(rows, columns, squeeze=False).ravel().tolist()
    for unused in axes[n_panels:]:
        unused.set_visible(False)
    return fig, axes[:n_panels]


def _similarity_scale(values: np.ndarray, centred: bool) -> tuple[float, float, str]:
    """0..1 with a sequential map when nothing is negative (typical raw cosine), else -1..1 diverging."""
    finite = values[np.isfinite(values)]
    if not centred and (finite.size == 0 or finite.min() >= 0):
        return 0.0, 1.0, SEQUENTIAL_CMAP
    return -1.0, 1.0, DIVERGING_CMAP


def _require_columns(table: pd.DataFrame, columns, what: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise LatentProbeError(f"{what} lacks columns {missing}", f"pass the table made by latentprobe ({what})")


# ----------------------------------------------------------------------------------------- similarity


def plot_similarity_heatmaps(
    matrices, path, *, centred: bool = False, title: str | None = None, step_labels=None
) -> list[Path]:
    """One instance x instance heatmap per latent step, on one shared colour scale.

    ``matrices`` is the (S, N, N) output of ``inter_instance_similarity``.

    >>> import numpy as np, tempfile, pathlib
    >>> from latentprobe.stats.similarity import inter_instance_similarity
    >>> sims = inter_instance_similarity(np.random.default_rng(0).normal(size=(6, 3, 4)))
    >>> len(plot_similarity_heatmaps(sims, pathlib.Path(tempfile.mkdtemp()) / "heat"))
    2
    """
    matrices = np.asarray(matrices, dtype=float)
    if matrices.ndim != 3 or matrices.shape[1] != matrices.shape[2]:
        raise LatentProbeError(f"expected (S, N, N) similarity matrices, got {matrices.shape}",
                               "pass the output of inter_instance_similarity")
    vmin, vmax, cmap = _similarity_scale(matrices, centred)
    labels = list(step_labels) if step_labels is not None else [f"step {s}" for s in range(len(matrices))]
    with _style():
        fig, axes = _grid(len(matrices))
        image = None
        for ax, matrix, label in zip(axes, matrices, labels):
            image = ax.imshow(matrix, vmin=vmin, vmax=vmax, cmap=cmap, interpolation="nearest")
            ax.set_title(label)
            ax.grid(False)
        fig.supxlabel("instance (index in the input order)")
        fig.supylabel("instance")
        kind = "mean-centred" if centred else "raw"
        fig.colorbar(image, ax=axes, shrink=0.8, label=f"{kind} {SIMILARITY_LABEL}")
        fig.suptitle(title or f"Inter-instance {kind} cosine similarity per latent step")
        return save_figure(fig, path)


def plot_intra_instance_heatmap(matrix, path, *, centred: bool = False, title: str | None = None) -> list[Path]:
    """The step x step similarity within instances (mean over instances), annotated when small.

    >>> import numpy as np, tempfile, pathlib
    >>> len(plot_intra_instance_heatmap(np.eye(3), pathlib.Path(tempfile.mkdtemp()) / "intra"))
    2
    """
    matrix = np.asarray(matrix, dtype=float)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise LatentProbeError(f"expected an (S, S) matrix, got {matrix.shape}",
                               "pass the output of intra_instance_similarity")
    vmin, vmax, cmap = _similarity_scale(matrix, centred)
    kind = "mean-centred" if centred else "raw"
    with _style():
        size = 2.0 + 0.5 * len(matrix)
        fig = Figure(figsize=(size + 1.2, size), layout="constrained")
        ax = fig.add_subplot()
        sns.heatmap(matrix, ax=ax, vmin=vmin, vmax=vmax, cmap=cmap, square=True, annot=len(matrix) <= 12,
                    fmt=".2f", annot_kws={"size": 8}, cbar_kws={"label": f"{kind} {SIMILARITY_LABEL}"})
        ax.set_xlabel(STEP_LABEL)
        ax.set_ylabel(STEP_LABEL)
        ax.set_title(title or f"Within-instance {kind} similarity between latent steps")
        return save_figure(fig, path)


def _draw_baselines_and_curve(ax, rows: pd.DataFrame, value: str, curve_label: str) -> None:
    latent = rows[(rows.representation == "latent")].sort_values("step")
    if not latent.empty:
        line, = ax.plot(latent.step, latent[value], marker="o", label=curve_label)
        ax.fill_between(latent.step, latent.ci_low, latent.ci_high, alpha=0.25, color=line.get_color(),
                        label="latent 95% CI")
        ax.set_xticks(sorted(latent.step.unique()))
    colours = sns.color_palette(PALETTE)
    baselines = [name for name in rows.representation.unique() if name != "latent"]
    for index, name in enumerate(baselines, start=1):
        row = rows[rows.representation == name].iloc[0]
        colour = colours[index % len(colours)]
        ax.axhline(row[value], color=colour, linestyle=BASELINE_STYLES.get(name, "--"), label=name)
        if np.isfinite(row.ci_low) and np.isfinite(row.ci_high):
            ax.axhspan(row.ci_low, row.ci_high, color=colour, alpha=0.12)
    ax.set_xlabel(STEP_LABEL)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # latent steps are whole numbers


def _cosine_rows(table: pd.DataFrame, centring: str = "raw") -> pd.DataFrame:
    if "statistic" in table.columns:
        table = table[table.statistic == "cosine"]
    return table[table.centring == centring]


def plot_similarity_by_step(table: pd.DataFrame, path, *, subject: str | None = None) -> list[Path]:
    """Per latent step with bootstrap bands, against baseline lines: the raw mean cosine between instances (the
    paper's view) and, where the table has it, the relative spread (the collapse statistic: 0 = every instance
    has the same vector, ~1 = independent isotropic vectors). ``table`` is the output of ``similarity_table``.

    >>> import numpy as np, tempfile, pathlib
    >>> from latentprobe.stats.similarity import similarity_table
    >>> rng = np.random.default_rng(0)
    >>> table = similarity_table(rng.normal(size=(6, 3, 4)), {"prompt_last": rng.normal(size=(6, 4))}, "tiny", n_boot=20)
    >>> len(plot_similarity_by_step(table, pathlib.Path(tempfile.mkdtemp()) / "curve"))
    2
    """
    _require_columns(table, ["subject", "representation", "centring", "step", "mean_similarity", "ci_low", "ci_high"],
                     "similarity_table")
    if subject is not None:
        table = table[table.subject == subject]
    subjects = table.subject.unique()
    if len(subjects) != 1:
        raise LatentProbeError(f"the table holds {len(subjects)} subjects", "pass subject=... to pick one")
    spread = table[table.statistic == "relative_spread"] if "statistic" in table.columns else table.iloc[0:0]
    panels = 1 + (not spread.empty)
    with _style():
        fig = Figure(figsize=(5.2 * panels, 4.0), layout="constrained")
        axes = fig.subplots(1, panels, squeeze=False).ravel()
        _draw_baselines_and_curve(axes[0], _cosine_rows(table), "mean_similarity", "latent tokens")
        axes[0].set_title("raw cosine between instances (the paper's view)")
        axes[0].set_ylabel(f"mean {SIMILARITY_LABEL}")
        if not spread.empty:
            _draw_baselines_and_curve(axes[1], spread, "estimate", "latent tokens")
            axes[1].set_title("relative spread across instances (collapse = 0)")
            axes[1].set_ylabel("total variance / mean squared norm")
            axes[1].set_ylim(bottom=0)
        axes[-1].legend(loc="best", fontsize="small")
        fig.suptitle(f"{subjects[0]}: how alike instances are at each latent step (95% bootstrap CI)")
        return save_figure(fig, path)


def plot_subject_comparison(table: pd.DataFrame, path, *, representation: str = "latent",
                            margin: float | None = None) -> list[Path]:
    """One line per subject over latent steps: raw cosine between instances (the paper's view), and the collapse
    statistic the verdict reads, from a concatenation of ``similarity_table`` outputs: the ``collapse_ratio``
    against one image token (against the image-token mean where no single token was recorded), with its
    interval, on a log axis (ratios of organisms span 0.01-50); tables without it (before issue 18) show the
    ``spread_ratio`` against the image-token mean. ``margin``: the collapse verdict's margin, drawn on that panel
    (an interval wholly below it is `collapsed`, wholly above it `not collapsed`).

    >>> import numpy as np, pandas as pd, tempfile, pathlib
    >>> from latentprobe.stats.similarity import similarity_table
    >>> rng = np.random.default_rng(0)
    >>> table = pd.concat([similarity_table(rng.normal(size=(5, 3, 4)), {}, name, n_boot=20) for name in "ab"])
    >>> len(plot_subject_comparison(table, pathlib.Path(tempfile.mkdtemp()) / "subjects"))
    2
    """
    _require_columns(table, ["subject", "representation", "centring", "step", "mean_similarity"], "similarity_table")
    rows = table[table.representation == representation]
    if rows.empty:
        raise LatentProbeError(f"no {representation!r} rows in the similarity table", "check the representation name")
    panels = [("raw cosine between instances", _cosine_rows(rows), "mean_similarity", f"mean {SIMILARITY_LABEL}")]
    verdict_panel = _collapse_panel(rows)
    if verdict_panel is not None:
        panels.append(verdict_panel)
    with _style():
        fig = Figure(figsize=(5.2 * len(panels), 4.0), layout="constrained")
        axes = fig.subplots(1, len(panels), squeeze=False).ravel()
        for ax, (title, panel_rows, value, ylabel) in zip(axes, panels):
            for subject, curve in panel_rows.groupby("subject", sort=True):
                curve = curve.sort_values("step")
                line, = ax.plot(curve.step, curve[value], marker="o", label=subject,
                                color=subject_colour(subject))
                if {"ci_low", "ci_high"} <= set(curve.columns):
                    ax.fill_between(curve.step, curve.ci_low, curve.ci_high, alpha=0.2, color=line.get_color())
            ax.set_title(title)
            ax.set_xlabel(STEP_LABEL)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # latent steps are whole numbers
            ax.set_ylabel(ylabel)
        if verdict_panel is not None:
            ratio_axis, ratio_rows = axes[1], verdict_panel[1]
            ratio_axis.axhline(1.0, color="grey", linestyle=":", linewidth=1)
            if margin is not None:
                ratio_axis.axhline(margin, color="black", linestyle="--", linewidth=1.2,
                                   label=f"margin {margin:g} (collapsed below)")
            values = ratio_rows[[c for c in ("estimate", "ci_low", "ci_high") if c in ratio_rows]].to_numpy(float)
            positive = values[np.isfinite(values) & (values > 0)]
            if positive.size and ratio_rows.statistic.eq("collapse_ratio").all():
                ratio_axis.set_yscale("log")  # 0.01 and 40 on one axis; a bound at 0 is drawn at the axis' foot
                ratio_axis.set_ylim(min(positive.min(), margin or 1.0) / 2, max(positive.max(), 1.0) * 2)
            else:
                ratio_axis.set_ylim(bottom=0)
        handles, labels = axes[-1].get_legend_handles_labels()  # below the panels: inside, it covered the bands
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5), fontsize="small")
        fig.suptitle("Collapse across subjects: latent tokens between instances")
        return save_figure(fig, path)


def _collapse_panel(rows: pd.DataFrame):
    """(title, rows, value column, y label) of the panel the collapse verdict reads, or None."""
    if "statistic" not in rows.columns:
        return None
    ratios = rows[rows.statistic == "collapse_ratio"]
    if len(ratios):
        single = ratios[ratios.yardstick == "single token"] if "yardstick" in ratios.columns else ratios.iloc[0:0]
        chosen = single if len(single) else ratios
        reference = str(chosen.reference.iloc[0])
        what = "one image token" if len(single) else reference
        return (f"collapse ratio vs {what} (the verdict's)", chosen[chosen.reference == reference], "estimate",
                "latent / token spread per direction")
    spread = rows[rows.statistic == "spread_ratio"]
    reference = next((r for r in ("image_mean", "prompt_last") if r in set(spread.get("reference", []))), None)
    if reference is None:
        return None
    return (f"spread ratio vs {reference} (collapse = 0)", spread[spread.reference == reference], "estimate",
            f"latent spread / {reference} spread")


# --------------------------------------------------------------------------------------------- probes


def _chance_text(rows: pd.DataFrame) -> str:
    chance = rows.chance.dropna()
    if chance.empty:
        return "chance not available"
    if rows.metric.iloc[0] == "r2":
        return "chance R² = 0"
    low, high = chance.min(), chance.max()
    return f"chance = {low:.2f}" if np.isclose(low, high) else f"chance = {low:.2f}-{high:.2f}"


def _panels(probes: pd.DataFrame) -> list[tuple[tuple[str, str], pd.DataFrame]]:
    keys = ["subject", "attribute"] if {"subject", "attribute"} <= set(probes.columns) else []
    if not keys:
        return [(("", ""), probes)]
    return [(key, rows) for key, rows in probes.groupby(keys, sort=True)]


def _metric_label(metric: str) -> str:
    return "R² (fraction of variance)" if metric == "r2" else "accuracy (fraction correct)"


def plot_probe_heatmap(
    probes: pd.DataFrame, path, *, representation: str = "latent", value: str = "score"
) -> list[Path]:
    """Probe ``value`` ("score", "selectivity" or "control_score") over layer x latent step, one panel per
    (subject, attribute), with the chance level in each panel's title.

    >>> import numpy as np, tempfile, pathlib
    >>> from latentprobe.stats.probes import probe_table
    >>> rng = np.random.default_rng(0)
    >>> features = {(layer, step): rng.normal(size=(12, 4)) for layer in (0, 1) for step in (0, 1)}
    >>> table = probe_table(features, np.tile([0, 1], 6), np.arange(12), subject="tiny",
    ...                     representation="latent", attribute="colour", n_splits=3, Cs=(1.0,))
    >>> len(plot_probe_heatmap(table, pathlib.Path(tempfile.mkdtemp()) / "probe"))
    2
    """
    _require_columns(probes, ["layer", "step", value, "chance", "metric"], "probe table")
    if "representation" in probes.columns:
        probes = probes[probes.representation == representation]
    if "selection" in probes.columns:  # one row per cell; the nested best-cell row is drawn by plot_probe_bars
        probes = probes[probes.selection == "cell"]
    probes = ran_probes(probes)
    if probes.empty:
        raise LatentProbeError(f"no probe rows that ran for representation {representation!r}",
                               "check skipped_reason in the probe table")
    panels = _panels(probes)
    metric = probes.metric.iloc[0]
    lowest = min(0.0, float(probes[value].min()))
    with _style():
        fig, axes = _grid(len(panels), max_columns=3, panel_size=(4.2, 3.6))
        for ax, ((subject, attribute), rows) in zip(axes, panels):
            grid = rows.pivot_table(index="layer", columns="step", values=value, aggfunc="mean")
            # no colour bar per panel: its label ran into the next panel; one shared bar follows the loop
            sns.heatmap(grid, ax=ax, vmin=lowest, vmax=1.0, cmap=SEQUENTIAL_CMAP, annot=grid.size <= 64,
                        fmt=".2f", annot_kws={"size": 8}, cbar=False)
            ax.invert_yaxis()  # layer 0 at the bottom, as in a network diagram
            ax.set_xlabel(STEP_LABEL)
            ax.set_ylabel("layer")
            name = " / ".join(part for part in (subject, attribute) if part)
            ax.set_title(f"{name}\n{_chance_text(rows)}" if name else _chance_text(rows), fontsize="medium")
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        shared = ScalarMappable(Normalize(vmin=lowest, vmax=1.0), cmap=SEQUENTIAL_CMAP)
        fig.colorbar(shared, ax=axes, shrink=0.8, label=f"{value.replace('_', ' ')}: {_metric_label(metric)}")
        fig.suptitle(f"Linear probe {value.replace('_', ' ')} on {representation} states")
        return save_figure(fig, path)


def plot_probe_bars(probes: pd.DataFrame, path, *, margin: float | None = None) -> list[Path]:
    """Score, control score and selectivity of the best layer/step of each representation (latent and
    baselines; the best cell chosen inside the training folds where the table has nested rows), one panel per
    (subject, attribute), with the chance level as a grey line. Error bars: fold-to-fold std of score and
    control, the bootstrap interval of selectivity. ``margin``: the visual-information verdict's selectivity
    margin, drawn as a dashed line. One legend for all panels, outside them (it covered bars inside).

    >>> import numpy as np, pandas as pd, tempfile, pathlib
    >>> from latentprobe.stats.probes import probe_table
    >>> rng = np.random.default_rng(0)
    >>> tables = [probe_table({(0, s): rng.normal(size=(12, 4))}, np.tile([0, 1], 6), np.arange(12), subject="tiny",
    ...                       representation=r, attribute="colour", n_splits=3, Cs=(1.0,))
    ...           for r, s in (("latent", 0), ("image_mean", -1))]
    >>> len(plot_probe_bars(pd.concat(tables), pathlib.Path(tempfile.mkdtemp()) / "bars"))
    2
    """
    _require_columns(probes, ["score", "control_score", "selectivity", "chance", "metric"], "probe table")
    best = best_probe_rows(probes)
    if best.empty:
        raise LatentProbeError("no probe row ran", "check skipped_reason in the probe table")
    if "representation" not in best.columns:
        best = best.assign(representation="latent")
    measures = {"score": "score", "control_score": "control", "selectivity": "selectivity"}
    panels = _panels(best)
    with _style():
        fig, axes = _grid(len(panels), max_columns=3, panel_size=(4.6, 3.8))
        for ax, ((subject, attribute), rows) in zip(axes, panels):
            long = rows.melt(id_vars=["representation"], value_vars=list(measures), var_name="measure")
            long["measure"] = long.measure.map(measures)
            sns.barplot(long, x="representation", y="value", hue="measure", ax=ax, errorbar=None)
            # Fold-to-fold spread of score and control (selectivity has no std of its own).
            for container, std_column in zip(ax.containers, ("score_std", "control_std")):
                stds = rows.set_index("representation")[std_column]
                for bar, representation in zip(container, rows.representation):
                    ax.errorbar(bar.get_x() + bar.get_width() / 2, bar.get_height(), yerr=stds[representation],
                                color="black", capsize=3, linewidth=1)
            if {"selectivity_ci_low", "selectivity_ci_high"} <= set(rows.columns) and len(ax.containers) > 2:
                indexed = rows.set_index("representation")
                for bar, representation in zip(ax.containers[2], rows.representation):
                    low, high = indexed.selectivity_ci_low[representation], indexed.selectivity_ci_high[representation]
                    if np.isfinite(low) and np.isfinite(high):
                        centre = bar.get_height()
                        ax.errorbar(bar.get_x() + bar.get_width() / 2, centre,
                                    yerr=[[max(centre - low, 0)], [max(high - centre, 0)]], color="black",
                                    capsize=3, linewidth=1)
            ax.axhline(rows.chance.mean(), color="grey", linestyle=":", linewidth=1.2, label="chance")
            if margin is not None:  # visual_info reads the score over chance against the margin
                ax.axhline(rows.chance.mean() + margin, color="black", linestyle="--", linewidth=1.2,
                           label=f"chance + margin {margin:g} (the verdict's line for the score)")
            ax.set_xticks(ax.get_xticks(), [t.get_text().replace("_", "\n") for t in ax.get_xticklabels()])
            ax.set_ylabel(_metric_label(rows.metric.iloc[0]))
            ax.set_xlabel("representation (best cell, chosen in training folds)")
            name = " / ".join(part for part in (subject, attribute) if part)
            ax.set_title(f"{name}\n{_chance_text(rows)}" if name else _chance_text(rows), fontsize="medium")
            handles, labels = ax.get_legend_handles_labels()
            if ax.get_legend() is not None:
                ax.get_legend().remove()
        fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize="small")
        fig.suptitle("Probe score vs control task (selectivity = score - control)")
        return save_figure(fig, path)


# -------------------------------------------------------------------------------------------- effects

# Rates and distances cannot be negative: their margin is one line; a signed effect's margin is two.
UNSIGNED_METRICS = ("flip_rate", "change_ratio", "kl_clean_to_intervened", "answer_changed")


def _symlog_threshold(rows: pd.DataFrame, margin: float | None) -> float | None:
    """Where a forest panel's axis should turn logarithmic, or None for a linear axis: when its largest value
    is over 20 times the threshold (an out-of-distribution edit such as a blank image moves the latents thousands
    of times the spread between instances, and a linear axis then squeezes every other row, margin included, into
    one pixel at 0). Values up to the threshold (5 margins; without a margin, the median |estimate|) stay linear,
    so the margin and the effects near it read as before.

    >>> rows = pd.DataFrame({"estimate": [0.0, 1.0, 1.1, 9000.0], "ci_low": [-0.1, 0.8, 0.9, 5000.0],
    ...                      "ci_high": [0.1, 1.2, 1.3, 15000.0]})
    >>> _symlog_threshold(rows, 0.2), _symlog_threshold(rows.iloc[:3], 0.2)
    (1.0, None)
    """
    values = rows[["estimate", "ci_low", "ci_high"]].abs().to_numpy(dtype=float)
    values = values[np.isfinite(values)]
    estimates = rows["estimate"].abs().to_numpy(dtype=float)
    estimates = estimates[np.isfinite(estimates)]
    if not len(values) or not len(estimates):
        return None
    linear_within = 5 * margin if margin else float(np.median(estimates))
    if linear_within <= 0 or values.max() <= 20 * linear_within:
        return None
    return linear_within


def _symlog_limit(value: float, linear_within: float) -> float:
    """An axis end just beyond ``value`` on a symlog axis: half the linear range past it inside that range, half
    the value again beyond it (where the axis is logarithmic).

    >>> _symlog_limit(-0.2, 1.0), _symlog_limit(9000.0, 1.0), _symlog_limit(-9000.0, 1.0)
    (-0.7, 13500.0, -13500.0)
    """
    if abs(value) > linear_within:
        return 1.5 * value
    return value + (0.5 * linear_within if value >= 0 else -0.5 * linear_within)


def plot_effects_forest(effects: pd.DataFrame, path, *, metrics=None, reference_lines=None) -> list[Path]:
    """Grouped forest plot of the effects summary: one panel per metric side by side (scales differ), one row
    per target x intervention (x step), and in each row one point per subject (its colour in every figure,
    dodged vertically) with its confidence interval. The height grows with the interventions, not with
    subjects x interventions, so a six-subject demo stays one screen tall.
    ``reference_lines`` maps a metric to a value drawn as a dashed line, e.g. a verdict threshold
    (``{"change_ratio": 0.2, "flip_rate": 0.1}``).

    >>> import pandas as pd, tempfile, pathlib
    >>> effects = pd.DataFrame({"subject": ["tiny"] * 2, "target": ["latent"] * 2, "intervention": ["noise"] * 2,
    ...     "metric": ["flip_rate", "NIE"], "estimate": [0.02, 0.0], "ci_low": [0.0, -0.1], "ci_high": [0.05, 0.1],
    ...     "n": [50, 50]})
    >>> len(plot_effects_forest(effects, pathlib.Path(tempfile.mkdtemp()) / "forest"))
    2
    """
    effects = tidy_effects(effects)
    if metrics is not None:
        effects = effects[effects.metric_base.isin(list(metrics))]
    if effects.empty:
        raise LatentProbeError("no effect rows to plot", "check the effects table and the metrics filter")
    effects = effects.assign(row_label=[
        f"{r.target} | {r.intervention}" + ("" if pd.isna(r.step) else f" | step {int(r.step)}")
        for r in effects.itertuples()])
    names = list(dict.fromkeys(effects.metric_base))
    subjects = sorted(effects.subject.unique())
    labels = list(dict.fromkeys(effects.sort_values(["target", "intervention", "step"]).row_label))
    # rows top to bottom in label order; subjects spread over 70% of a row's height
    offsets = dict(zip(subjects, np.linspace(0.35, -0.35, len(subjects)) if len(subjects) > 1 else [0.0]))
    position = {label: float(k) for k, label in enumerate(reversed(labels))}
    with _style():
        # width: the row labels (about 0.075 in per character at this font) plus one panel per metric
        label_width = 0.5 + 0.075 * max(len(label) for label in labels)
        legend_rows = math.ceil(len(subjects) / 3)
        fig = Figure(figsize=(label_width + 3.8 * len(names),
                              1.9 + 0.25 * legend_rows + (0.22 + 0.09 * len(subjects)) * len(labels)),
                     layout="constrained")
        axes = fig.subplots(1, len(names), squeeze=False, sharey=True).ravel()
        for ax, name in zip(axes, names):
            rows = effects[effects.metric_base == name]
            for row in rows.itertuples():
                # A missing interval draws as a bare point; clipping guards against an estimate outside its CI.
                below = 0.0 if pd.isna(row.ci_low) else max(0.0, row.estimate - row.ci_low)
                above = 0.0 if pd.isna(row.ci_high) else max(0.0, row.ci_high - row.estimate)
                ax.errorbar(row.estimate, position[row.row_label] + offsets[row.subject], xerr=[[below], [above]],
                            fmt="o", markersize=4, color=subject_colour(row.subject), capsize=2, linewidth=1)
            ax.axvline(0.0, color="grey", linewidth=1)
            margin = reference_lines.get(name) if reference_lines else None
            linear_within = _symlog_threshold(rows, margin)
            if linear_within is not None:
                ax.set_xscale("symlog", linthresh=linear_within)
                # symlog pads its limits in log space (a panel of positive effects got an axis down to -100)
                low = min(np.nanmin(rows[["estimate", "ci_low"]].to_numpy(dtype=float)), -(margin or 0.0))
                high = max(np.nanmax(rows[["estimate", "ci_high"]].to_numpy(dtype=float)), margin or 0.0)
                ax.set_xlim(*(_symlog_limit(v, linear_within) for v in (low, high)))
            scale_note = "" if linear_within is None else f"; log beyond ±{linear_within:.2g}"
            if margin is not None:
                signed = name not in UNSIGNED_METRICS  # a signed effect is negligible inside (-margin, margin)
                for value in ((-margin, margin) if signed else (margin,)):
                    ax.axvline(value, color="black", linestyle="--", linewidth=1)
                ax.set_title(f"{name} (dashed: margin {'±' if signed else ''}{margin:g}{scale_note})",
                             fontsize="medium")
            else:
                ax.set_title(name + (f" ({scale_note[2:]})" if scale_note else ""), fontsize="medium")
            for k in range(len(labels) - 1):  # thin separators between intervention rows
                ax.axhline(k + 0.5, color="0.85", linewidth=0.6)
            ax.set_xlabel("estimate, 95% CI")
            ax.grid(axis="y", visible=False)
        axes[0].set_yticks(list(position.values()), list(position.keys()), fontsize="small")
        axes[0].set_ylim(-0.6, len(labels) - 0.4)
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], marker="o", linestyle="", color=subject_colour(s), label=s) for s in subjects]
        fig.legend(handles=handles, title="subject", loc="outside lower center", ncols=min(3, len(subjects)),
                   fontsize="small")
        fig.suptitle("Effects of interventions (rows: target | intervention; points: subjects)")
        return save_figure(fig, path)
