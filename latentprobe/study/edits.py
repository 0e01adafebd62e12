"""The interventions a study runs on one subject, built by kind name through the intervention registry.

A kind joins the study for every target whose registry table has it and that the subject has: latent edits need
a latent protocol, text edits a text mediator, input edits any subject. Kinds the registry lacks are skipped
with their reason when they are optional (the placebo, the 2026 controls: present once their code is merged),
and refused before any model runs when the study file asks for them as edits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import LatentProbeError
from ..interventions.base import KINDS_BY_TARGET
from ..interventions.factory import make_interventions
from .config import StudyConfig


@dataclass
class StudyEdits:
    """The interventions for one subject and the kinds left out, each with why."""

    interventions: list = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (kind, reason)

    def names(self) -> list[str]:
        return [iv.name for iv in self.interventions]


def targets_of(kind: str) -> list[str]:
    """The targets whose registry table holds ``kind`` (a placebo may be registered for several)."""
    return [target for target, table in KINDS_BY_TARGET.items() if kind in table]


def subject_targets(subject) -> set[str]:
    """What this subject can be edited at."""
    targets = {"input"}
    if subject.protocol is not None:
        targets.add("latent")
    if subject.mediator == "text":
        targets.add("text")
    return targets


def check_kinds_registered(config: StudyConfig) -> None:
    """Refuse an information or disruption kind that no registry table knows (before any model runs)."""
    for role in ("information", "disruption"):
        for kind in getattr(config, role):
            if not targets_of(kind):
                known = sorted({k for table in KINDS_BY_TARGET.values() for k in table})
                raise LatentProbeError(f"the study file's {role} edit {kind!r} is not a registered intervention kind",
                                       f"choose from {', '.join(known)}")


def study_edits(subject, config: StudyConfig) -> StudyEdits:
    """Every intervention the study runs on ``subject``: latent edits first (they share one decode per batch),
    then input edits (each with its mediation runs), then text edits; kinds a subject has no target for, or this
    version has not registered, are listed in ``skipped``."""
    check_kinds_registered(config)
    usable = subject_targets(subject)
    chosen: dict[str, list[str]] = {"latent": [], "input": [], "text": [], "attention": []}
    skipped: list[tuple[str, str]] = []
    optional = [*config.placebo, *config.controls]
    for kind in [*config.disruption, *config.information, *optional]:
        targets = targets_of(kind)
        if not targets:
            skipped.append((kind, "not registered in this version of latentprobe"))
            continue
        fitting = [t for t in targets if t in usable]
        if not fitting:
            skipped.append((kind, f"{subject.name} has no {'/'.join(targets)} target to edit"))
        for target in fitting:
            if kind not in chosen.setdefault(target, []):
                chosen[target].append(kind)
    out = StudyEdits(skipped=skipped)
    for kind in chosen["latent"]:
        out.interventions += make_interventions(
            "latent", [kind], scales=config.noise_scales if kind == "noise" else None, semantics=config.semantics,
            relative_to=config.noise_relative_to, seed=config.seed)
    for target in [t for t in chosen if t != "latent"]:
        for kind in chosen[target]:
            out.interventions += make_interventions(target, [kind], seed=config.seed)
    unique = {}
    for iv in out.interventions:
        unique.setdefault(iv.name, iv)
    out.interventions = list(unique.values())
    return out
