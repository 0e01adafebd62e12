"""Interventions: small named objects that each edit one thing.

Three targets, following the causal chain input X -> latent tokens Z -> answer Y:

* ``latent`` (the mediator): `LatentNoise`, `LatentConstant` (zero / dataset mean / fixed random of matched
  norm), `LatentPatch` (another instance's latent at the same step), `LatentDrop` (run fewer steps),
  `LatentShuffle` (feed the clean latents in another order), `LatentFunction` (your own callable), and
  `PinLatents` (feed given vectors; used for the mediation runs Y(x0, Z(x1)) and Y(x1, Z(x0))).
  Each acts at chosen latent steps (None = all) on the fed-back vector (``layer=None``) or on a chosen layer's
  output at the latent positions (``layer=L``, 1..N). For an edit at some steps, ``semantics`` says what
  happens after it: ``"recompute"`` lets later latent steps be computed from the edited one; ``"pin"`` sets
  every later step to its clean value. Both are meaningful and differ; they are distinct interventions.
* ``input`` (the treatment): `ImageSwap`, `ImageNoise`, `ImageBlank`, `ImageMask`, `QuestionSwap`, `NoImage`.
* ``text`` (a text mediator, CapImagine): `TextSwap`, `TextTruncate`, `TextShuffle`.

Scales are relative to the data, never absolute: noise of ``scale`` s with ``relative_to="std"`` adds
s x (per-dimension std of the clean latents over the dataset) x N(0, 1) per dimension (ROME's "3x std" is
s = 3); with ``relative_to="norm"`` it adds s x (mean clean latent norm) / sqrt(D) x N(0, 1), so the noise
norm is about s times a typical latent's norm. Every random draw is seeded by (seed, instance id, step),
so a row's edit does not depend on its batch.

    >>> noise = LatentNoise(scale=3.0, relative_to="std", steps=[0], semantics="pin", seed=1)
    >>> noise.name
    'noise(scale=3,rel=std,steps=0,sem=pin)'
"""

from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .decoding import LATENT, LatentDecoder, LatentEdit
from .errors import LatentProbeError


def _seed_for(*parts: Any) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "+".join(str(v) for v in value)
    return str(value)


class Intervention(ABC):
    """Base: a named edit of one target. ``name`` says exactly what was done and appears in every result row."""

    target = "none"
    kind = "none"
    seed: int = 0
    needs_donor = False  # takes something from another instance (patch, swaps)

    def check(self, max_steps: int, n_instances: int):
        """Refuse, before any model runs, what cannot work (here: a donor with a single instance)."""
        if self.needs_donor and n_instances < 2:
            raise LatentProbeError(f"{self.name} needs another instance to take from, but there is only one",
                                   "run on at least two instances")

    def params(self) -> dict[str, Any]:
        return {}

    @property
    def name(self) -> str:
        shown = ",".join(f"{k}={_fmt(v)}" for k, v in self.params().items() if v is not None)
        return f"{self.kind}({shown})" if shown else self.kind

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "target": self.target, "kind": self.kind, "seed": self.seed, **self.params()}

    def __repr__(self) -> str:
        return self.name


# ------------------------------------------------------------------------------------------------ latent
@dataclass
class LatentStats:
    """Dataset statistics of clean latents at one layer, the reference for relative scales."""

    mean_norm: float
    dim_std: torch.Tensor  # (D,)
    mean_vector: torch.Tensor  # (D,)

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
    """Edits latent vectors at chosen steps and layer; subclasses implement `transform`."""

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
    from .sites import as_site

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


def _noise(shape: tuple[int, ...], seed: int, device, dtype) -> torch.Tensor:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


class LatentNoise(LatentIntervention):
    kind = "noise"

    def __init__(self, scale: float = 1.0, relative_to: str = "std", **kwargs):
        super().__init__(**kwargs)
        if relative_to not in ("std", "norm"):
            raise LatentProbeError(f"noise relative_to must be 'std' or 'norm', got {relative_to!r}",
                                   "see latentprobe.interventions for what each means")
        self.scale = float(scale)
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


class LatentConstant(LatentIntervention):
    """Every edited latent becomes one constant tensor: zero, the dataset-mean latent, or a fixed random vector
    with the mean latent norm."""

    kind = "constant"

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


class LatentZero(LatentConstant):
    kind = "zero"

    def __init__(self, **kwargs):
        super().__init__(value="zero", **kwargs)

    def params(self):
        return self.base_params()


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


class LatentDrop(LatentIntervention):
    """Run only the first ``keep`` latent steps (0: leave latent mode at once)."""

    kind = "drop"

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


class LatentShuffle(LatentIntervention):
    """Feed the row's clean latents in a seeded random order (a derangement where possible), same count."""

    kind = "shuffle"

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


