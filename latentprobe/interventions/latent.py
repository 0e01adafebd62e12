"""Latent interventions: edits of the mediator, the latent vectors a subject feeds back to itself.

`LatentNoise`, `LatentConstant` (zero / dataset mean / fixed random of matched norm), `LatentZero`, `LatentPatch`
(another instance's latent at the same step), `LatentDrop` (run fewer steps), `LatentShuffle` (the clean latents in
another order), `LatentFunction` (your own callable) and `PinLatents` (feed given vectors). See the package
docstring for steps, layers, semantics and scales.
"""

from __future__ import annotations

import random
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..model.decoding import LatentEdit
from ..errors import LatentProbeError
from .base import MAX_NOISE_SCALE, Intervention, _fmt, _seed_for, checked_scale, register_intervention

# ROME's "strong" corruption (3 x the per-dimension std of the clean latents): the README's tables and the demo use
# it, and `--scale` without a value means it too.
DEFAULT_NOISE_SCALE = 3.0

@dataclass
class LatentStats:
    """Dataset statistics of clean latents at one layer, the reference for relative scales."""

    mean_norm: float
    dim_std: torch.Tensor  # (D,)
    mean_vector: torch.Tensor  # (D,)
    step_means: torch.Tensor | None = None  # (S, D) each step's mean over the dataset (mean-step), when computed

    @classmethod
    def from_vectors(cls, vectors: torch.Tensor) -> "LatentStats":
        """Statistics of (n, D) clean latents; under torchrun, of every rank's latents together (the dataset's,
        not one rank's share), from all-reduced sums."""
        vectors = vectors.float()
        sums = torch.cat([vectors.sum(0), (vectors ** 2).sum(0),
                          torch.tensor([vectors.norm(dim=-1).sum(), float(vectors.shape[0])])])
        sums = _all_reduce_sum(sums)
        dim = vectors.shape[-1]
        count = float(sums[-1])
        if count < 2:
            raise LatentProbeError("latent statistics need at least 2 clean latent vectors",
                                   "run on more instances, or on a subject that enters latent mode")
        mean = sums[:dim] / count
        variance = (sums[dim:2 * dim] - count * mean ** 2) / (count - 1)  # unbiased, as torch.std
        return cls(mean_norm=float(sums[-2] / count), dim_std=variance.clamp(min=0).sqrt(), mean_vector=mean)


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


@dataclass
class RowBinding:
    """What a latent edit needs to know about the row it edits (filled in by the intervention runner)."""

    instance_id: str
    clean: torch.Tensor | None = None  # (S, D) the row's clean latents at the edited layer
    donor: torch.Tensor | None = None  # (S', D) another instance's clean latents (patching)
    stats: LatentStats | None = None
    forced: torch.Tensor | None = None  # (S, D) vectors to feed as they are (pinning)


