"""Every number a verdict depends on, in one validated record (the paper publishes none of them).

A *margin* is the size of an effect below which we call it negligible: a `disconnect` needs the whole
confidence interval of every effect inside ``(-margin, margin)`` (for rates, below ``margin``). ``alpha`` is
the error rate of each interval and of the family-wise test behind `connected`; ``power`` is used only to
plan (the sample size that would decide, the smallest effect a run could detect).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from ..errors import LatentProbeError

# Which margin applies to which metric (metric names without their mediation prefix or @step suffix).
_RATE_METRICS = ("flip_rate", "answer_changed", "unparsable_rate_intervened")
_CORRECTNESS_METRICS = ("accuracy_change", "correct", "y")
_PROBABILITY_METRICS = ("gold_prob_change", "gold_prob")


@dataclass(frozen=True)
class Margins:
    """Equivalence margins and error rates of the verdicts; every default is explicit and adjustable.

    Parameters
    ----------
    answer_change : float
        Rate of changed answers (flip rate; TE/NDE/NIE on ``answer_changed``) that counts as negligible.
    correctness : float
        Change in accuracy (or NIE/NDE on correctness) that counts as negligible.
    gold_prob : float
        Change in the probability of the gold answer that counts as negligible.
    kl : float
        KL(clean || intervened) in nats that counts as negligible.
    latent_r2 : float
        Input -> latent (and -> text mediator): the placebo-corrected share of the latents' spread between
        instances that an edit moves (``stats.latent_effect.latent_r2``) that counts as negligible.
    relative_change : float
        Input -> latent where the latents have no spread beyond noise: the placebo-corrected squared change over
        the latents' squared size (for unit vectors 2 (1 - cos)) that counts as negligible.
    change_ratio : float
        The former input -> latent statistic (mean distance over inter-instance distance), kept so that tables
        written before issue 18 still map to a margin; no verdict decides on it.
    collapse : float
        Margin handed to the collapse verdict.
    visual_info : float
        Margin handed to the visual-information verdict.
    alpha : float
        Error rate: intervals are (1 - alpha) two-sided; `connected` controls the family-wise error at alpha
        (Holm).
    power : float
        Power used to plan: needed n and the smallest detectable effect.

    >>> Margins().for_metric("flip_rate"), Margins(answer_change=0.1).for_metric("NIE_answer_changed")
    (0.05, 0.1)
    """

    answer_change: float = 0.05
    correctness: float = 0.05
    gold_prob: float = 0.05
    kl: float = 0.05
    latent_r2: float = 0.2
    relative_change: float = 0.1
    change_ratio: float = 0.2
    collapse: float = 0.1
    visual_info: float = 0.1
    alpha: float = 0.05
    power: float = 0.8

    def __post_init__(self):
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise LatentProbeError(f"margin {item.name}={value!r} is not a finite number",
                                       f"give {item.name} a finite number (default {item.default})")
        for name in ("alpha", "power"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise LatentProbeError(f"{name}={value} is outside (0, 1)", f"e.g. {name}=" + ("0.05" if name == "alpha" else "0.8"))
        if self.alpha >= 0.5:
            raise LatentProbeError(f"alpha={self.alpha} would make every interval shorter than a coin flip's",
                                   "use a small error rate such as 0.05")
        for item in fields(self):
            if item.name in ("alpha", "power"):
                continue
            value = getattr(self, item.name)
            if value <= 0:
                raise LatentProbeError(f"margin {item.name}={value} must be > 0",
                                       "an equivalence margin is the positive size of a negligible effect")
            if item.name in ("answer_change", "correctness", "gold_prob", "visual_info") and value >= 1:
                raise LatentProbeError(f"margin {item.name}={value} is not below 1, the whole range of a rate "
                                       "(visual_info: of a selectivity, a difference of accuracies)",
                                       "use a margin such as 0.05")

    def for_metric(self, metric: str) -> float:
        """The margin that applies to a metric (``NIE_correct`` -> correctness, ``flip_rate`` -> answer_change)."""
        base = metric.split("@")[0]
        for prefix in ("TE_", "NDE_", "NIE_", "interaction_"):
            if base.startswith(prefix):
                base = base[len(prefix):]
                break
        if base in ("TE", "NDE", "NIE", "interaction"):
            base = "y"
        if base in _RATE_METRICS:
            return self.answer_change
        if base in _CORRECTNESS_METRICS:
            return self.correctness
        if base in _PROBABILITY_METRICS:
            return self.gold_prob
        if base.startswith("kl"):
            return self.kl
        if base == "change_ratio":
            return self.change_ratio
        if base in ("latent_r2", "mediator_r2"):
            return self.latent_r2
        if base in ("latent_relative_change", "mediator_relative_change"):
            return self.relative_change
        raise LatentProbeError(f"no margin is defined for metric {metric!r}",
                               "use a metric of latentprobe.stats.effects, or extend Margins.for_metric")

    def describe(self) -> str:
        return ", ".join(f"{item.name}={getattr(self, item.name):g}" for item in fields(self))