class LayerEditHooks:
    """Forward hooks applying bound edits at a chosen layer's output, at latent positions only.

    Used as a context manager around `LatentDecoder.decode` with the same per-row edits list."""

    def __init__(self, decoder: LatentDecoder, row_edits: Sequence[BoundEdit | None]):
        from .recording import layer_modules

        self.decoder = decoder
        self.row_edits = list(row_edits)
        self.handles = []
        layers = sorted({e.layer for e in self.row_edits if isinstance(e, BoundEdit) and e.layer is not None})
        modules = layer_modules(decoder.model, decoder.subject.num_layers)
        for layer in layers:
            module, is_pre = modules[layer]
            if is_pre:  # layer 0 is the fed-back vector, edited by the decoder itself
                continue
            # prepend: the edit runs before any recorder hook, so recorded states are the edited ones
            self.handles.append(module.register_forward_hook(self._make_hook(layer), prepend=True))

    def _make_hook(self, layer: int):
        def hook(module, inputs, output):
            ctx = self.decoder.context
            if ctx is None or ctx.is_prefill:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            rows = ctx.rows(LATENT).tolist()
            edited = None
            for r in rows:
                edit = self.row_edits[r] if r < len(self.row_edits) else None
                if not isinstance(edit, BoundEdit) or edit.layer != layer:
                    continue
                step = ctx.latent_index[r:r + 1]
                if edited is None:
                    edited = hidden.clone()
                edited[r, -1] = edit.apply(hidden[r, -1:].clone(), step)[0]
            if edited is None:
                return None
            return (edited,) + tuple(output[1:]) if isinstance(output, tuple) else edited

        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


class PinLatentStates:
    """Forward hooks that set the latent positions' states at EVERY layer to another run's (the full mediator).

    ``states[r]`` maps layer L (1..N, ``hidden_states`` numbering) to an (S, D) tensor of row r's states at
    latent steps 0..S-1 (None leaves the row alone). Together with `PinLatents` (layer 0, the fed-back
    vectors) this makes the latent positions' whole residual columns, and so their keys and values at every
    layer, those of the source run: the answer can then see the input only through the other positions
    (image, prompt). Pinning only the fed-back vector (`PinLatents` alone) leaves the latent positions free to
    read the current input through attention in upper layers, a route counted as "direct" under that
    definition. Used as a context manager around `LatentDecoder.decode`, like `LayerEditHooks`.
    """

    def __init__(self, decoder: LatentDecoder, states: Sequence[dict[int, torch.Tensor] | None]):
        from .recording import layer_modules

        self.decoder = decoder
        self.states = list(states)
        self.handles = []
        for layer, (module, is_pre) in sorted(layer_modules(decoder.model, decoder.subject.num_layers).items()):
            if is_pre:  # layer 0: the fed-back vector, pinned by PinLatents through the decoder
                continue
            self.handles.append(module.register_forward_hook(self._make_hook(layer), prepend=True))

    def _make_hook(self, layer: int):
        def hook(module, inputs, output):
            ctx = self.decoder.context
            if ctx is None or ctx.is_prefill:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            edited = None
            for r in ctx.rows(LATENT).tolist():
                given = self.states[r] if r < len(self.states) else None
                if not given or layer not in given:
                    continue
                step = int(ctx.latent_index[r])
                if step >= given[layer].shape[0]:
                    continue
                if edited is None:
                    edited = hidden.clone()
                edited[r, -1] = given[layer][step].to(edited)
            if edited is None:
                return None
            return (edited,) + tuple(output[1:]) if isinstance(output, tuple) else edited

        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


class NNsightRunner:
    """Run every forward of the decoder through nnsight, so ``fn(model, context)`` can read and edit any
    module inside latentprobe's decoding loop (e.g. layer L's output at latent step k only).

    ``model`` in ``fn`` is an ``nnsight.NNsight`` wrapping the subject's backbone (``subject.model.model``),
    so its layers are at ``model.language_model.layers[i]``; ``context`` is the decoder's `StepContext`.

        >>> def steer(model, ctx):                                             # doctest: +SKIP
        ...     rows = ((ctx.kinds == LATENT) & (ctx.latent_index == 1)).nonzero().flatten().tolist()
        ...     if rows:
        ...         model.language_model.layers[0].output[rows, -1] = 0.0
        >>> with NNsightRunner(decoder, steer):                                # doctest: +SKIP
        ...     result = decoder.run(batch)
    """

    def __init__(self, decoder: LatentDecoder, fn: Callable[[Any, Any], None]):
        from nnsight import NNsight

        self.decoder = decoder
        self.fn = fn
        self.wrapped = NNsight(decoder.inner_model)

    def hidden(self, site):
        """Inside ``fn``: the live hidden state at ``site``'s layer (a `Site`, its string or a layer number, in
        the one hidden_states numbering), e.g. ``runner.hidden("latent[2].layer[1]")[rows, -1] = 0.0`` with
        ``rows = site_rows(ctx, site)``."""
        from .sites import nnsight_hidden

        return nnsight_hidden(self.wrapped, self.decoder.model, site, self.decoder.subject.num_layers)

    def _forward(self, **kwargs):
        with self.wrapped.trace(**kwargs):
            self.fn(self.wrapped, self.decoder.context)
            output = self.wrapped.output.save()
        return output

    def __enter__(self):
        self._previous = self.decoder.forward_fn
        self.decoder.forward_fn = self._forward
        return self

    def __exit__(self, *exc):
        self.decoder.forward_fn = self._previous


