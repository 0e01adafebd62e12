"""Sites: one name for each place in the model that latentprobe can read or edit.

A place is a position group (which positions of a row), optionally a step inside that group, and a layer.
Every part of latentprobe (the Recorder, the TraceStore readers, layer edits, patching maps, the in-memory
cache) addresses places with a :class:`Site` and prints them in one readable form::

    latent[2].layer[14]     latent step 2, output of block 13 (hidden_states[14])
    latent.layer[0]         every latent step, the fed-back vectors themselves
    image.layer[3]          the image tokens (the Recorder stores their mean or all of them)
    prompt_last.layer[28]   the last prompt token
    answer[0].layer[5]      the first text position after the latent phase

Layers use one numbering everywhere, Hugging Face's ``hidden_states``: 0 = the input embeddings (the input of
block 0; at a latent step exactly the fed-back vector z_k), i = the output of block i-1, N = the final-norm
output. :func:`layer_modules` maps that numbering to modules for each supported backbone, so no other module
hard-codes a module path.

>>> site = Site("latent", layer=14, step=2)
>>> str(site)
'latent[2].layer[14]'
>>> Site.parse("image.layer[3]")
Site(group='image', layer=3, step=None)
>>> Site.parse(str(site)) == site
True
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum

import torch

from ..errors import LatentProbeError


class StepKind(IntEnum):
    """What a row's input is at one decoding step (the decoder's per-row state)."""

    TEXT = 0
    LATENT = 1
    DONE = 2


# Position groups a site can name. ``question`` is the text of the prompt after the image tokens.
POSITION_GROUPS = ("latent", "image", "question", "prompt_last", "answer")
_SITE_PATTERN = re.compile(r"^(?P<group>[a-z_]+)(?:\[(?P<step>\d+)\])?\.layer\[(?P<layer>\d+)\]$")


@dataclass(frozen=True)
class Site:
    """One place in the model: a position group, an optional step inside it, and a layer.

    Parameters
    ----------
    group : str
        One of ``latent``, ``image``, ``question``, ``prompt_last``, ``answer``.
    layer : int
        Hidden-state index: 0 = embeddings (the fed-back vector at a latent step), N = final norm.
    step : int or None
        The latent step (for ``latent``) or the answer position (for ``answer``); None means every step.
    """

    group: str
    layer: int
    step: int | None = None

    def __post_init__(self):
        if self.group not in POSITION_GROUPS:
            raise LatentProbeError(f"unknown position group {self.group!r} in a site",
                                   f"use one of {', '.join(POSITION_GROUPS)}")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise LatentProbeError(f"site layer must be a non-negative integer, got {self.layer!r}",
                                   "use the hidden_states numbering: 0 = embeddings, N = final norm")
        if self.step is not None:
            if self.group not in ("latent", "answer"):
                raise LatentProbeError(f"the {self.group!r} group has no steps (got step {self.step})",
                                       "give a step only for 'latent' or 'answer' sites")
            if isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 0:
                raise LatentProbeError(f"site step must be a non-negative integer, got {self.step!r}",
                                       "latent steps and answer positions count from 0")

    def __str__(self) -> str:
        step = "" if self.step is None else f"[{self.step}]"
        return f"{self.group}{step}.layer[{self.layer}]"

    @classmethod
    def parse(cls, text: str) -> "Site":
        """Read a site from its string form, e.g. ``latent[2].layer[14]``."""
        match = _SITE_PATTERN.match(str(text).strip())
        if match is None:
            raise LatentProbeError(f"cannot read {text!r} as a site",
                                   "write GROUP[STEP].layer[L] or GROUP.layer[L], e.g. latent[2].layer[14]")
        step = match.group("step")
        return cls(match.group("group"), int(match.group("layer")), None if step is None else int(step))

    def check_layer(self, num_layers: int) -> "Site":
        """Raise a clear error if the layer does not exist in a model with ``num_layers`` blocks."""
        if self.layer > num_layers:
            raise LatentProbeError(f"site {self} names layer {self.layer}, but the model has {num_layers} blocks",
                                   f"use layers 0..{num_layers} (0 = embeddings, {num_layers} = final norm)")
        return self


# ----------------------------------------------------------------------------------- backbone mapping
# Blocks, final norm, backbone module and position layout of each architecture live in latentprobe.model.backbones; the
# numbering above is derived from (blocks, final norm) alone. ``register_backbone`` is re-exported here.
from .backbones import register_backbone  # noqa: E402,F401  (the public name users know from this module)


def backbone_parts(model) -> tuple[torch.nn.ModuleList, torch.nn.Module]:
    """The decoder blocks and the final norm of ``model``, found through the backbone registry."""
    from .backbones import backbone_of

    return backbone_of(model).parts(model)


def num_layers(model) -> int:
    """The number of decoder blocks N (so valid site layers are 0..N)."""
    return len(backbone_parts(model)[0])


def layer_modules(model, n_layers: int | None = None) -> dict[int, tuple[torch.nn.Module, bool]]:
    """Map each hidden-state index to (module, is_pre_hook): layer 0 is read at the first block's input."""
    blocks, norm = backbone_parts(model)
    n_layers = len(blocks) if n_layers is None else n_layers
    modules = {0: (blocks[0], True)}
    for i in range(1, n_layers):
        modules[i] = (blocks[i - 1], False)
    modules[n_layers] = (norm, False)
    return modules


