"""The statistical decision behind `disconnect` / `connected` / `inconclusive`, for one family of effect rows.

One row is one effect (an intervention, a metric, maybe a latent step) with its estimate, its (1 - alpha)
interval, n, and for rates the count of events k. A family is the rows one verdict combines.

* **Equivalence (TOST-style).** A row is *equivalent* when its whole interval lies inside ``(-margin,
  margin)`` (for a rate, ``[0, margin)``): both one-sided tests "effect <= -margin" and "effect >= margin"
  are rejected, each at alpha/2 since the interval is two-sided (1 - alpha), which is more conservative
  than Schuirmann's 90% interval and lets the reader check every verdict on the interval shown.
  An interval that merely contains 0 shows nothing: a small, noisy run contains 0 too.
* **Intersection-union for `disconnect`.** "No row has an effect" is an intersection of nulls' negations:
  it holds only if EVERY row is equivalent. Each row's test at level alpha gives the joint claim level
  alpha (Berger 1982), so no multiplicity correction is needed, and none is applied; the price is that one
  wide row keeps the family from `disconnect`.
* **Holm for `connected`.** "Some row has an effect" is a union: testing many rows inflates false
  positives, so the rows' p-values for "effect = 0" are Holm-adjusted and the family is `connected` if any
  adjusted p < alpha. (`holm` is checked against ``statsmodels.stats.multitest.multipletests``, which it
  replaces because that function runs a full garbage collection per call: 0.7 s here, measured, which made
  calibration by simulation impractical.)
* If every row is equivalent, the family is `disconnect` even if some row is also nonzero (an effect shown
  to be smaller than the margin is negligible by definition); otherwise `connected` if Holm rejects,
  otherwise `inconclusive`.

Rows of rates (with k and n) get their exact Clopper-Pearson interval recomputed at the requested alpha;
other rows use the interval stored with them (paired bootstrap), rescaled on the normal scale when it was
made at another level than (1 - alpha) (its ``confidence`` column; 95% when the table has none). Planning numbers come with
every row: the n that would decide it (at ``power``) and the smallest effect the run could detect.
"""

from __future__ import annotations

import math
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

    @property
    def equivalent(self) -> bool:
        low_ok = self.ci_low > -self.margin
        # a mean of one instance has a zero-width bootstrap interval that shows nothing; a rate's exact interval
        # is wide at n = 1 by itself
        return bool(self.n >= (1 if self.is_rate else 2) and low_ok and self.ci_high < self.margin)

    @property
    def ruled_out_beyond(self) -> float:
        """The smallest margin at which this row would be equivalent: max(|ci_low|, |ci_high|)."""
        return float(max(abs(self.ci_low), abs(self.ci_high)))

    def text(self) -> str:
        count = f"{self.k}/{self.n}" if self.k is not None else f"n={self.n}"
        p = "" if math.isnan(self.p_holm) else f", Holm p={_fmt(self.p_holm)}"
        return f"{self.label} {_fmt(self.estimate)} [{_fmt(self.ci_low)}, {_fmt(self.ci_high)}] ({count}{p})"


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    value = float(value)
    if value != 0 and abs(value) < 0.001:
        return f"{value:.2g}"
    return f"{value:.3f}"


# ------------------------------------------------------------------------------------------------ one row

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


def rate_row(label: str, metric: str, k: int, n: int, margins: Margins) -> RowStats:
    """A row of k events in n instances: exact Clopper-Pearson interval at ``margins.alpha``; p-value for "the
    rate is 0" (1 when k = 0, else 0: one event is impossible under that null)."""
    low, high = clopper_pearson(k, n, margins.alpha) if n > 0 else (math.nan, math.nan)
    return RowStats(label=label, metric=metric, estimate=k / n if n else math.nan, ci_low=low, ci_high=high, n=n,
                    margin=margins.for_metric(metric), k=int(k), p_value=1.0 if k == 0 else 0.0, is_rate=True,
                    interval="clopper-pearson")


def mean_row(label: str, metric: str, estimate: float, ci_low: float, ci_high: float, n: int, p_value: float,
             margins: Margins, interval: str = "percentile bootstrap") -> RowStats:
    """A row of a mean with its stored interval and p-value (a normal approximation from the interval when the
    table has no p-value)."""
    if n < 2:  # one value tests nothing, whatever its stored p-value or interval
        p_value = math.nan
    elif p_value is None or math.isnan(p_value):
        p_value = _p_from_interval(estimate, ci_low, ci_high, margins.alpha)
    return RowStats(label=label, metric=metric, estimate=float(estimate), ci_low=float(ci_low), ci_high=float(ci_high),
                    n=int(n), margin=margins.for_metric(metric), p_value=float(p_value), interval=interval)