class LatentIntervention(Intervention):
    """Edits latent vectors at chosen steps and layer: implement `transform`; override `max_latent_steps` to
    drop steps, `covers` when some steps have nothing to put (a donor without that step)."""

    target = "latent"

    def __init__(self, steps: Sequence[int] | None = None, layer: int | None = None, semantics: str = "recompute",
                 seed: int = 0):
        if semantics not in ("recompute", "pin"):
            raise LatentProbeError(f"unknown semantics {semantics!r}", "use 'recompute' or 'pin'")
        steps, layer = _steps_and_layer_from_site(steps, layer)
        self.steps = None if steps is None else sorted({int(s) for s in steps})
        if self.steps is not None and any(s < 0 for s in self.steps):
            raise LatentProbeError(f"latent steps must be >= 0, got {self.steps}", "steps count from 0")
        self.layer = None if layer in (None, 0) else int(layer)
        self.semantics = semantics
        self.seed = seed

    @classmethod
    def from_args(cls, *, steps=None, layer=None, semantics: str = "recompute", seed: int = 0, scales=None,
                  relative_to: str = "std", value: str | None = None) -> list["LatentIntervention"]:
        """Instances for one semantics from `make_interventions`' arguments (default: one at steps and layer)."""
        return [cls(steps=steps, layer=layer, semantics=semantics, seed=seed)]

    def base_params(self) -> dict[str, Any]:
        return {"steps": "all" if self.steps is None else self.steps,
                "layer": self.layer, "sem": self.semantics}

    @property
    def pins_later_steps(self) -> bool:
        return self.semantics == "pin"

    def applies(self, step: int) -> bool:
        return self.steps is None or step in self.steps

    @abstractmethod
    def transform(self, vectors: torch.Tensor, steps: torch.Tensor, binding: RowBinding) -> torch.Tensor:
        """The edited vectors (n, D) at latent steps ``steps`` (n,) of one row."""

    def max_latent_steps(self, binding: RowBinding) -> int | None:
        return None

    def covers(self, step: int, binding: RowBinding) -> bool:
        """Whether the edit has something to put at ``step`` (a patch needs the donor to have that step)."""
        return True

    def not_applied_reason(self, binding: RowBinding, edited_steps: set[int], n_fed: int) -> str | None:
        """Why the edit changed nothing it was asked to change in this row (None: it was applied).
        ``edited_steps`` are the latent steps it edited, ``n_fed`` the latent vectors the run fed."""
        if edited_steps:
            return None
        wanted = "any step" if self.steps is None else f"step(s) {_fmt(self.steps)}"
        return f"no latent vector was edited: it targets {wanted} and the run fed {n_fed} latent vector(s)"

    def check(self, max_steps: int, n_instances: int):
        if self.steps is not None and max(self.steps) >= max_steps:
            raise LatentProbeError(
                f"{self.name}: step {max(self.steps)} is beyond the protocol's {max_steps} latent steps",
                f"use steps 0..{max_steps - 1}")
        super().check(max_steps, n_instances)

    def bind(self, binding: RowBinding) -> "BoundEdit":
        return BoundEdit(self, binding)

    def edit(self, vectors: torch.Tensor, steps: torch.Tensor, binding: RowBinding) -> torch.Tensor:
        """Edit one row's vectors (n, D) at latent steps ``steps`` (n,), honouring the pin semantics."""
        out = vectors.clone()
        hit = torch.tensor([self.applies(int(s)) for s in steps], dtype=torch.bool, device=vectors.device)
        if self.pins_later_steps and binding.clean is not None:
            first = 0 if self.steps is None else self.steps[0]
            for i, s in enumerate(steps.tolist()):
                if s < binding.clean.shape[0] and (s >= first or hit[i]):
                    out[i] = binding.clean[s].to(out)
        if hit.any():
            out[hit] = self.transform(out[hit], steps[hit], binding).to(out)
        return out


def _steps_and_layer_from_site(steps, layer):
    """Layer edits accept a `Site` (or its string) for ``layer``: ``latent[2].layer[5]`` = layer 5 at step 2."""
    if layer is None or isinstance(layer, int):
        return steps, layer
    from ..model.sites import as_site

    site = as_site(layer)
    if site.group != "latent":
        raise LatentProbeError(f"a latent edit cannot act at site {site}",
                               "give a latent site, e.g. 'latent[2].layer[5]' or 'latent.layer[5]'")
    if site.step is not None:
        if steps is not None and sorted({int(s) for s in steps}) != [site.step]:
            raise LatentProbeError(f"steps {list(steps)} disagree with site {site}",
                                   "give the step in the site or in steps, not both")
        steps = [site.step]
    return steps, site.layer


def _take_steps(vectors, steps, source, order=None) -> torch.Tensor:
    """Row vectors replaced by ``source[order[s]]`` (default ``source[s]``) at each step the source has."""
    out = vectors.clone()
    for i, s in enumerate(steps.tolist()):
        if s < source.shape[0]:
            out[i] = source[order[s] if order is not None else s].to(out)
    return out


