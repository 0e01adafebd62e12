"""The verdict vocabulary and the record every verdict carries (rules live in sibling modules).

Each finding of the CapImagine paper gets one of four words per subject. A null ("disconnect", "collapsed",
"limited") is affirmed only on positive evidence: a confidence interval inside a stated margin. An interval
that merely contains zero is "inconclusive".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

FINDINGS = ("input_latent", "latent_answer", "collapse", "visual_info")
NOT_MEASURED = "not measured"
INCONCLUSIVE = "inconclusive"
# The words each finding may take, null word first.
VOCABULARY = {
    "input_latent": ("disconnect", "connected", INCONCLUSIVE, NOT_MEASURED),
    "latent_answer": ("disconnect", "connected", INCONCLUSIVE, NOT_MEASURED),
    "collapse": ("collapsed", "not collapsed", INCONCLUSIVE, NOT_MEASURED),
    "visual_info": ("limited", "informative", INCONCLUSIVE, NOT_MEASURED),
}


@dataclass
class Verdict:
    """One decision about one finding for one subject, with the evidence it was decided on."""

    subject: str
    finding: str
    verdict: str
    rule: str = ""  # the rule in one sentence, with its numbers
    margin: float | None = None  # equivalence margin (or threshold) the rule used
    estimate: float | None = None  # the deciding estimate
    ci_low: float | None = None
    ci_high: float | None = None
    n: int | None = None  # instances behind the deciding estimate
    detectable_effect: float | None = None  # smallest effect this run could have ruled in or out
    needed_n: int | None = None  # instances needed to decide (when inconclusive)
    method: str = ""  # interval method and multiplicity correction
    evidence: str = ""  # the deciding row(s) in words
    details: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.finding not in VOCABULARY:
            raise ValueError(f"unknown finding {self.finding!r}; expected one of {FINDINGS}")
        if self.verdict not in VOCABULARY[self.finding]:
            raise ValueError(f"verdict {self.verdict!r} is not a word for {self.finding!r}: {VOCABULARY[self.finding]}")

    def row(self) -> dict:
        row = asdict(self)
        row.pop("details")
        return row