def row_stats(row: pd.Series, margins: Margins, label: str) -> RowStats:
    """A RowStats from one tidy effects row (see ``latentprobe.verdicts.tidy_effects``)."""
    metric = str(row.metric_base if "metric_base" in row else row.metric)
    n = int(row.n) if pd.notna(row.n) else 0
    k = row.get("k")
    if k is not None and pd.notna(k) and n > 0:  # a rate of events: exact interval at this alpha
        return rate_row(label, metric, int(round(float(k))), n, margins)
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
    return mean_row(label, metric, row.estimate, low, high, n,
                    float(p) if p is not None and pd.notna(p) else math.nan, margins, interval)


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
        stats.needed_n_effect = (math.ceil(math.log(1 - power) / math.log(1 - rate)) if 0 < rate < 1
                                 else (1 if rate >= 1 else math.inf))
        return
    from scipy.stats import norm
    from statsmodels.stats.power import TTestPower

    se = (stats.ci_high - stats.ci_low) / (2 * norm.ppf(1 - alpha / 2))
    sd = se * math.sqrt(n)
    if not sd > 0:  # every instance gave the same value: no spread to plan from
        return
    per_row_alpha = alpha / max(family_size, 1)  # Holm's first step: the bound to beat for the best row
    analysis = TTestPower()
    stats.detectable_effect = float(analysis.solve_power(nobs=max(n, 2), alpha=per_row_alpha, power=power,
                                                         alternative="two-sided")) * sd
    gap = margin - abs(stats.estimate)
    stats.needed_n_equivalence = (_ceil(analysis.solve_power(effect_size=gap / sd, alpha=alpha / 2, power=power,
                                                             alternative="larger")) if gap > 0 else math.inf)
    stats.needed_n_effect = (_ceil(analysis.solve_power(effect_size=abs(stats.estimate) / sd, alpha=per_row_alpha,
                                                        power=power, alternative="two-sided"))
                             if stats.estimate != 0 else math.inf)


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
    """`disconnect` if every row is equivalent (intersection-union); `connected` if some row's Holm-adjusted
    p < alpha; else `inconclusive`. Also the planning numbers of the family (skipped with ``plan=False``,
    e.g. in simulations, since power root-finding costs more than the decision)."""
    rows = [r for r in rows if r.n > 0 and not math.isnan(r.estimate)]
    if not rows:
        return FamilyDecision(INCONCLUSIVE_WORD, [], None, math.nan, math.nan, math.nan, "no row with data")
    p = np.array([1.0 if math.isnan(r.p_value) else r.p_value for r in rows])
    reject, adjusted = holm(p, margins.alpha)
    for r, rej, adj in zip(rows, reject, adjusted):
        if plan:
            _plan(r, margins, family_size=len(rows))
        r.p_holm = float(adj)
        r.decision = ROW_EQUIVALENT if r.equivalent else (ROW_EFFECT if rej else ROW_UNDECIDED)
    worst = max(rows, key=lambda r: r.ruled_out_beyond)
    ruled_out = worst.ruled_out_beyond
    detectable = max(r.detectable_effect for r in rows)
    if all(r.equivalent for r in rows):
        nonzero = [r for r in rows if r.p_holm < margins.alpha]
        note = (f"; {len(nonzero)} row(s) also differ from 0, by less than the margin" if nonzero else "")
        return FamilyDecision(DISCONNECT, rows, worst, detectable, math.nan, ruled_out,
                              f"all {len(rows)} row(s) inside the margin{note}")
    effects = [r for r in rows if r.decision == ROW_EFFECT]
    if effects:
        strongest = min(effects, key=lambda r: (r.p_holm, -abs(r.estimate)))
        return FamilyDecision(CONNECTED, rows, strongest, detectable, math.nan, ruled_out,
                              f"{len(effects)} of {len(rows)} row(s) differ from 0 after Holm")
    # Inconclusive: plan toward the decision the estimates point to.
    if all(abs(r.estimate) < r.margin for r in rows):
        needed = max(r.needed_n_equivalence for r in rows)  # every row must become equivalent
        aim = "disconnect"
    else:
        needed = min(r.needed_n_effect for r in rows if abs(r.estimate) >= r.margin)  # one row suffices
        aim = "connected"
    return FamilyDecision(INCONCLUSIVE_WORD, rows, worst, detectable, needed, ruled_out,
                          f"neither every row inside the margin nor any row different from 0 after Holm; "
                          f"the estimates point to {aim}")


def rows_frame(rows: list[RowStats], **columns) -> pd.DataFrame:
    """The family's rows as a table (one line per row, with its decision)."""
    records = []
    for r in rows:
        records.append({**columns, "row": r.label, "metric": r.metric, "estimate": r.estimate, "ci_low": r.ci_low,
                        "ci_high": r.ci_high, "n": r.n, "k": r.k, "interval": r.interval, "margin": r.margin,
                        "p_value": r.p_value, "p_holm": r.p_holm, "row_decision": r.decision,
                        "detectable_effect": r.detectable_effect, "needed_n_equivalence": r.needed_n_equivalence,
                        "needed_n_effect": r.needed_n_effect, **r.extra})
    return pd.DataFrame(records)