class BoundEdit(LatentEdit):
    """An intervention bound to one row's facts: what the decoder calls. It remembers which latent steps it
    edited, so a row it could not edit is recorded as not applied (`not_applied_reason`)."""

    def __init__(self, intervention: LatentIntervention, binding: RowBinding):
        self.intervention = intervention
        self.binding = binding
        self.name = intervention.name
        self.edited_steps: set[int] = set()

    @property
    def layer(self) -> int | None:
        return self.intervention.layer

    def apply(self, vectors: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """The intervention's edit of this row's vectors at ``steps``, noting the steps it had something for."""
        iv = self.intervention
        for s in steps.tolist():
            if iv.applies(int(s)) and iv.covers(int(s), self.binding):
                self.edited_steps.add(int(s))
        return iv.edit(vectors, steps, self.binding)

    def not_applied_reason(self, n_fed: int) -> str | None:
        return self.intervention.not_applied_reason(self.binding, self.edited_steps, n_fed)

    def edit_latent(self, vectors, rows, steps, decoder):
        if self.layer is not None:  # edited by the layer hooks instead
            return vectors
        return self.apply(vectors, steps)

    def max_latent_steps(self, row: int) -> int | None:
        return self.intervention.max_latent_steps(self.binding)

    def removes_latent_phase(self, row: int) -> bool:
        """The no-latent control (see `latentprobe.interventions.controls`)."""
        return bool(getattr(self.intervention, "removes_latent_phase", lambda: False)())

    def forces_end_exit(self, row: int) -> bool:
        """The markers-only control (see `latentprobe.interventions.controls`)."""
        return bool(getattr(self.intervention, "forces_end_exit", lambda: False)())

    def skipped_positions(self, row: int) -> int:
        """Markers-only with positions kept: the clean run's slot count (see `latentprobe.interventions.controls`)."""
        return int(getattr(self.intervention, "skipped_positions", lambda binding: 0)(self.binding))


def _noise(shape: tuple[int, ...], seed: int, device, dtype) -> torch.Tensor:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


@register_intervention("noise")
class LatentNoise(LatentIntervention):
    kind = "noise"

    @classmethod
    def from_args(cls, *, steps=None, layer=None, semantics="recompute", seed=0, scales=None, relative_to="std",
                  value=None):
        """One per scale (default `DEFAULT_NOISE_SCALE`)."""
        return [cls(scale=s, relative_to=relative_to, steps=steps, layer=layer, semantics=semantics, seed=seed)
                for s in (scales or [DEFAULT_NOISE_SCALE])]

    def __init__(self, scale: float | None = None, relative_to: str = "std", **kwargs):
        super().__init__(**kwargs)
        if relative_to not in ("std", "norm"):
            raise LatentProbeError(f"noise relative_to must be 'std' or 'norm', got {relative_to!r}",
                                   "see latentprobe.interventions for what each means")
        scale = DEFAULT_NOISE_SCALE if scale is None else scale
        self.scale = checked_scale("noise scale", scale, 0.0, MAX_NOISE_SCALE, "e.g. --scale 0.5,1,3")
        self.relative_to = relative_to

    def params(self):
        return {"scale": self.scale, "rel": self.relative_to, **self.base_params()}

    def transform(self, vectors, steps, binding):
        if self.scale == 0:
            return vectors
        stats = binding.stats
        dim = vectors.shape[-1]
        if self.relative_to == "std":
            sigma = stats.dim_std.to(vectors)
        else:
            sigma = torch.full((dim,), stats.mean_norm / dim ** 0.5, device=vectors.device, dtype=vectors.dtype)
        noise = torch.stack([_noise((dim,), _seed_for(self.seed, binding.instance_id, int(s), "noise"),
                                    vectors.device, vectors.dtype) for s in steps])
        return vectors + self.scale * sigma * noise


@register_intervention("constant")
class LatentConstant(LatentIntervention):
    """Every edited latent becomes one constant tensor: zero, the dataset-mean latent, or a fixed random vector
    with the mean latent norm."""

    kind = "constant"

    @classmethod
    def from_args(cls, *, steps=None, layer=None, semantics="recompute", seed=0, scales=None, relative_to="std",
                  value=None):
        """One, with ``value`` (default the dataset mean)."""
        return [cls(value=value or "mean", steps=steps, layer=layer, semantics=semantics, seed=seed)]

    def __init__(self, value: str = "mean", **kwargs):
        super().__init__(**kwargs)
        if value not in ("zero", "mean", "random"):
            raise LatentProbeError(f"constant value must be zero, mean or random, got {value!r}",
                                   "pick one of zero, mean, random")
        self.value = value

    def params(self):
        return {"value": self.value, **self.base_params()}

    def constant(self, stats: LatentStats, dim: int, device, dtype) -> torch.Tensor:
        if self.value == "zero":
            return torch.zeros(dim, device=device, dtype=dtype)
        if self.value == "mean":
            return stats.mean_vector.to(device=device, dtype=dtype)
        direction = _noise((dim,), _seed_for(self.seed, "constant-random"), device, dtype)
        return direction / direction.norm() * stats.mean_norm

    def transform(self, vectors, steps, binding):
        value = self.constant(binding.stats, vectors.shape[-1], vectors.device, vectors.dtype)
        return value.expand_as(vectors).clone()


@register_intervention("zero")
class LatentZero(LatentConstant):
    kind = "zero"

    @classmethod
    def from_args(cls, *, steps=None, layer=None, semantics="recompute", seed=0, **_):
        """One at steps and layer (the value is always zero)."""
        return [cls(steps=steps, layer=layer, semantics=semantics, seed=seed)]

    def __init__(self, **kwargs):
        super().__init__(value="zero", **kwargs)

    def params(self):
        return self.base_params()


@register_intervention("patch")
class LatentPatch(LatentIntervention):
    """Each edited latent is replaced by another instance's clean latent at the same step (symmetric token
    replacement); steps the donor does not have are left as they are."""

    kind = "patch"
    needs_donor = True

    def params(self):
        return self.base_params()

    def covers(self, step, binding):
        return binding.donor is not None and step < binding.donor.shape[0]

    def not_applied_reason(self, binding, edited_steps, n_fed):
        if not edited_steps and (binding.donor is None or binding.donor.shape[0] == 0):
            return "the donor has no clean latent vectors (it failed or never entered latent mode)"
        return super().not_applied_reason(binding, edited_steps, n_fed)

    def transform(self, vectors, steps, binding):
        return vectors if binding.donor is None else _take_steps(vectors, steps, binding.donor)


@register_intervention("drop")
class LatentDrop(LatentIntervention):
    """Run only the first ``keep`` latent steps (0: leave latent mode at once)."""

    kind = "drop"

    @classmethod
    def from_args(cls, *, seed=0, scales=None, **_):
        """One per scale, read as how many steps to keep (default 0); drop has no steps, layer or semantics."""
        return [cls(keep=int(s), seed=seed) for s in (scales or [0])]

    def __init__(self, keep: int = 0, **kwargs):
        super().__init__(**kwargs)
        if keep < 0:
            raise LatentProbeError(f"drop keep must be >= 0, got {keep}", "pass how many latent steps to keep")
        self.keep = int(keep)

    def params(self):
        return {"keep": self.keep}

    def transform(self, vectors, steps, binding):
        return vectors

    def max_latent_steps(self, binding):
        return self.keep

    def not_applied_reason(self, binding, edited_steps, n_fed):
        clean = 0 if binding.clean is None else int(binding.clean.shape[0])
        if clean <= self.keep:
            return f"the clean run fed {clean} latent vector(s): keeping {self.keep} drops nothing"
        return None


@register_intervention("shuffle")
class LatentShuffle(LatentIntervention):
    """Feed the row's clean latents in a seeded random order (a derangement where possible), same count."""

    kind = "shuffle"

    @classmethod
    def from_args(cls, *, seed=0, **_):
        """One; shuffle has no steps, layer or semantics."""
        return [cls(seed=seed)]

    def params(self):
        return {}

    def order(self, n: int, instance_id: str) -> list[int]:
        rng = random.Random(_seed_for(self.seed, instance_id, "shuffle"))
        order = list(range(n))
        for _ in range(100):
            rng.shuffle(order)
            if n < 2 or all(i != o for i, o in enumerate(order)):
                break
        return order

    def covers(self, step, binding):
        return binding.clean is not None and binding.clean.shape[0] >= 2 and step < binding.clean.shape[0]

    def not_applied_reason(self, binding, edited_steps, n_fed):
        clean = 0 if binding.clean is None else int(binding.clean.shape[0])
        if clean < 2:
            return f"the clean run fed {clean} latent vector(s): there is no other order to feed them in"
        return super().not_applied_reason(binding, edited_steps, n_fed)

    def transform(self, vectors, steps, binding):
        order = self.order(binding.clean.shape[0], binding.instance_id)
        return _take_steps(vectors, steps, binding.clean, order)

    def max_latent_steps(self, binding):
        return binding.clean.shape[0]


@register_intervention("placebo")
class LatentPlacebo(LatentIntervention):
    """The noise floor of latent edits: each edited step is fed the row's own clean latent (at the edited layer),
    through the same machinery, batch layout and shared prefill as every other latent edit. Exact arithmetic gives
    the clean run back; what it does differ by is what the edit machinery alone does (on a GPU in bf16: the
    batch-shape-dependent kernels)."""

    kind = "placebo"
    role = "placebo"

    def params(self):
        return self.base_params()

    def covers(self, step, binding):
        return binding.clean is not None and step < binding.clean.shape[0]

    def transform(self, vectors, steps, binding):
        return vectors if binding.clean is None else _take_steps(vectors, steps, binding.clean)


class PinLatents(LatentIntervention):
    """Feed exactly the given vectors (binding.forced), as many steps as there are: Z set to another run's Z."""

    kind = "pin"

    def __init__(self, source: str = "given", **kwargs):
        super().__init__(**kwargs)
        self.source = source

    def params(self):
        return {"source": self.source}

    def covers(self, step, binding):
        return binding.forced is not None and step < binding.forced.shape[0]

    def transform(self, vectors, steps, binding):
        return _take_steps(vectors, steps, binding.forced)

    def max_latent_steps(self, binding):
        return int(binding.forced.shape[0])


class LatentFunction(LatentIntervention):
    """Your own edit: ``fn(vectors (n, D), steps (n,)) -> vectors`` at the chosen steps and layer.

        >>> halve = LatentFunction(lambda v, s: v * 0.5, name="halve", steps=[1])
        >>> halve.name
        'halve(steps=1,sem=recompute)'
    """

    kind = "function"

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], name: str = "function", **kwargs):
        super().__init__(**kwargs)
        self.fn = fn
        self.kind = name

    def params(self):
        return self.base_params()

    def transform(self, vectors, steps, binding):
        return self.fn(vectors, steps)
