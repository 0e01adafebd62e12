"""The statistical decision behind `disconnect` / `connected` / `inconclusive`, for one family of effect rows.

One row is one effect (an intervention, a metric, maybe a latent step) with its estimate, its (1 - alpha)
interval, n, for rates the count of events k, and where a placebo run exists the placebo's value (the noise
floor: what the same code path gives when nothing is edited). A family is the rows one verdict combines.

* **Equivalence (`disconnect`).** A row is *equivalent* when its whole (1 - alpha) interval lies inside
  ``(-margin, margin)`` (for a rate, ``[0, margin)``): both one-sided tests "effect <= -margin" and "effect >=
  margin" are rejected, each at alpha/2. "No row has an effect" is an intersection: the family is `disconnect`
  only if EVERY row is equivalent (intersection-union, Berger 1982: no multiplicity correction is needed, and one
  wide row keeps the family from `disconnect`). An interval that merely contains 0 shows nothing.
* **Minimum effect (`connected`).** "The effect is larger than negligible": a row is an *effect* when its
  one-sided lower bound at level alpha / m (Bonferroni over the family's m rows) lies above the margin, i.e. the
  test of "effect <= margin" rejects. A test of "effect = 0" would call a true change rate of 0.01 (which the
  margin calls negligible) `connected` at large n, and a GPU's nondeterminism alone `connected` at any n.
  The family is `connected` if any row is an effect.
* **Placebo.** Where a row has a placebo (``placebo_k``/``placebo_n`` for rates, ``placebo`` for means), the
  tested effect is the row minus the placebo: for rates the lower bound combines the row's exact bound and the
  placebo's opposite exact bound, each at half the level (so the combined bound keeps the level), and the upper
  bound is the row's own (a placebo can only lower the effect), for means the
  placebo value is subtracted. Without a placebo the floor is 0, which holds for a deterministic run (CPU,
  float32) and is stated in the evidence.
* Between the two: `inconclusive`, with the planning numbers (the n that would decide). A row whose interval
  excludes 0 but that is not an effect is reported as "nonzero but below the margin".

Rates (k of n, k possibly a sum of per-instance fractions when an instance has several seeds; see
``latentprobe.stats.intervals.cluster_rate``) get exact Clopper-Pearson bounds recomputed at each level needed,
so both bounds grow with every changed answer (the evidence is monotone). Other rows use the interval stored with
them (BCa bootstrap), rescaled on the normal scale to another level where the decision needs one.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .margins import Margins

DISCONNECT, CONNECTED, INCONCLUSIVE_WORD = "disconnect", "connected", "inconclusive"
ROW_EQUIVALENT, ROW_EFFECT, ROW_UNDECIDED = "equivalent", "effect", "undecided"
_MAX_N = 10_000_000
# Level of a stored (bootstrap) interval when its table has no ``confidence`` column: the effects tables'
# default (``effects.summarize`` / ``latent_change_metrics`` with alpha 0.05).
STORED_CONFIDENCE = 0.95


@dataclass
class RowStats:
    """One effect row as the decision sees it."""

    label: str
    metric: str
    estimate: float
    ci_low: float
    ci_high: float
    n: int
    margin: float
    k: int | None = None  # events, for rates
    p_value: float = float("nan")  # two-sided, for "the effect is 0"
    is_rate: bool = False
    interval: str = ""
    p_holm: float = float("nan")
    decision: str = ROW_UNDECIDED
    detectable_effect: float = float("nan")
    needed_n_equivalence: float = float("nan")
    needed_n_effect: float = float("nan")
    extra: dict = field(default_factory=dict)
    placebo: float = 0.0  # the noise floor's estimate (0 when no placebo was run)
    placebo_k: float | None = None  # for rates: the placebo's events and instances
    placebo_n: int | None = None
    has_placebo: bool = False
    alpha: float = 0.05  # level of ci_low/ci_high (two-sided 1 - alpha)
    connect_bound: float = float("nan")  # the one-sided lower bound `connected` was tested on

    def lower_bound(self, one_sided_alpha: float) -> float:
        """The one-sided lower bound of the placebo-corrected effect at level 1 - one_sided_alpha."""
        if self.is_rate:
            if self.placebo_n:  # each bound at half the level: P(either misses) <= one_sided_alpha
                return (_rate_bound(self.k, self.n, one_sided_alpha / 2, "low")
                        - _rate_bound(self.placebo_k, self.placebo_n, one_sided_alpha / 2, "high"))
            return _rate_bound(self.k, self.n, one_sided_alpha, "low")
        # a mean row's estimate and interval are already placebo-corrected (mean_row)
        return _rescaled_low(self.estimate, self.ci_low, self.alpha, one_sided_alpha)

    def effect_bound(self, one_sided_alpha: float) -> float:
        """How far from 0 the effect is shown to be at level 1 - one_sided_alpha: the lower bound for a rate; for
        a signed mean the larger of the lower bound and minus the upper bound (an effect either way counts)."""
        if self.is_rate:
            return self.lower_bound(one_sided_alpha)
        high = _rescaled_low(-self.estimate, -self.ci_high, self.alpha, one_sided_alpha)
        return max(self.lower_bound(one_sided_alpha), high)

    @property
    def nonzero(self) -> bool:
        """The (1 - alpha) interval excludes 0."""
        return bool(self.ci_low > 0 or self.ci_high < 0)

    @property
    def equivalent(self) -> bool:
        # A rate row counts changed answers: a corrected rate below 0 means fewer changes than the placebo's noise,
        # never a connection, so only its upper end has to sit inside the margin. A mean can move either way.
        low_ok = self.is_rate or self.ci_low > -self.margin
        # a mean of one instance has a zero-width bootstrap interval that shows nothing; a rate's exact interval
        # is wide at n = 1 by itself
        return bool(self.n >= (1 if self.is_rate else 2) and low_ok and self.ci_high < self.margin)

    @property
    def ruled_out_beyond(self) -> float:
        """The smallest margin at which this row would be equivalent: max(|ci_low|, |ci_high|)."""
        return float(max(abs(self.ci_low), abs(self.ci_high)))

    def text(self) -> str:
        count = f"{_fmt_count(self.k)}/{self.n}" if self.k is not None else f"n={self.n}"
        floor = (f", placebo {_fmt(self.placebo)} subtracted" if self.has_placebo else ", no placebo: floor 0")
        return f"{self.label} {_fmt(self.estimate)} [{_fmt(self.ci_low)}, {_fmt(self.ci_high)}] ({count}{floor})"


def _fmt_count(k) -> str:
    return str(int(k)) if float(k) == int(k) else f"{float(k):.2f}"


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    value = float(value)
    if value != 0 and abs(value) < 0.001:
        return f"{value:.2g}"
    return f"{value:.3f}"


# ------------------------------------------------------------------------------------------------ one row

def _rate_bound(k, n, one_sided_alpha: float, side: str) -> float:
    from ..stats.intervals import rate_bound

    return rate_bound(k, n, one_sided_alpha, side)


def _rescaled_low(estimate: float, ci_low: float, alpha: float, one_sided_alpha: float) -> float:
    """The lower end of a stored two-sided (1 - alpha) interval moved to a one-sided (1 - one_sided_alpha) bound
    on the normal scale (the stored interval's own asymmetry kept)."""
    from scipy.stats import norm

    if not (math.isfinite(estimate) and math.isfinite(ci_low)):
        return math.nan
    scale = norm.ppf(1 - one_sided_alpha) / norm.ppf(1 - alpha / 2)
    return estimate - (estimate - ci_low) * scale


def clopper_pearson(k: int, n: int, alpha: float) -> tuple[float, float]:
    """Exact two-sided (1 - alpha) interval of a binomial rate, from the beta quantiles that define it
    (equal to ``scipy.stats.binomtest(k, n).proportion_ci(method="exact")``, checked in the tests, and about
    a hundred times faster, which the calibration simulations need).

    >>> [round(v, 3) for v in clopper_pearson(0, 20, 0.05)]
    [0.0, 0.168]
    """
    from scipy.stats import beta

    k, n = int(k), int(n)
    low = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


def _p_from_interval(estimate: float, low: float, high: float, alpha: float) -> float:
    """A normal-approximation p-value for "the effect is 0" from an interval, for tables stored without one."""
    from scipy.stats import norm

    se = (high - low) / (2 * norm.ppf(1 - alpha / 2))
    if not math.isfinite(se) or not math.isfinite(estimate):  # no interval (e.g. too few instances): no evidence
        return math.nan
    if not se > 0:
        return 1.0 if estimate == 0 else 0.0
    return float(2 * norm.sf(abs(estimate) / se))


def rate_row(label: str, metric: str, k: float, n: int, margins: Margins, placebo_k: float | None = None,
             placebo_n: int | None = None) -> RowStats:
    """A row of k events in n instances (k may be a sum of per-instance fractions): exact Clopper-Pearson interval
    at ``margins.alpha`` of the rate minus the placebo's rate (the low end combines the row's and the placebo's
    opposite exact bounds at half the level; the high end is the row's own bound, which the placebo can only
    lower); p-value for "the rate is 0" (1 when k = 0, else 0).

    >>> row = rate_row("patch", "flip_rate", 0, 80, Margins(), placebo_k=0, placebo_n=80)
    >>> round(row.ci_high, 4), row.ci_high < 0.05
    (0.0451, True)
    """
    from ..stats.intervals import fractional_clopper_pearson

    alpha = margins.alpha
    placebo_rate = placebo_k / placebo_n if placebo_n else 0.0
    if n <= 0:
        low = high = math.nan
    elif placebo_n:
        # Lower end: the row's low bound minus the placebo's high bound, each at half the level. Upper end: the
        # row's own exact bound. A placebo rate is >= 0, so subtracting it can only lower the effect: the row's
        # bound already bounds the corrected effect, and a placebo of 0 events (a deterministic CPU run) then
        # costs the equivalence test nothing (0 of 80 changed stays below 0.05, as without a placebo).
        row_low, _ = fractional_clopper_pearson(k, n, alpha / 2)
        _, floor_high = fractional_clopper_pearson(placebo_k, placebo_n, alpha / 2)
        low = row_low - floor_high
        high = fractional_clopper_pearson(k, n, alpha)[1]
    else:
        low, high = fractional_clopper_pearson(k, n, alpha)
    whole = float(k) == int(k)
    return RowStats(label=label, metric=metric, estimate=(k / n - placebo_rate) if n else math.nan, ci_low=low,
                    ci_high=high, n=n, margin=margins.for_metric(metric), k=int(k) if whole else float(k),
                    p_value=1.0 if k == 0 else 0.0, is_rate=True,
                    interval="clopper-pearson" + ("" if whole else " (instances as units)")
                    + (" minus placebo" if placebo_n else ""),
                    placebo=placebo_rate, placebo_k=placebo_k, placebo_n=placebo_n, has_placebo=bool(placebo_n),
                    alpha=alpha)


def mean_row(label: str, metric: str, estimate: float, ci_low: float, ci_high: float, n: int, p_value: float,
             margins: Margins, interval: str = "BCa bootstrap", placebo: float | None = None) -> RowStats:
    """A row of a mean with its stored interval and p-value (a normal approximation from the interval when the
    table has no p-value), minus the placebo's mean where one is given."""
    if n < 2:  # one value tests nothing, whatever its stored p-value or interval
        p_value = math.nan
    elif p_value is None or math.isnan(p_value):
        p_value = _p_from_interval(estimate, ci_low, ci_high, margins.alpha)
    floor = 0.0 if placebo is None or not math.isfinite(placebo) else float(placebo)
    return RowStats(label=label, metric=metric, estimate=float(estimate) - floor, ci_low=float(ci_low) - floor,
                    ci_high=float(ci_high) - floor, n=int(n), margin=margins.for_metric(metric), p_value=float(p_value),
                    interval=interval + (" minus placebo" if placebo is not None else ""), placebo=floor,
                    has_placebo=placebo is not None, alpha=margins.alpha)


def row_stats(row: pd.Series, margins: Margins, label: str, placebo: pd.Series | None = None) -> RowStats:
    """A RowStats from one tidy effects row (see ``latentprobe.verdicts.tidy_effects``), minus its placebo row
    (the same metric of the placebo edit) when one is given."""
    metric = str(row.metric_base if "metric_base" in row else row.metric)
    n = int(row.n) if pd.notna(row.n) else 0
    k = row.get("k")
    if k is not None and pd.notna(k) and n > 0:  # a rate of events: exact interval at this alpha
        placebo_k = placebo_n = None
        if placebo is not None and pd.notna(placebo.get("k")) and pd.notna(placebo.n) and int(placebo.n) > 0:
            placebo_k, placebo_n = float(placebo.k), int(placebo.n)
        return rate_row(label, metric, float(k), n, margins, placebo_k, placebo_n)
    p = row.get("p_value")
    interval = str(row.get("interval") or "") or "as stored (no method recorded)"
    low, high = float(row.ci_low), float(row.ci_high)
    stored = row.get("confidence")
    stored = STORED_CONFIDENCE if stored is None or pd.isna(stored) else float(stored)
    wanted = 1 - margins.alpha
    if abs(stored - wanted) > 1e-9:  # an interval at another level than the verdict's alpha: rescale it
        from scipy.stats import norm

        scale = norm.ppf(1 - margins.alpha / 2) / norm.ppf(1 - (1 - stored) / 2)
        estimate = float(row.estimate)
        low, high = estimate - (estimate - low) * scale, estimate + (high - estimate) * scale
        interval += f", {stored:.0%} interval rescaled to {wanted:.0%} (normal)"
    floor = float(placebo.estimate) if placebo is not None and pd.notna(placebo.estimate) else None
    return mean_row(label, metric, row.estimate, low, high, n,
                    float(p) if p is not None and pd.notna(p) else math.nan, margins, interval, placebo=floor)


def _plan(stats: RowStats, margins: Margins, family_size: int = 1) -> None:
    """Fill the row's planning numbers: smallest detectable effect and the n that would decide it."""
    alpha, power, n, margin = margins.alpha, margins.power, stats.n, stats.margin
    if n <= 0:
        return
    if stats.is_rate:
        # With rate p, P(at least one event in n) >= power needs p >= 1 - (1 - power)^(1/n): below that, a run
        # of n most likely sees no event at all, and no effect can be claimed.
        stats.detectable_effect = 1 - (1 - power) ** (1 / n)
        rate = stats.k / n
        stats.needed_n_equivalence = needed_n_rate_equivalence(rate, margin, alpha, power)
        # the n at which the one-sided exact lower bound clears the margin with probability ~power (normal
        # approximation of the binomial)
        from scipy.stats import norm as _norm

        gap = rate - margin
        stats.needed_n_effect = (math.ceil(((_norm.ppf(1 - alpha / max(family_size, 1)) + _norm.ppf(power)) ** 2)
                                           * rate * (1 - rate) / gap ** 2) if gap > 0 and rate < 1
                                 else (1 if rate >= 1 else math.inf))
        return
    from scipy.stats import norm
    from statsmodels.stats.power import TTestPower
    from statsmodels.tools.sm_exceptions import ConvergenceWarning

    se = (stats.ci_high - stats.ci_low) / (2 * norm.ppf(1 - alpha / 2))
    sd = se * math.sqrt(n)
    if not sd > 0:  # every instance gave the same value: no spread to plan from
        return
    per_row_alpha = alpha / max(family_size, 1)  # Holm's first step: the bound to beat for the best row
    analysis = TTestPower()
    gap = margin - abs(stats.estimate)
    beyond = abs(stats.estimate) - margin  # the minimum-effect test needs the estimate past the margin
    with warnings.catch_warnings():
        # statsmodels warns when its root search fails and returns NaN, which the planning columns then hold (an
        # effect too small to plan for): a user's log gets the NaN in its table, not a solver message
        warnings.simplefilter("ignore", ConvergenceWarning)
        stats.detectable_effect = float(analysis.solve_power(nobs=max(n, 2), alpha=per_row_alpha, power=power,
                                                             alternative="two-sided")) * sd
        stats.needed_n_equivalence = (_ceil(analysis.solve_power(effect_size=gap / sd, alpha=alpha / 2,
                                                                 power=power, alternative="larger"))
                                      if gap > 0 else math.inf)
        stats.needed_n_effect = (_ceil(analysis.solve_power(effect_size=beyond / sd, alpha=per_row_alpha,
                                                            power=power, alternative="larger"))
                                 if beyond > 0 else math.inf)


def _ceil(value) -> float:
    try:
        value = float(np.asarray(value).reshape(-1)[0])
    except (TypeError, ValueError):
        return math.inf
    return float(math.ceil(value)) if math.isfinite(value) else math.inf


def needed_n_rate_equivalence(rate: float, margin: float, alpha: float, power: float) -> float:
    """Smallest n at which a run whose true rate is ``rate`` shows ``rate < margin`` with probability >= power:
    the exact Clopper-Pearson (1 - alpha) upper bound must fall below the margin (exact binomial computation).

    >>> needed_n_rate_equivalence(0.0, 0.05, 0.05, 0.8)  # 0 events: the upper bound 1 - (alpha/2)^(1/n) < 0.05
    72
    """
    from scipy.stats import beta, binom

    if rate >= margin:
        return math.inf
    if rate <= 0:
        return math.ceil(math.log(alpha / 2) / math.log(1 - margin) + 1e-12)

    def chance(n: int) -> float:
        # largest k whose upper bound is below the margin, then P(K <= that k) under the true rate
        ks = np.arange(0, n + 1)
        upper = np.where(ks < n, beta.ppf(1 - alpha / 2, ks + 1, n - ks), 1.0)
        ok = ks[upper < margin]
        return 0.0 if len(ok) == 0 else float(binom.cdf(ok.max(), n, rate))

    n = 8
    while chance(n) < power:
        n *= 2
        if n > _MAX_N:
            return math.inf
    low, high = n // 2, n
    while high - low > 1:  # power is nearly monotone in n (binomial sawtooth aside): bisect
        middle = (low + high) // 2
        if chance(middle) >= power:
            high = middle
        else:
            low = middle
    return high


# ------------------------------------------------------------------------------------------------ a family

@dataclass
class FamilyDecision:
    verdict: str
    rows: list[RowStats]
    deciding: RowStats | None
    detectable_effect: float
    needed_n: float
    ruled_out_beyond: float
    reason: str


def holm(p_values, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Holm's step-down adjustment: (reject, adjusted p-values), as ``multipletests(p, alpha, "holm")[:2]``.

    >>> reject, adjusted = holm([0.01, 0.04, 0.5], 0.05)
    >>> reject.tolist(), adjusted.round(3).tolist()
    ([True, False, False], [0.03, 0.08, 0.5])
    """
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p, kind="stable")
    m = len(p)
    stepped = np.maximum.accumulate((m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted < alpha, adjusted


def decide_family(rows: list[RowStats], margins: Margins, *, plan: bool = True) -> FamilyDecision:
    """`disconnect` if every row is equivalent (intersection-union); `connected` if some row's one-sided lower
    bound at alpha / m (Bonferroni over the m rows) is above the margin (minimum effect); else `inconclusive`.
    Also the planning numbers of the family (skipped with ``plan=False``, e.g. in simulations, since power
    root-finding costs more than the decision). Holm-adjusted p-values for "the effect is 0" are kept as a
    column (they tell "nonzero but below the margin" apart), never deciding."""
    rows = [r for r in rows if r.n > 0 and not math.isnan(r.estimate)]
    if not rows:
        return FamilyDecision(INCONCLUSIVE_WORD, [], None, math.nan, math.nan, math.nan, "no row with data")
    m = len(rows)
    p = np.array([1.0 if math.isnan(r.p_value) else r.p_value for r in rows])
    _, adjusted = holm(p, margins.alpha)
    for r, adj in zip(rows, adjusted):
        if plan:
            _plan(r, margins, family_size=m)
        r.p_holm = float(adj)
        r.connect_bound = r.effect_bound(margins.alpha / m) if r.n >= (1 if r.is_rate else 2) else math.nan
        is_effect = bool(r.connect_bound > r.margin)
        r.decision = ROW_EQUIVALENT if r.equivalent else (ROW_EFFECT if is_effect else ROW_UNDECIDED)
    worst = max(rows, key=lambda r: r.ruled_out_beyond)
    ruled_out = worst.ruled_out_beyond
    detectable = max(r.detectable_effect for r in rows)
    below = [r for r in rows if r.decision != ROW_EFFECT and r.nonzero]
    note = f"; {len(below)} row(s) nonzero but below the margin" if below else ""
    if all(r.equivalent for r in rows):
        return FamilyDecision(DISCONNECT, rows, worst, detectable, math.nan, ruled_out,
                              f"all {m} row(s) inside the margin{note}")
    effects = [r for r in rows if r.decision == ROW_EFFECT]
    if effects:
        strongest = max(effects, key=lambda r: r.connect_bound)
        return FamilyDecision(CONNECTED, rows, strongest, detectable, math.nan, ruled_out,
                              f"{len(effects)} of {m} row(s) larger than the margin (one-sided bound at "
                              f"{margins.alpha:g}/{m}){note}")
    # Inconclusive: plan toward the decision the estimates point to.
    if all(abs(r.estimate) < r.margin for r in rows):
        needed = max(r.needed_n_equivalence for r in rows)  # every row must become equivalent
        aim = "disconnect"
    else:
        needed = min(r.needed_n_effect for r in rows if abs(r.estimate) >= r.margin)  # one row suffices
        aim = "connected"
    return FamilyDecision(INCONCLUSIVE_WORD, rows, worst, detectable, needed, ruled_out,
                          f"neither every row inside the margin nor any row beyond it{note}; the estimates point "
                          f"to {aim}")


def rows_frame(rows: list[RowStats], **columns) -> pd.DataFrame:
    """The family's rows as a table (one line per row, with its decision)."""
    records = []
    for r in rows:
        records.append({**columns, "row": r.label, "metric": r.metric, "estimate": r.estimate, "ci_low": r.ci_low,
                        "ci_high": r.ci_high, "n": r.n, "k": r.k, "interval": r.interval, "margin": r.margin,
                        "p_value": r.p_value, "p_holm": r.p_holm, "row_decision": r.decision,
                        "placebo": r.placebo if r.has_placebo else math.nan, "connect_bound": r.connect_bound,
                        "detectable_effect": r.detectable_effect, "needed_n_equivalence": r.needed_n_equivalence,
                        "needed_n_effect": r.needed_n_effect, **r.extra})
    return pd.DataFrame(records)
