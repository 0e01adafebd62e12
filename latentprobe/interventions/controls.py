"""Component controls of the latent phase (what do the latents contribute?), and the ablations of the text-model
studies, as registered latent kinds.

Controls (arXiv 2606.01287, "Beyond Visual Memory"; arXiv 2605.18445, "What's Holding Back Latent Visual
Reasoning?"):

* ``no-latent`` (`NoLatent`): the latent phase removed entirely: no start marker, no slots, no end marker. A
  forced start token is taken off the prompt (the clean prefill is reused: see
  `latentprobe.model.decoding.prefill_without_start`), the start token is never chosen, and the row's answer
  region begins at its first generated token (an organism's answer mask applies from there, as it would after a
  latent phase);
* ``markers-only`` (`MarkersOnly`): the start and end markers kept, zero latent slots between them (the end token
  is written right after the start even under LVR's model-choice exit);
* ``dummy`` (`DummyToken`): every edited slot fed the input embedding of one fixed ordinary token (by default the
  protocol's latent pad token, the id written at latent positions; ``token=`` names another);
* ``oracle`` (`OracleLatents`): every edited slot fed a target latent from an oracle source the user names
  (`OracleSource`: for LVR-style models the answer region's image-token states, for Mirage-style models a helper
  image's pooled embeddings; see `latentprobe.where.oracle_sources`); ``oracle-other`` feeds another instance's
  targets (the donor of `patch`). An instance the source has nothing for is recorded ``applied = false`` with the
  source's reason, never as a null effect.

Ablations comparable with ``J1mL1/causal-latent-cot`` (arXiv 2602.08783):

* ``noise-norm`` (`NormNoise`): Gaussian noise with sigma = s x mean||h|| / sqrt(d) per dimension (its
  default s = 0.5), the same noise as ``noise --relative-to norm`` under its own name;
* ``mean-step`` (`StepMean`): each step replaced by that step's dataset mean over the clean latents.

Which are information edits and which disruption (used by the latent -> answer verdict,
`latentprobe.verdicts.causal.edit_role`): ``oracle-other`` puts in what the model is trained to put there for
another real input (information); ``oracle`` puts in this instance's own target (a sufficiency reference: no
change is expected whether or not the latents matter, so it decides nothing); ``no-latent``, ``markers-only``,
``dummy``, ``noise-norm`` and ``mean-step`` remove or blank the content (disruption).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Sequence

import torch

from ..errors import LatentProbeError
from .base import MAX_NOISE_SCALE, checked_scale, register_intervention
from .latent import LatentIntervention, LatentNoise, _all_reduce_sum, _take_steps

CONTROL_KINDS = ("no-latent", "markers-only", "dummy", "oracle", "oracle-other")


class _NoSlots(LatentIntervention):
    """Shared by the two controls that run zero latent slots: no steps, layer or semantics of their own."""

    @classmethod
    def from_args(cls, *, seed=0, **_):
        """One; the control has no steps, layer or semantics."""
        return [cls(seed=seed)]

    def params(self):
        return {}

    def transform(self, vectors, steps, binding):
        return vectors

    def max_latent_steps(self, binding):
        return 0

    def not_applied_reason(self, binding, edited_steps, n_fed):
        clean = 0 if binding.clean is None else int(binding.clean.shape[0])
        if clean == 0:
            return "the clean run fed no latent vector: there is no latent phase to remove"
        if n_fed:
            return f"the run still fed {n_fed} latent vector(s)"
        return None


@register_intervention("no-latent")
class NoLatent(_NoSlots):
    """The latent phase removed: no start marker, no slots, no end marker (see the module docstring).

    The decoder reads `removes_latent_phase`; the runner decodes it from the clean prefill without its forced
    start token (``prefill_variant``)."""

    prefill_variant = "without_start"

    def removes_latent_phase(self) -> bool:
        return True


@register_intervention("markers-only")
class MarkersOnly(_NoSlots):
    """The start and end markers kept, zero latent slots between them.

    ``positions="kept"`` (default): the end marker and everything after it sit at the positions they had in the
    clean run (the slots' positions are left empty), so the control removes the slots' content and nothing else;
    ``"shifted"``: the sequence simply closes up (what a shorter prompt would give), which also moves every later
    position by the number of slots -- a model that addresses the image by relative position notices that too."""

    POSITIONS = ("kept", "shifted")

    @classmethod
    def from_args(cls, *, seed=0, **_):
        """One, with positions kept (set ``positions`` for the other: ``--marker-positions``)."""
        return [cls(seed=seed)]

    def __init__(self, positions: str = "kept", **kwargs):
        super().__init__(**kwargs)
        if positions not in self.POSITIONS:
            raise LatentProbeError(f"markers-only positions must be kept or shifted, got {positions!r}",
                                   "use kept (the answer at its clean positions) or shifted")
        self.positions = positions

    def params(self):
        return {} if self.positions == "kept" else {"positions": self.positions}

    def forces_end_exit(self) -> bool:
        return True

    def skipped_positions(self, binding) -> int:
        if self.positions != "kept" or binding.clean is None:
            return 0
        return int(binding.clean.shape[0])


@register_intervention("dummy")
class DummyToken(LatentIntervention):
    """Every edited slot fed the input embedding of one fixed token: the protocol's latent pad token by default
    (``token=None``), or the token string given. `bind_subject` reads the embedding (and refuses an unknown or
    multi-piece token) before any model runs."""

    @classmethod
    def from_args(cls, *, steps=None, layer=None, semantics="recompute", seed=0, **_):
        """One at steps, with the protocol's pad token (set ``token`` to choose another: ``--dummy-token``)."""
        return [cls(steps=steps, layer=layer, semantics=semantics, seed=seed)]

    def __init__(self, token: str | None = None, **kwargs):
        super().__init__(**kwargs)
        if self.layer is not None:
            raise LatentProbeError(f"dummy feeds a token embedding, which is an input: it cannot act at layer "
                                   f"{self.layer}", "leave --layer out (or 0) for dummy")
        self.token = token
        self.vector: torch.Tensor | None = None
        self.token_id: int | None = None

    def params(self):
        return {"token": self.token or "pad", **self.base_params()}

    def check_subject(self, subject):
        """Resolve the token to one id of the subject's vocabulary and take its input embedding."""
        tokenizer = subject.tokenizer
        if self.token is None:
            if subject.protocol is None:
                raise LatentProbeError("dummy: the subject has no latent protocol, so no latent pad token",
                                       "name a token with --value TOKEN")
            token_id = subject.resolved_protocol.pad_id
        else:
            ids = tokenizer.encode(self.token, add_special_tokens=False)
            if len(ids) != 1:
                raise LatentProbeError(f"dummy token {self.token!r} is {len(ids)} tokens for {subject.name}'s "
                                       "tokenizer, not one", "name a single token (e.g. a letter or a special token)")
            token_id = ids[0]
        self.token_id = int(token_id)
        embedding = subject.model.get_input_embeddings().weight
        self.vector = embedding[self.token_id].detach().float().cpu().clone()

    def transform(self, vectors, steps, binding):
        if self.vector is None:
            raise LatentProbeError("dummy was not bound to a subject", "call check_subject(subject) first")
        return self.vector.to(vectors).expand_as(vectors).clone()


class OracleSource(ABC):
    """Where oracle latents come from: ``targets`` returns the K vectors (K, D) an instance's latent slots should
    hold, or a string saying why the source has none for it (the row is then not applied, with that reason)."""

    name = "source"

    @abstractmethod
    def targets(self, subject, instance, images, n_steps: int) -> torch.Tensor | str:
        """(n_steps, D) target vectors for ``instance`` (its ``images`` loaded), or the reason there are none."""

    def check_subject(self, subject) -> None:
        """Refuse, before any model runs, a subject the source cannot serve."""


@register_intervention("oracle")
class OracleLatents(LatentIntervention):
    """Every edited slot fed the oracle source's target for this instance (``of="own"``) or for the donor instance
    (``of="other"``, kind ``oracle-other``). The runner fills ``binding.forced`` through `row_targets`."""

    wants_row_targets = True

    @classmethod
    def from_args(cls, *, steps=None, layer=None, semantics="recompute", seed=0, **_):
        """One at steps, source "auto"; the caller attaches the source (`where.oracle_sources`)."""
        return [cls(source=None, source_name="auto", steps=steps, layer=layer, semantics=semantics, seed=seed)]

    def __init__(self, source: OracleSource | None = None, source_name: str | None = None, of: str = "own",
                 **kwargs):
        super().__init__(**kwargs)
        if self.layer is not None:
            raise LatentProbeError(f"oracle latents are fed-back vectors: they cannot act at layer {self.layer}",
                                   "leave --layer out (or 0) for oracle")
        if of not in ("own", "other"):
            raise LatentProbeError(f"oracle 'of' must be own or other, got {of!r}", "use own or other")
        self.source = source
        self.source_name = source_name or (source.name if source is not None else "auto")
        self.of = of
        self.needs_donor = of == "other"

    def params(self):
        name = self.source.name if self.source is not None else self.source_name
        return {"source": name, **self.base_params()}

    def check_subject(self, subject):
        if self.source is None:
            raise LatentProbeError(f"{self.name}: no oracle source attached",
                                   "pass source=... (latentprobe.where.oracle_sources.make_oracle_source)")
        self.source.check_subject(subject)

    def row_targets(self, subject, instance, images, n_steps: int) -> tuple[torch.Tensor | None, str | None]:
        """(targets, None) or (None, why not) for one instance (the donor's, for ``oracle-other``)."""
        try:
            got = self.source.targets(subject, instance, images, n_steps)
        except LatentProbeError as exc:  # an instance the source cannot read: that row alone is not applied
            return None, f"oracle source {self.source.name}: {exc}"
        if isinstance(got, str):
            return None, f"oracle source {self.source.name} has no target for {instance.id}: {got}"
        return got, None

    def covers(self, step, binding):
        return binding.forced is not None and step < binding.forced.shape[0]

    def not_applied_reason(self, binding, edited_steps, n_fed):
        if binding.forced is None:
            return "the oracle source has no target for this instance"
        return super().not_applied_reason(binding, edited_steps, n_fed)

    def transform(self, vectors, steps, binding):
        return vectors if binding.forced is None else _take_steps(vectors, steps, binding.forced)


@register_intervention("oracle-other")
class OracleOther(OracleLatents):
    """`OracleLatents` of another instance (the donor): does the answer follow the targets it was fed?"""

    def __init__(self, **kwargs):
        kwargs.pop("of", None)
        super().__init__(of="other", **kwargs)


@register_intervention("noise-norm")
class NormNoise(LatentNoise):
    """Gaussian noise of sigma = s x mean||h|| / sqrt(d) per dimension (``J1mL1/causal-latent-cot``'s ablation,
    default s = 0.5): `LatentNoise` with ``relative_to="norm"``, under its own name."""

    scale_default = 0.5

    @classmethod
    def from_args(cls, *, steps=None, layer=None, semantics="recompute", seed=0, scales=None, **_):
        """One per scale (default 0.5, as causal-latent-cot)."""
        return [cls(scale=s, steps=steps, layer=layer, semantics=semantics, seed=seed)
                for s in (scales or [cls.scale_default])]

    def __init__(self, scale: float = 0.5, **kwargs):
        kwargs.pop("relative_to", None)
        super().__init__(scale=scale, relative_to="norm", **kwargs)

    def params(self):
        return {"scale": self.scale, **self.base_params()}


@register_intervention("mean-step")
class StepMean(LatentIntervention):
    """Each edited step replaced by that step's mean over the clean latents of the dataset (``binding.stats``'s
    per-step means); a step no clean run reached is left as it is and not counted as edited."""

    def params(self):
        return self.base_params()

    def covers(self, step, binding):
        means = getattr(binding.stats, "step_means", None)
        return means is not None and step < means.shape[0]

    def transform(self, vectors, steps, binding):
        means = getattr(binding.stats, "step_means", None)
        if means is None:
            raise LatentProbeError("mean-step needs per-step means of the clean latents",
                                   "run it through latentprobe's intervene, which computes them")
        return _take_steps(vectors, steps, means)


def step_means(latents: Sequence[torch.Tensor], n_steps: int) -> torch.Tensor:
    """(S, D) mean of the clean latents at each step over the instances that reached it; S = the longest run
    (at most ``n_steps``, the protocol's step count, which fixes the shape every torchrun rank sums)."""
    latents = [x for x in latents if len(x)]
    if not latents:
        raise LatentProbeError("per-step means need clean latent vectors", "run on a subject that enters latent mode")
    steps = max(int(n_steps), max(len(x) for x in latents))
    dim = latents[0].shape[-1]
    sums = torch.zeros((steps, dim + 1))  # the last column counts the instances at each step
    for x in latents:
        sums[: len(x), :dim] += x.float()
        sums[: len(x), dim] += 1
    sums = _all_reduce_sum(sums)  # under torchrun: the dataset's means, not one rank's 
    reached = sums[:, dim] > 0
    return (sums[:, :dim] / sums[:, dim:].clamp(min=1))[: int(reached.nonzero().max()) + 1]