# ------------------------------------------------------------------------------------------------- input
class InputIntervention(Intervention):
    """Edits the instance itself (images or question); the latents are then whatever the model makes of it."""

    target = "input"

    edits_images = True  # False: the edit is on the question

    @abstractmethod
    def apply(self, instance, images: list, donor=None, donor_images: list | None = None) -> tuple[list, str | None]:
        """Return (images, question override or None)."""

    def not_applied_reason(self, instance, images: list, donor=None, donor_images: list | None = None) -> str | None:
        """Why this edit cannot be made for this instance (None: it can)."""
        if self.needs_donor and (donor is None or (self.edits_images and donor_images is None)):
            return "the donor instance failed in the clean run"
        if self.edits_images and not images:
            return "the instance has no image to edit"
        return None


class ImageSwap(InputIntervention):
    kind = "image-swap"
    needs_donor = True

    def __init__(self, seed: int = 0):
        self.seed = seed

    def apply(self, instance, images, donor=None, donor_images=None):
        return list(donor_images), None


class ImageNoise(InputIntervention):
    """Gaussian pixel noise with standard deviation ``level`` x 255 (level 0.1 = 10% of the range)."""

    kind = "image-noise"

    def __init__(self, level: float = 0.5, seed: int = 0):
        if level < 0:
            raise LatentProbeError(f"image-noise level must be >= 0, got {level}", "e.g. --scale 0.1,0.5")
        self.level = float(level)
        self.seed = seed

    def params(self):
        return {"level": self.level}

    def apply(self, instance, images, donor=None, donor_images=None):
        from PIL import Image

        out = []
        for k, img in enumerate(images):
            rng = np.random.default_rng(_seed_for(self.seed, instance.id, k, "pixels"))
            pixels = np.asarray(img, dtype=np.float32)
            noisy = pixels + rng.normal(0.0, self.level * 255.0, size=pixels.shape)
            out.append(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)))
        return out, None


class ImageBlank(InputIntervention):
    kind = "image-blank"

    def __init__(self, colour: str = "gray", seed: int = 0):
        self.colour = colour
        self.seed = seed

    def params(self):
        return {"colour": self.colour}

    def apply(self, instance, images, donor=None, donor_images=None):
        from PIL import Image

        value = {"gray": (128, 128, 128), "black": (0, 0, 0), "white": (255, 255, 255)}.get(self.colour)
        if value is None:
            raise LatentProbeError(f"unknown blank colour {self.colour!r}", "use gray, black or white")
        return [Image.new("RGB", img.size, value) for img in images], None