# ----------------------------------------------------------------------------------- reading sites from users
def as_site(value, group: str = "latent", step: int | None = None) -> Site:
    """A `Site` from a Site, its string form (``"latent[2].layer[14]"``) or a bare layer number (the old int form,
    read in the group ``group``). Bare ints keep older call sites working; new code passes sites.

    >>> as_site(3), as_site("image.layer[1]")
    (Site(group='latent', layer=3, step=None), Site(group='image', layer=1, step=None))
    """
    if isinstance(value, Site):
        return value
    if isinstance(value, str):
        return Site.parse(value)
    if isinstance(value, bool) or not isinstance(value, (int,)) and not hasattr(value, "__index__"):
        raise LatentProbeError(f"cannot read {value!r} as a site",
                               "pass a Site, its string form (e.g. 'latent[2].layer[14]') or a layer number")
    return Site(group, int(value), step)


def check_sites(sites, n_layers: int, max_latent_steps: int | None = None,
                groups: tuple[str, ...] | None = None) -> list[Site]:
    """Validate sites against a model and a protocol before anything runs; returns them as `Site` objects.

    Parameters
    ----------
    sites : iterable of Site, str or int
        The places asked for (ints are latent-group layers).
    n_layers : int
        The model's number of decoder blocks N (valid layers are 0..N).
    max_latent_steps : int or None
        The protocol's number of latent steps (fixed K or cap); steps must be below it. None skips the check.
    groups : tuple of str or None
        The position groups the caller can serve; others are refused with the list of those it can.
    """
    checked = []
    for value in sites:
        site = as_site(value).check_layer(n_layers)
        if groups is not None and site.group not in groups:
            raise LatentProbeError(f"site {site} is in the {site.group!r} group, which this reader does not provide",
                                   f"use one of the groups {', '.join(groups)}")
        if site.group == "latent" and site.step is not None and max_latent_steps is not None \
                and site.step >= max_latent_steps:
            raise LatentProbeError(f"site {site} names latent step {site.step}, but the protocol runs at most "
                                   f"{max_latent_steps} latent steps",
                                   f"use latent steps 0..{max_latent_steps - 1}" if max_latent_steps else
                                   "no latent step runs (latent_steps=0): drop the latent sites, or decode with "
                                   "latent_steps >= 1")
        checked.append(site)
    return checked


def site_rows(ctx, site: Site) -> torch.Tensor:
    """Rows of the decoder's current `StepContext` whose last position is at ``site`` (decoding steps only).

    ``latent[k]``: rows whose input is latent step k; ``latent``: rows at any latent step; ``answer``: text rows
    after their latent phase (``answer[j]`` cannot be told from the context alone and is refused). Prompt
    groups (``image``, ``question``, ``prompt_last``) live in the prefill, not at a decoding step: empty.
    """
    if ctx is None or ctx.is_prefill or site.group in ("image", "question", "prompt_last"):
        return torch.zeros(0, dtype=torch.long)
    if site.group == "latent":
        hit = ctx.kinds == StepKind.LATENT
        if site.step is not None:
            hit = hit & (ctx.latent_index == site.step)
        return hit.nonzero(as_tuple=True)[0]
    if site.step is not None:
        raise LatentProbeError(f"site {site}: a single answer position cannot be found from the step context",
                               "use 'answer.layer[L]' (every answer position) inside a decoding hook")
    return ((ctx.kinds == StepKind.TEXT) & ctx.after_latent).nonzero(as_tuple=True)[0]


def module_path(root: torch.nn.Module, module: torch.nn.Module) -> str:
    """The dotted path of ``module`` inside ``root`` (what nnsight's ``Envoy.get`` takes)."""
    for name, candidate in root.named_modules():
        if candidate is module:
            return name
    raise LatentProbeError("the backbone's module for this site is not inside the wrapped model",
                           "wrap the subject's backbone (latentprobe.model.backbones.backbone_call) or the whole subject.model")


def nnsight_hidden(envoy, model, site: Site | int, n_layers: int | None = None):
    """Inside an nnsight trace: the live hidden-state value at ``site``'s layer (all rows, all positions).

    ``envoy`` is the nnsight wrapper (``NNsightRunner`` passes it as ``model``), ``model`` the subject's full
    model (for the backbone registry). Layer 0 is the first block's input, layer i the output of block i-1,
    layer N the final norm's output, exactly as in the Recorder and the store. Index and assign it like a
    tensor, e.g. ``nnsight_hidden(envoy, model, site)[rows, -1] = 0.0``.
    """
    site = as_site(site)
    modules = layer_modules(model, n_layers)
    site.check_layer(max(modules))
    module, is_pre = modules[site.layer]
    path = module_path(envoy._module, module)
    return envoy.get(f"{path}.input" if is_pre else f"{path}.output")
