"""The contribution table: what a subject's latent phase contributes, from the component controls' rows.

For each subject, one row per condition and metric (`CONTRIBUTION_COLUMNS`):

* conditions: ``full`` (the clean run), ``no-latent``, ``markers-only``, ``dummy``, ``oracle``, ``oracle-other``
  (whichever were run; `latentprobe.interventions.controls`);
* ``accuracy`` with its exact Clopper-Pearson interval; ``answer_change`` (the answer differs from the clean one)
  with its exact interval; ``accuracy_change`` (condition minus full, paired by instance) with a paired bootstrap
  interval; for ``oracle-other``, ``moved_to_target``: the answer became the donor's gold answer (the target the
  oracle latents encode), exact interval, over the instances whose own gold answer differs from the donor's,
  beside its chance level 1 / number of options;
* ``gain_over_no_latent``: accuracy(full) - accuracy(no-latent), paired bootstrap interval;
* ``markers_share``: the share of that gain that markers alone preserve,
  (accuracy(markers-only) - accuracy(no-latent)) / (accuracy(full) - accuracy(no-latent)), on the instances all
  three ran on, with a paired bootstrap interval (replicates without a gain are left out and counted in
  ``note``). It is left undefined (NaN, with the reason) when the gain's interval does not lie above 0: there is
  then no gain to share. arXiv 2606.01287 reports 78-100% on real LVR models.

Only applied rows enter (an oracle source without a target for an instance makes that row not applied); the
``applied`` column gives each condition's applied share. ``role`` says whether a condition is an information edit,
disruption, or the own-target reference (`latentprobe.verdicts.causal.edit_role`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import LatentProbeError
from .effects import answer_flipped, applied_mask, check_bootstrap, exact_rate, paired_bootstrap

CONTRIBUTION_COLUMNS = ["subject", "condition", "intervention", "role", "metric", "estimate", "ci_low", "ci_high",
                        "n", "k", "chance", "applied", "interval", "note"]
CONDITIONS = ("full", "no-latent", "markers-only", "dummy", "oracle", "oracle-other")
ROLES = {"full": "clean", "no-latent": "disruption", "markers-only": "disruption", "dummy": "disruption",
         "oracle": "reference", "oracle-other": "information"}


def _kind(name: str) -> str:
    return str(name).split("(")[0]


def _row(subject, condition, intervention, metric, estimate, low, high, n, k=np.nan, chance=np.nan, applied=np.nan,
         interval="exact", note="") -> dict:
    return dict(subject=subject, condition=condition, intervention=intervention, role=ROLES.get(condition, ""),
                metric=metric, estimate=float(estimate), ci_low=float(low), ci_high=float(high), n=int(n),
                k=float(k), chance=float(chance), applied=float(applied), interval=interval, note=note)


def _as_bool(series: pd.Series) -> np.ndarray:
    return series.map(lambda v: str(v).lower() in ("true", "1", "1.0")).to_numpy(dtype=float)


def contribution_table(rows: pd.DataFrame, *, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> pd.DataFrame:
    """The contribution table (`CONTRIBUTION_COLUMNS`) from ``effects_rows`` of an intervene run with controls.

    ``rows`` needs ``subject, intervention, instance_id, clean_correct, intervened_correct, clean_parsed,
    intervened_parsed`` (and ``applied``; ``oracle_target_answer`` for ``moved_to_target``)."""
    check_bootstrap(n_boot, alpha)
    needed = ["subject", "intervention", "instance_id", "clean_correct", "intervened_correct", "clean_parsed",
              "intervened_parsed"]
    missing = [c for c in needed if c not in rows.columns]
    if missing:
        raise LatentProbeError(f"the contribution table needs effects rows with {', '.join(missing)}",
                               "pass effects_rows.parquet of an intervene run")
    out: list[dict] = []
    for subject, group in rows.groupby("subject", sort=True):
        group = group.assign(kind=group.intervention.map(_kind))
        clean = group.drop_duplicates("instance_id").set_index("instance_id")
        full = pd.Series(_as_bool(clean.clean_correct), index=clean.index)
        rate = exact_rate(full.to_numpy(), alpha)
        out.append(_row(subject, "full", "clean", "accuracy", rate["estimate"], rate["ci_low"], rate["ci_high"],
                        rate["n"], rate["k"], applied=1.0))
        by_condition: dict[str, pd.Series] = {"full": full}
        for name, runs in group[group.kind.isin(CONDITIONS)].groupby("intervention", sort=True):
            condition = _kind(name)
            applied = applied_mask(runs)
            share_applied = float(applied.mean()) if len(runs) else np.nan
            runs = runs[applied].drop_duplicates("instance_id").set_index("instance_id")
            if runs.empty:
                out.append(_row(subject, condition, name, "accuracy", np.nan, np.nan, np.nan, 0, applied=share_applied,
                                note="no applied row"))
                continue
            correct = pd.Series(_as_bool(runs.intervened_correct), index=runs.index)
            by_condition.setdefault(condition, correct)
            rate = exact_rate(correct.to_numpy(), alpha)
            out.append(_row(subject, condition, name, "accuracy", rate["estimate"], rate["ci_low"], rate["ci_high"],
                            rate["n"], rate["k"], applied=share_applied))
            changed = np.array([float(answer_flipped(a, b)) for a, b in zip(runs.clean_parsed, runs.intervened_parsed)])
            rate = exact_rate(changed, alpha)
            out.append(_row(subject, condition, name, "answer_change", rate["estimate"], rate["ci_low"],
                            rate["ci_high"], rate["n"], rate["k"], applied=share_applied))
            pairs = np.column_stack([full.reindex(runs.index).to_numpy(), correct.to_numpy()])
            est, low, high = paired_bootstrap(pairs, _difference, n_boot=n_boot, seed=seed, alpha=alpha)
            out.append(_row(subject, condition, name, "accuracy_change", est, low, high, len(pairs),
                            applied=share_applied, interval="paired bootstrap"))
            if condition == "oracle-other" and "oracle_target_answer" in runs.columns:
                target = runs.oracle_target_answer
                known = target.notna()
                if "oracle_own_answer" in runs.columns:  # a donor with the same answer shows no move: left out
                    known &= target.astype(str) != runs.oracle_own_answer.astype(str)
                moved = np.array([float(str(a) == str(t)) for a, t in zip(runs.intervened_parsed[known], target[known])])
                options = runs.n_options[known].astype(float) if "n_options" in runs.columns else pd.Series(dtype=float)
                chance = float(np.mean(1.0 / options[options > 0])) if (options > 0).any() else np.nan
                rate = exact_rate(moved, alpha)
                out.append(_row(subject, condition, name, "moved_to_target", rate["estimate"], rate["ci_low"],
                                rate["ci_high"], rate["n"], rate["k"], chance=chance, applied=share_applied,
                                note="the answer became the donor's gold answer, which its oracle latents encode (instances whose "
                                     "own gold answer differs from the donor's)"))
        out += _share_rows(subject, by_condition, n_boot, seed, alpha)
    return pd.DataFrame(out, columns=CONTRIBUTION_COLUMNS)


def _difference(pairs: np.ndarray) -> float:
    return float(np.mean(pairs[:, 1] - pairs[:, 0]))


def _share_rows(subject, by_condition: dict[str, pd.Series], n_boot, seed, alpha) -> list[dict]:
    if "no-latent" not in by_condition:
        return []
    full, none = by_condition["full"], by_condition["no-latent"]
    common = none.index.intersection(full.index)
    pairs = np.column_stack([none.reindex(common).to_numpy(), full.reindex(common).to_numpy()])
    gain, low, high = paired_bootstrap(pairs, _difference, n_boot=n_boot, seed=seed, alpha=alpha)
    out = [_row(subject, "full", "clean", "gain_over_no_latent", gain, low, high, len(pairs),
                interval="paired bootstrap", note="accuracy(full) - accuracy(no-latent)")]
    if "markers-only" not in by_condition:
        return out
    markers = by_condition["markers-only"]
    common = common.intersection(markers.index)
    values = np.column_stack([full.reindex(common), none.reindex(common), markers.reindex(common)]).astype(float)
    if not (low > 0):
        out.append(_row(subject, "markers-only", "", "markers_share", np.nan, np.nan, np.nan, len(values),
                        interval="paired bootstrap",
                        note=f"undefined: the latent phase's gain over no-latent is not above 0 "
                             f"({gain:+.3f} [{low:+.3f}, {high:+.3f}])"))
        return out
    estimate, ci_low, ci_high, undefined = share_with_interval(values, n_boot, seed, alpha)
    out.append(_row(subject, "markers-only", "", "markers_share", estimate, ci_low, ci_high, len(values),
                    interval="paired bootstrap",
                    note=f"(markers-only - no-latent) / (full - no-latent); {undefined} of {n_boot} resamples "
                         "had no gain and were left out"))
    return out


def markers_share(values: np.ndarray) -> float:
    """(markers - none) / (full - none) of the column means of an (instances, 3) array [full, none, markers];
    NaN when full and none have equal means."""
    full, none, markers = np.asarray(values, dtype=float).mean(axis=0)
    return float((markers - none) / (full - none)) if full != none else float("nan")


def share_with_interval(values: np.ndarray, n_boot: int, seed: int, alpha: float) -> tuple[float, float, float, int]:
    """`markers_share` with a percentile interval over instance resamples; returns (estimate, low, high, number of
    resamples without a gain, which are left out)."""
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(values), size=(n_boot, len(values)))
    means = values[index].mean(axis=1)  # (n_boot, 3)
    gain = means[:, 0] - means[:, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        shares = (means[:, 2] - means[:, 1]) / gain
    usable = shares[gain != 0]
    if len(usable) == 0:
        return markers_share(values), float("nan"), float("nan"), n_boot
    low, high = np.quantile(usable, [alpha / 2, 1 - alpha / 2])
    return markers_share(values), float(low), float(high), int(n_boot - len(usable))