class ImageMask(InputIntervention):
    """A gray box over a region: ``region`` center / top / bottom / left / right, covering ``fraction`` of each side."""

    kind = "image-mask"

    def __init__(self, region: str = "center", fraction: float = 0.5, seed: int = 0):
        if region not in ("center", "top", "bottom", "left", "right"):
            raise LatentProbeError(f"unknown mask region {region!r}", "use center, top, bottom, left or right")
        self.region, self.fraction, self.seed = region, float(fraction), seed

    def params(self):
        return {"region": self.region, "fraction": self.fraction}

    def apply(self, instance, images, donor=None, donor_images=None):
        out = []
        for img in images:
            pixels = np.asarray(img).copy()
            h, w = pixels.shape[:2]
            bh, bw = int(round(h * self.fraction)), int(round(w * self.fraction))
            y0, x0 = {"center": ((h - bh) // 2, (w - bw) // 2), "top": (0, 0), "bottom": (h - bh, 0),
                      "left": (0, 0), "right": (0, w - bw)}[self.region]
            if self.region in ("top", "bottom"):
                bw, x0 = w, 0
            if self.region in ("left", "right"):
                bh, y0 = h, 0
            pixels[y0:y0 + bh, x0:x0 + bw] = 128
            from PIL import Image

            out.append(Image.fromarray(pixels))
        return out, None


class QuestionSwap(InputIntervention):
    """Ask another instance's question about this instance's image (options and gold stay this instance's)."""

    kind = "question-swap"
    needs_donor = True
    edits_images = False

    def __init__(self, seed: int = 0):
        self.seed = seed

    def apply(self, instance, images, donor=None, donor_images=None):
        return images, donor.question


class NoImage(InputIntervention):
    kind = "no-image"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def apply(self, instance, images, donor=None, donor_images=None):
        return [], None


# -------------------------------------------------------------------------------------------------- text
class TextIntervention(Intervention):
    """Edits a text mediator span (the imagination a CapImagine-style subject writes before answering)."""

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


class TextSwap(TextIntervention):
    kind = "text-swap"
    needs_donor = True

    def rewrite(self, span, instance_id, donor_span=None):
        return donor_span or ""


class TextTruncate(TextIntervention):
    """Keep the first ``fraction`` of the span's words."""

    kind = "text-truncate"

    def __init__(self, fraction: float = 0.5, seed: int = 0):
        super().__init__(seed)
        if not 0 <= fraction <= 1:
            raise LatentProbeError(f"text-truncate fraction must be in [0, 1], got {fraction}", "e.g. --scale 0.5")
        self.fraction = float(fraction)

    def params(self):
        return {"keep": self.fraction}

    def rewrite(self, span, instance_id, donor_span=None):
        words = span.split()
        return " ".join(words[: int(round(len(words) * self.fraction))])


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


# ------------------------------------------------------------------------------------------ construction
LATENT_KINDS = {"noise": LatentNoise, "constant": LatentConstant, "zero": LatentZero, "patch": LatentPatch,
                "drop": LatentDrop, "shuffle": LatentShuffle}
INPUT_KINDS = {"image-swap": ImageSwap, "image-noise": ImageNoise, "image-blank": ImageBlank,
               "image-mask": ImageMask, "question-swap": QuestionSwap, "no-image": NoImage}
TEXT_KINDS = {"text-swap": TextSwap, "text-truncate": TextTruncate, "text-shuffle": TextShuffle}
KINDS_BY_TARGET = {"latent": LATENT_KINDS, "input": INPUT_KINDS, "text": TEXT_KINDS}


def make_interventions(target: str, kinds: Sequence[str], *, steps: Sequence[int] | None = None,
                       scales: Sequence[float] | None = None, layer: int | None = None,
                       semantics: Sequence[str] = ("recompute",), seed: int = 0,
                       relative_to: str = "std", value: str | None = None) -> list[Intervention]:
    """Build interventions from command-line style arguments; sweeps expand over scales and semantics."""
    if target not in KINDS_BY_TARGET:
        raise LatentProbeError(f"unknown target {target!r}", "use latent, input or text")
    table = KINDS_BY_TARGET[target]
    out: list[Intervention] = []
    for kind in kinds:
        if kind not in table:
            other = [t for t, kinds_ in KINDS_BY_TARGET.items() if kind in kinds_]
            hint = f" (it is a --target {other[0]} kind)" if other else ""
            raise LatentProbeError(f"unknown {target} intervention kind {kind!r}{hint}",
                                   f"choose from {', '.join(table)}")
        cls = table[kind]
        if target == "latent":
            for sem in semantics:
                common = dict(steps=steps, layer=layer, semantics=sem, seed=seed)
                if kind == "noise":
                    out += [LatentNoise(scale=s, relative_to=relative_to, **common) for s in (scales or [1.0])]
                elif kind == "constant":
                    out.append(LatentConstant(value=value or "mean", **common))
                elif kind == "drop":
                    out += [LatentDrop(keep=int(s), seed=seed) for s in (scales or [0])]
                elif kind == "shuffle":
                    out.append(LatentShuffle(seed=seed))
                else:
                    out.append(cls(**common))
        elif kind == "image-noise":
            out += [ImageNoise(level=s, seed=seed) for s in (scales or [0.5])]
        elif kind == "text-truncate":
            out += [TextTruncate(fraction=s, seed=seed) for s in (scales or [0.5])]
        elif kind == "image-mask":
            out += [ImageMask(fraction=s, seed=seed) for s in (scales or [0.5])]
        else:
            out.append(cls(seed=seed))
    # drop and shuffle have no semantics: keep one of each
    unique: dict[str, Intervention] = {}
    for iv in out:
        unique.setdefault(iv.name, iv)
    return list(unique.values())


def derangement(n: int, seed: int) -> list[int]:
    """A seeded permutation with no fixed point: each instance's donor is another instance."""
    if n < 2:
        raise LatentProbeError("a donor mapping needs at least two instances", "run on at least two instances")
    rng = random.Random(seed)
    while True:
        order = list(range(n))
        rng.shuffle(order)
        if all(i != o for i, o in enumerate(order)):
            return order
