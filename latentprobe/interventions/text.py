"""Text interventions: edits of a text mediator span (the imagination a CapImagine-style subject writes)."""

from __future__ import annotations

import random
import re
from abc import abstractmethod

from ..errors import LatentProbeError
from .base import Intervention, _seed_for, checked_scale, register_intervention

class TextIntervention(Intervention):
    """Edits a text mediator span (the imagination a CapImagine-style subject writes before answering).
    Implement `rewrite`; override `not_applied_reason` when some spans cannot be edited."""

    target = "text"

    def __init__(self, seed: int = 0):
        self.seed = seed

    @abstractmethod
    def rewrite(self, span: str, instance_id: str, donor_span: str | None = None) -> str:
        """The new mediator text for one instance."""

    def not_applied_reason(self, span: str | None, donor_span: str | None = None) -> str | None:
        """Why the span cannot be edited (None: it can). ``span`` is None when the clean output has no mediator
        span (its open marker was not found)."""
        if span is None:
            return "the clean output has no mediator span (its open marker was not found)"
        if self.needs_donor and donor_span is None:
            return "the donor's clean output has no mediator span (it failed or wrote no marker)"
        return None


@register_intervention("text-placebo")
class TextPlacebo(TextIntervention):
    """The noise floor of text edits: the row's own imagination forced back after the prompt, through the same
    forced-span decode as every rewritten span (the clean run generated it token by token)."""

    kind = "text-placebo"
    role = "placebo"

    def rewrite(self, span, instance_id, donor_span=None):
        return span


@register_intervention("text-swap")
class TextSwap(TextIntervention):
    kind = "text-swap"
    needs_donor = True

    def rewrite(self, span, instance_id, donor_span=None):
        return donor_span or ""


@register_intervention("text-truncate")
class TextTruncate(TextIntervention):
    """Keep the first ``fraction`` of the span's words."""

    kind = "text-truncate"

    # one per --scale, read as the fraction of words to keep (default 0.5)
    scale_param, scale_default = "fraction", 0.5

    def __init__(self, fraction: float = 0.5, seed: int = 0):
        super().__init__(seed)
        self.fraction = checked_scale("text-truncate fraction", fraction, 0.0, 1.0, "e.g. --scale 0.5")

    def params(self):
        return {"keep": self.fraction}

    def rewrite(self, span, instance_id, donor_span=None):
        words = span.split()
        return " ".join(words[: int(round(len(words) * self.fraction))])


@register_intervention("text-shuffle")
class TextShuffle(TextIntervention):
    """Shuffle the span's clauses (split on sentence ends and commas), seeded per instance."""

    kind = "text-shuffle"

    @staticmethod
    def clauses(span: str) -> list[str]:
        return [p.strip() for p in re.split(r"(?<=[.;,!?])\s+", span.strip()) if p.strip()]

    def not_applied_reason(self, span, donor_span=None):
        reason = super().not_applied_reason(span, donor_span)
        if reason is None and len(self.clauses(span)) < 2:
            return "the mediator span has fewer than two clauses: there is no other order"
        return reason

    def rewrite(self, span, instance_id, donor_span=None):
        parts = self.clauses(span)
        parts = [p.rstrip(".;,") for p in parts]
        rng = random.Random(_seed_for(self.seed, instance_id, "text-shuffle"))
        original = list(parts)
        for _ in range(20):
            rng.shuffle(parts)
            if len(parts) < 2 or parts != original:
                break
        return ", ".join(parts)
