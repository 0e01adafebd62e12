"""The Recorder: forward hooks that copy chosen layers at chosen positions while the decoder runs.

In the spirit of baukit's ``nethook.Trace``: a context manager, plain hooks, no framework. It reads the
decoder's `StepContext` to know which rows are at a latent step, in the prompt, or in their answer, and keeps
what it copies on the model's device until the batch ends (one transfer to CPU per batch, not per step).

Layers use Hugging Face ``hidden_states`` numbering: 0 = input embeddings, i = output of block i-1, N = final
norm output. What is recorded per row:

    latent_layers  (n_layers, n_latent, D)  states at every latent position (layer 0 there = the fed-back vector)
    image_mean     (n_layers, D)            mean over the row's image tokens (prefill)
    image_tokens   (n_layers, n_image, D)   every image token (only with image="all")
    prompt_last    (n_layers, D)            the last prompt token (prefill)
    answer_layers  (n_layers, n_answer, D)  text positions after the row's latent phase (with answer=True)

Each recorded tensor is a set of `Site`s (``latent[k].layer[L]``, ``image.layer[L]``, ``prompt_last.layer[L]``,
``answer[j].layer[L]``); `site_tensor` reads one site out of a record, and the TraceStore readers and
`run_with_cache` use it, so every part of latentprobe names the same place the same way.

Example::

    >>> with Recorder(decoder, RecordSpec(layers=[0, 2])) as recorder:   # doctest: +SKIP
    ...     result = decoder.run(batch)
    >>> recorder.records()[0]["latent_layers"].shape                     # doctest: +SKIP
    torch.Size([2, 4, 64])
    >>> site_tensor(recorder.records()[0], recorder.layers, Site.parse("latent[1].layer[2]")).shape  # doctest: +SKIP
    torch.Size([64])
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import numpy as np
import torch

from . import sites as _sites
from .decoding import LATENT, TEXT, LatentDecoder, StepContext
from ..errors import LatentProbeError
from .sites import Site, as_site


@dataclass
class RecordSpec:
    """Which layers and which positions to record.

    ``layers`` is ``"final"`` (= N), ``"all"``, None (no hooks) or a list of hidden-state indices, `Site`s or site
    strings (their layers are recorded; ``-1`` counts from the end). `RecordSpec.for_sites` builds a spec that
    records exactly what a list of sites needs, and `sites` lists the sites a spec's records hold.
    """

    layers: Sequence[int | Site | str] | str | None = "final"
    latent: bool = True
    image: str | None = "mean"  # "mean", "all" or None
    prompt_last: bool = True
    answer: bool = False

    @classmethod
    def for_sites(cls, sites: Sequence[Site | str]) -> "RecordSpec":
        """The smallest spec whose records hold every site in ``sites`` (image sites record every image token)."""
        sites = [as_site(s) for s in sites]
        if not sites:
            raise LatentProbeError("no sites given to record", "name at least one site, e.g. 'latent.layer[0]'")
        groups = {s.group for s in sites}
        if "question" in groups:
            raise LatentProbeError("question-token sites are not recorded by the Recorder",
                                   "read image, prompt_last, latent or answer sites")
        return cls(layers=sorted({s.layer for s in sites}), latent="latent" in groups,
                   image="all" if "image" in groups else None, prompt_last="prompt_last" in groups,
                   answer="answer" in groups)

    def resolve_layers(self, num_layers: int) -> list[int]:
        if self.layers is None:
            return []
        if self.layers == "all":
            return list(range(num_layers + 1))
        if self.layers == "final":
            return [num_layers]
        if isinstance(self.layers, str):
            raise LatentProbeError(f"layers {self.layers!r} is not 'final', 'all' or a list",
                                   "give 'final', 'all', or a list of layer numbers or sites")
        layers = []
        for layer in self.layers:
            if isinstance(layer, (Site, str)):
                layer = as_site(layer).check_layer(num_layers).layer
            layer = int(layer)
            resolved = num_layers + 1 + layer if layer < 0 else layer
            if not 0 <= resolved <= num_layers:
                raise LatentProbeError(f"layer {layer} is out of range for a model with {num_layers} blocks",
                                       f"use 0..{num_layers} (0 = embeddings, {num_layers} = final norm) or 'final'")
            layers.append(resolved)
        return sorted(set(layers))

    def sites(self, num_layers: int) -> list[Site]:
        """The group-level sites (every step of a group) whose states this spec records, in layer order."""
        groups = [g for g, on in (("latent", self.latent), ("image", self.image), ("prompt_last", self.prompt_last),
                                  ("answer", self.answer)) if on]
        return [Site(g, layer) for g in groups for layer in self.resolve_layers(num_layers)]

    def describe(self) -> dict:
        layers = self.layers if isinstance(self.layers, str) or self.layers is None else \
            [str(l) if isinstance(l, Site) else l for l in self.layers]
        return dict(layers=layers, latent=self.latent, image=self.image, prompt_last=self.prompt_last,
                    answer=self.answer)


def layer_modules(model, num_layers: int) -> dict[int, tuple[torch.nn.Module, bool]]:
    """Map each hidden-state index to (module, is_pre_hook); see `latentprobe.model.sites.layer_modules`."""
    return _sites.layer_modules(model, num_layers)


# Which record tensor holds each position group (the TraceStore names, written by `trace`).
_GROUP_TENSORS = {"latent": "latent_layers", "answer": "answer_layers", "prompt_last": "prompt_last"}


def site_tensor(tensors: Mapping[str, torch.Tensor], layer_ids: Sequence[int], site: Site | str,
                image: str = "tokens") -> torch.Tensor | None:
    """One site's states out of one record (a Recorder record or a stored one).

    Parameters
    ----------
    tensors : mapping of str to Tensor
        The record: ``latent_layers`` (n_layers, n_latent, D), ``image_tokens`` / ``image_mean``,
        ``prompt_last`` (n_layers, D), ``answer_layers`` (n_layers, n_answer, D), and ``latent`` (n_latent, D),
        the fed-back vectors, which are layer 0 at the latent steps whether or not layer 0 was hooked.
    layer_ids : sequence of int
        The hidden-state layer of each entry of the tensors' first axis (``Recorder.layers``,
        ``manifest['record']['layer_ids']``).
    site : Site or str
    image : {"tokens", "mean"}
        For image sites: every image token (n_image, D), or their mean (D,).

    Returns
    -------
    Tensor or None
        ``latent[k]``, ``answer[j]``, ``prompt_last``: (D,); ``latent``, ``answer``: (n_steps, D); ``image``: as
        asked. None when the record has no such step (a row with fewer latent steps or answer tokens).
    """
    site = as_site(site)
    layer_ids = list(layer_ids)
    if site.group == "question":
        raise LatentProbeError(f"site {site}: question-token states are not recorded",
                               "read image, prompt_last, latent or answer sites")
    if site.group == "latent" and site.layer == 0 and "latent" in tensors and 0 not in layer_ids:
        states = tensors["latent"]
    elif site.group == "image":
        name = "image_tokens" if image == "tokens" else "image_mean"
        if image not in ("tokens", "mean"):
            raise LatentProbeError(f"image={image!r} is not a way to read image sites", "use 'tokens' or 'mean'")
        if image == "mean" and name not in tensors and "image_tokens" in tensors:
            states = _layer_slice(tensors["image_tokens"], layer_ids, site).mean(0)
            return states
        if name not in tensors:
            fix = "record with image='all' (--image-states all)" if image == "tokens" else \
                "record image states (--image-states mean or all)"
            raise LatentProbeError(f"site {site}: the record holds no {name}", fix)
        return _layer_slice(tensors[name], layer_ids, site)
    else:
        name = _GROUP_TENSORS[site.group]
        if name not in tensors:
            flag = {"latent_layers": "latent states", "answer_layers": "answer states (--answer-states)",
                    "prompt_last": "prompt states"}[name]
            raise LatentProbeError(f"site {site}: the record holds no {name}", f"record {flag} when tracing")
        states = _layer_slice(tensors[name], layer_ids, site)
    if site.step is None:
        return states
    return states[site.step] if site.step < states.shape[0] else None


def _layer_slice(tensor: torch.Tensor, layer_ids: list[int], site: Site) -> torch.Tensor:
    if site.layer not in layer_ids:
        raise LatentProbeError(f"site {site}: layer {site.layer} was not recorded (recorded: {layer_ids})",
                               "read a recorded layer, or record this one (--layers)")
    return tensor[layer_ids.index(site.layer)]


class Recorder:
    """Copy hidden states of chosen layers at latent steps, image tokens, the last prompt token and answers."""

    def __init__(self, decoder: LatentDecoder, spec: RecordSpec | None = None):
        self.decoder = decoder
        self.spec = spec or RecordSpec()
        if decoder.subject.text_only and self.spec.image:
            # A text model has no image group: the default image mean is simply not recorded, image sites asked
            # for by name (image="all") are refused.
            if self.spec.image == "all":
                from .backbones import require_images

                require_images(decoder.subject, "recording image sites")
            self.spec = replace(self.spec, image=None)
        self.num_layers = decoder.subject.num_layers
        self.layers = self.spec.resolve_layers(self.num_layers)
        self.sites = self.spec.sites(self.num_layers)
        self._handles: list = []
        self._paused = False
        self._reset()

    def _reset(self):
        self._latent: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {l: [] for l in self.layers}
        self._answer: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {l: [] for l in self.layers}
        self._image_mean: dict[int, torch.Tensor] = {}
        self._image_all: dict[int, list[torch.Tensor]] = {}
        self._prompt_last: dict[int, torch.Tensor] = {}
        self._batch_size = 0
        self._instance_ids: Sequence[str] = ()

    # -- context manager --------------------------------------------------------------------------------------
    def __enter__(self) -> "Recorder":
        modules = _sites.layer_modules(self.decoder.model, self.num_layers)
        for layer in self.layers:
            module, is_pre = modules[layer]
            if is_pre:
                hook = module.register_forward_pre_hook(self._make_hook(layer, from_input=True))
            else:
                hook = module.register_forward_hook(self._make_hook(layer, from_input=False))
            self._handles.append(hook)
        self._remove_listener = self.decoder.add_step_listener(self._on_step, on_expand=self._on_expand)
        return self

    def __exit__(self, *exc):
        self.close()

    @contextmanager
    def paused(self):
        """Decode without recording (runs whose states nobody reads); the last records are kept."""
        self._paused = True
        try:
            yield self
        finally:
            self._paused = False

    @contextmanager
    def image_states(self, image: str):
        """Record the image tokens as ``image`` ("mean" or "all") in the prefills run inside the block, whatever
        the spec says. A study's clean pass keeps every token (the collapse verdict's yardstick is a single image
        token) while its edits, whose analyses read only the mean, keep the mean: one copy of the tokens per
        instance, not one per edit. A subject without images records none either way."""
        if image not in ("mean", "all"):
            raise LatentProbeError(f"image states {image!r} are not a way to record image tokens",
                                   "use 'mean' or 'all'")
        saved = self.spec
        if not self.decoder.subject.text_only:
            self.spec = replace(saved, image=image)
        try:
            yield self
        finally:
            self.spec = saved

    def prompt_states(self, with_image_tokens: bool = False) -> dict:
        """A copy of what the last prefill recorded: the last prompt token, the image-token mean and, with
        ``with_image_tokens``, every image token (often the larger part). `resume_prompt` sets it back when the
        same prefill is decoded again later (an intervention run edits from its clean pass's prefill): decoding a
        kept prefill runs no prefill step, so the Recorder would otherwise hold another batch's prompt."""
        return {"batch_size": self._batch_size, "instance_ids": list(self._instance_ids),
                # clones: a slice of the layer's output would keep that whole (B, L, D) tensor alive
                "prompt_last": {layer: t.clone() for layer, t in self._prompt_last.items()},
                "image_mean": dict(self._image_mean),
                "image_all": {layer: list(rows) for layer, rows in self._image_all.items()} if with_image_tokens
                else {}}

    def resume_prompt(self, states: dict):
        """Begin a batch from a kept prefill, with ``states`` (`prompt_states`) as if that prefill had just run;
        only what this Recorder's spec records is set back."""
        self._reset()
        self._batch_size, self._instance_ids = states["batch_size"], list(states["instance_ids"])
        if self.spec.prompt_last:
            self._prompt_last = dict(states["prompt_last"])
        if self.spec.image:
            self._image_mean = dict(states["image_mean"])
        if self.spec.image == "all":
            self._image_all = {layer: list(rows) for layer, rows in states["image_all"].items()}

    def close(self):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if getattr(self, "_remove_listener", None):
            self._remove_listener()
            self._remove_listener = None

    # -- hooks ----------------------------------------------------------------------------------------------
    def _on_step(self, ctx: StepContext):
        if self._paused:
            return
        if ctx.is_prefill:  # a new batch begins
            self._reset()
            self._batch_size = len(ctx.instance_ids)
            self._instance_ids = ctx.instance_ids
        # Decide once per step, not once per hook, which rows each hook copies.
        self._latent_rows = ctx.rows(LATENT) if self.spec.latent and not ctx.is_prefill else None
        self._answer_rows = None
        if self.spec.answer and not ctx.is_prefill:
            answer = (ctx.kinds == TEXT) & ctx.after_latent
            self._answer_rows = answer.nonzero(as_tuple=True)[0]

    def _on_expand(self, repeats: int):
        """The prefill is decoded `repeats` times side by side: repeat what the prefill recorded."""
        if self._paused:
            return
        self._batch_size *= repeats
        self._instance_ids = [iid for iid in self._instance_ids for _ in range(repeats)]
        for store in (self._prompt_last, self._image_mean):
            for layer in store:
                store[layer] = store[layer].repeat_interleave(repeats, dim=0)
        for layer in self._image_all:
            self._image_all[layer] = [t for t in self._image_all[layer] for _ in range(repeats)]
        for layer in self._latent:  # latent and answer captures only begin after the prefill
            self._latent[layer].clear()
            self._answer[layer].clear()

    def _make_hook(self, layer: int, from_input: bool):
        def hook(module, inputs, output=None):
            hidden = inputs[0] if from_input else output
            if isinstance(hidden, tuple):
                hidden = hidden[0]
            self._capture(layer, hidden)

        return hook

    def _capture(self, layer: int, hidden: torch.Tensor):
        ctx = self.decoder.context
        if ctx is None or self._paused:
            return
        if ctx.is_prefill:
            self._capture_prompt(layer, hidden, ctx)
            return
        rows = self._latent_rows
        if rows is not None and len(rows):
            self._latent[layer].append((rows, ctx.latent_index[rows], hidden[rows, -1].detach()))
        rows = self._answer_rows
        if rows is not None and len(rows):
            self._answer[layer].append((rows, hidden[rows, -1].detach()))

    def _capture_prompt(self, layer: int, hidden: torch.Tensor, ctx: StepContext):
        hidden = hidden.detach()
        if self.spec.prompt_last:
            self._prompt_last[layer] = hidden[:, -1]
        if self.spec.image and ctx.prefill_image_mask is not None:
            mask = ctx.prefill_image_mask.to(hidden.dtype).unsqueeze(-1)
            counts = mask.sum(1).clamp(min=1)
            self._image_mean[layer] = (hidden * mask).sum(1) / counts
            if self.spec.image == "all":
                self._image_all[layer] = [hidden[r][ctx.prefill_image_mask[r]] for r in range(hidden.shape[0])]

    # -- results --------------------------------------------------------------------------------------------
    def records(self) -> list[dict[str, torch.Tensor]]:
        """Per row of the last batch: name -> float32 CPU tensor (layers first, in `self.layers` order)."""
        bsz = self._batch_size
        out: list[dict[str, torch.Tensor]] = [dict() for _ in range(bsz)]
        if not self.layers:
            return out
        if self.spec.latent:
            per_layer = [self._gather_latent(self._latent[l], bsz) for l in self.layers]
            for r in range(bsz):
                out[r]["latent_layers"] = torch.stack([layer_rows[r] for layer_rows in per_layer])
        if self.spec.answer:
            per_layer = [self._gather_answer(self._answer[l], bsz) for l in self.layers]
            for r in range(bsz):
                out[r]["answer_layers"] = torch.stack([layer_rows[r] for layer_rows in per_layer])
        if self._prompt_last:
            stacked = torch.stack([self._prompt_last[l] for l in self.layers], dim=1).float().cpu()
            for r in range(bsz):
                out[r]["prompt_last"] = stacked[r]
        if self._image_mean:
            stacked = torch.stack([self._image_mean[l] for l in self.layers], dim=1).float().cpu()
            for r in range(bsz):
                out[r]["image_mean"] = stacked[r]
        if self._image_all:
            for r in range(bsz):
                out[r]["image_tokens"] = torch.stack([self._image_all[l][r] for l in self.layers]).float().cpu()
        return out

    def _gather_latent(self, chunks, bsz) -> list[torch.Tensor]:
        dim = self.decoder.subject.hidden_size
        per_row: list[list[tuple[int, torch.Tensor]]] = [[] for _ in range(bsz)]
        for rows, steps, states in chunks:
            states = states.float().cpu()
            for i, (r, k) in enumerate(zip(rows.tolist(), steps.tolist())):
                per_row[r].append((k, states[i]))
        result = []
        for items in per_row:
            items.sort(key=lambda item: item[0])
            result.append(torch.stack([s for _, s in items]) if items else torch.zeros((0, dim)))
        return result

    def _gather_answer(self, chunks, bsz) -> list[torch.Tensor]:
        dim = self.decoder.subject.hidden_size
        per_row: list[list[torch.Tensor]] = [[] for _ in range(bsz)]
        for rows, states in chunks:
            states = states.float().cpu()
            for i, r in enumerate(rows.tolist()):
                per_row[r].append(states[i])
        return [torch.stack(items) if items else torch.zeros((0, dim)) for items in per_row]


def stack_site_states(states: Sequence[torch.Tensor | None], dim: int | None = None) -> np.ndarray:
    """Stack per-record site states into one float32 array padded with NaN (shared by the store and the cache).

    (D,) states give (N, D); (S, D) states give (N, max S, D). A None (a record without that step) is a NaN row.
    """
    present = [t for t in states if t is not None]
    if not present:
        return np.full((len(states), dim or 0), np.nan, dtype=np.float32)
    dim = present[0].shape[-1]
    if present[0].dim() == 1:
        out = np.full((len(states), dim), np.nan, dtype=np.float32)
        for i, t in enumerate(states):
            if t is not None:
                out[i] = t.float().numpy()
        return out
    steps = max(t.shape[0] for t in present)
    out = np.full((len(states), steps, dim), np.nan, dtype=np.float32)
    for i, t in enumerate(states):
        if t is not None:
            out[i, :t.shape[0]] = t.float().numpy()
    return out
