"""Attention knockout: block attention edges between position groups at chosen layers (Geva et al. 2023).

An edge ``Q->K`` stops every query position of group Q from attending to every key position of group K in the
attention of the chosen decoder blocks; nothing else changes. Unlike replacing latent vectors with noise or
constants, a knockout puts no off-distribution vector into the model: it asks whether a position is *read* at
all, so it separates information from disruption.

Edges (query group -> key group):

=================  =====================================================================================
``answer->latent``  the answer region (text positions after the latent phase, from the end token on) cannot
                    read the latent positions: "does the answer read the latents?"
``answer->image``   the answer region cannot read the image tokens
``latent->image``   latent steps cannot read the image tokens: "do the latents look at the image?"
=================  =====================================================================================

``layers`` are decoder blocks 0..N-1 (the attention inside block b, which reads ``hidden_states[b]``); the
default is every block. Knockouts act on decode steps only (no query of these groups is in the prompt) and are
applied by editing the attention mask each chosen block's attention receives -- a boolean mask under ``sdpa``, an
additive one under ``eager`` -- so both give the same result, and a step where nothing is blocked runs
untouched (knocking out nothing is the clean run exactly).

A knockout is an intervention (``target = "attention"``): `latentprobe.runs.intervene.intervene` runs it like a
latent intervention, from the clean prefill, and its rows enter the same effects and mediation tables, named
e.g. ``knockout[answer->latent]@layers[all]``.

>>> knockout = AttentionKnockout(["answer->latent"], layers=[0, 1])
>>> knockout.name
'knockout[answer->latent]@layers[0,1]'
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..model.decoding import LATENT, TEXT, LatentDecoder, StepContext
from ..errors import LatentProbeError
from . import BoundEdit, LatentIntervention, RowBinding
from ..model.backbones import attention_module
from ..model.sites import backbone_parts

QUERY_GROUPS = ("answer", "latent")
KEY_GROUPS = ("latent", "image")
EDGES = ("answer->latent", "answer->image", "latent->image")


def parse_edge(text: str) -> tuple[str, str]:
    """``"answer->latent"`` -> ``("answer", "latent")``; anything else is a clear error."""
    parts = [p.strip() for p in str(text).split("->")]
    if len(parts) != 2 or f"{parts[0]}->{parts[1]}" not in EDGES:
        raise LatentProbeError(f"unknown attention edge {text!r}", f"use one of {', '.join(EDGES)}")
    return parts[0], parts[1]


class AttentionKnockout(LatentIntervention):
    """Block attention edges (``answer->latent``, ``answer->image``, ``latent->image``) in chosen blocks.

    Parameters
    ----------
    edges : sequence of str
        One or more edges, blocked together.
    layers : sequence of int, optional
        Decoder blocks 0..N-1 whose attention is edited (None: every block).
    """

    target = "attention"
    kind = "knockout"

    @property
    def needs_images(self) -> bool:  # an edge into the image tokens needs a model that has them
        return any(edge.endswith("->image") for edge in self.edges)

    def __init__(self, edges: Sequence[str], layers: Sequence[int] | None = None, seed: int = 0):
        super().__init__(steps=None, layer=None, semantics="recompute", seed=seed)
        if isinstance(edges, str):
            edges = [edges]
        if not edges:
            raise LatentProbeError("a knockout needs at least one edge", f"use one of {', '.join(EDGES)}")
        self.edges = tuple(dict.fromkeys(f"{q}->{k}" for q, k in (parse_edge(e) for e in edges)))
        if layers is not None:
            layers = list(layers)
            for layer in layers:
                if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                    raise LatentProbeError(f"knockout layer {layer!r} is not a block index",
                                           "give decoder blocks 0..N-1 (the attention inside block b)")
            if not layers:
                raise LatentProbeError("an empty list of knockout layers", "leave it out for every block")
        self.layers = None if layers is None else tuple(sorted(set(layers)))

    @property
    def name(self) -> str:
        layers = "all" if self.layers is None else ",".join(str(l) for l in self.layers)
        return f"knockout[{'+'.join(self.edges)}]@layers[{layers}]"

    def params(self):
        return {"edges": list(self.edges), "layers": "all" if self.layers is None else list(self.layers)}

    def transform(self, vectors, steps, binding):
        return vectors  # a knockout edits attention, never the fed-back vectors

    def check_subject(self, subject):
        """Refuse, before any model runs, a subject without a latent phase or a block it does not have."""
        if subject.protocol is None:
            raise LatentProbeError(f"{self.name}: subject {subject.name} has no latent phase, so it has no latent "
                                   "positions or answer region to knock out",
                                   "use a latent subject (monet, lvr, mirage, the latent organisms)")
        n = subject.num_layers
        if self.layers is not None and max(self.layers) >= n:
            raise LatentProbeError(f"{self.name}: block {max(self.layers)} does not exist ({subject.name} has {n})",
                                   f"use blocks 0..{n - 1}")

    def block_indices(self, num_layers: int) -> tuple[int, ...]:
        return tuple(range(num_layers)) if self.layers is None else self.layers


def make_knockouts(kinds: Sequence[str], layers: Sequence[int] | None = None, seed: int = 0
                   ) -> list[AttentionKnockout]:
    """Knockouts from command-line kinds: each kind is an edge (``answer->latent``), several joined with ``+``
    (blocked together), or ``knockout`` for each of the three edges separately."""
    out: list[AttentionKnockout] = []
    for kind in kinds:
        kind = kind.strip()
        if kind == "knockout":
            out += [AttentionKnockout([edge], layers=layers, seed=seed) for edge in EDGES]
        else:
            out.append(AttentionKnockout(kind.split("+"), layers=layers, seed=seed))
    if not out:
        raise LatentProbeError("no knockout given", f"pass --kind with edges ({', '.join(EDGES)}) or knockout")
    unique = {}
    for iv in out:
        unique.setdefault(iv.name, iv)
    return list(unique.values())


class KnockoutHooks:
    """While active, rows whose edit is a bound `AttentionKnockout` have their edges blocked (a context manager
    used around `LatentDecoder.decode`, with the same per-row edits list, like `LayerEditHooks`)."""

    def __init__(self, decoder: LatentDecoder, row_edits: Sequence):
        self.decoder = decoder
        self.row_edits = list(row_edits)
        self.handles = []
        self.blocked: dict[int, torch.Tensor] = {}
        self.rows = [r for r, e in enumerate(self.row_edits)
                     if isinstance(e, BoundEdit) and isinstance(e.intervention, AttentionKnockout)]

    def __enter__(self):
        if not self.rows:
            return self
        blocks, _ = backbone_parts(self.decoder.model)
        n = len(blocks)
        bsz = len(self.row_edits)
        self.edge_rows = {edge: torch.zeros(bsz, dtype=torch.bool) for edge in EDGES}
        self.layer_rows = torch.zeros((n, bsz), dtype=torch.bool)
        for r in self.rows:
            knockout = self.row_edits[r].intervention
            for edge in knockout.edges:
                self.edge_rows[edge][r] = True
            for layer in knockout.block_indices(n):
                if layer >= n:
                    raise LatentProbeError(f"{knockout.name}: block {layer} does not exist (the model has {n})",
                                           f"use blocks 0..{n - 1}")
                self.layer_rows[layer, r] = True
        # blocks whose knocked-out rows are the same share one mask per step (one computation, no host syncs)
        self.patterns: dict[tuple[bool, ...], list[int]] = {}
        for layer in range(n):
            if self.layer_rows[layer].any():
                self.patterns.setdefault(tuple(self.layer_rows[layer].tolist()), []).append(layer)
        self._on_device = None
        self.implementation = getattr(self.decoder.model.config, "_attn_implementation", "eager")
        for layer in range(n):
            if self.layer_rows[layer].any():
                attention = attention_module(self.decoder.model, blocks[layer])
                if attention is None:
                    raise LatentProbeError(f"block {layer} has no self-attention module to knock out",
                                           "register the backbone's attention module name with "
                                           "latentprobe.model.backbones.register_backbone(attention=...)")
                self.handles.append(attention.register_forward_pre_hook(self._hook(layer), with_kwargs=True))
        remove = self.decoder.add_step_listener(self._on_step)
        self.handles.append(type("Remover", (), {"remove": staticmethod(remove)})())
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _on_step(self, ctx: StepContext):
        """Which keys each row may not read at this step, per block (nothing at the prefill)."""
        self.blocked = {}
        if ctx.is_prefill or ctx.latent_keys is None:
            return
        device = ctx.kinds.device
        length = ctx.latent_keys.shape[1]
        keys = {"latent": ctx.latent_keys.bool(), "image": torch.zeros_like(ctx.latent_keys, dtype=torch.bool)}
        if ctx.image_keys is not None:
            keys["image"][:, : ctx.image_keys.shape[1]] = ctx.image_keys.bool()
        queries = {"answer": (ctx.kinds == TEXT) & ctx.after_latent, "latent": ctx.kinds == LATENT}
        if len(ctx.kinds) != len(self.row_edits):
            raise LatentProbeError(f"{len(self.row_edits)} edits given for a decode of {len(ctx.kinds)} rows",
                                   "pass one edit per decoded row (prompt rows x repeats)")
        if self._on_device is None:  # move the per-row facts to the model's device once
            self._on_device = ({e: r.to(device) for e, r in self.edge_rows.items() if r.any()},
                               [(torch.tensor(p, device=device).unsqueeze(1), layers) for p, layers in self.patterns.items()])
        edge_rows, patterns = self._on_device
        blocked = torch.zeros((len(ctx.kinds), length), dtype=torch.bool, device=device)
        for edge, rows in edge_rows.items():
            query, key = edge.split("->")
            blocked |= (rows & queries[query]).unsqueeze(1) & keys[key]
        if not blocked.any():  # one host sync per step: a step with nothing blocked runs untouched
            return
        for rows, layers in patterns:
            mask = blocked & rows
            for layer in layers:
                self.blocked[layer] = mask

    def _hook(self, layer: int):
        def hook(module, args, kwargs):
            blocked = self.blocked.get(layer)
            ctx = self.decoder.context
            if blocked is None or ctx is None or ctx.is_prefill:
                return None  # untouched: knocking out nothing is the clean run exactly
            kwargs = dict(kwargs)
            kwargs["attention_mask"] = knock_out(kwargs.get("attention_mask"), blocked, self.implementation,
                                                 args[0] if args else kwargs["hidden_states"])
            return args, kwargs

        return hook


def knock_out(mask: torch.Tensor | None, blocked: torch.Tensor, implementation: str,
              hidden: torch.Tensor) -> torch.Tensor:
    """The attention mask with ``blocked`` (B, keys) keys removed for every query: a boolean mask (True =
    attend, sdpa and flex) stays boolean, an additive float mask (eager) gets the dtype's minimum."""
    bsz, q_len = hidden.shape[0], hidden.shape[1]
    if mask is None:  # sdpa skipped an all-visible causal mask; a decode step (q_len 1) sees every key
        if q_len != 1:
            raise LatentProbeError("attention knockout in a multi-token step without an explicit mask",
                                   "knockouts act on decode steps; report this as a bug")
        if implementation == "eager":
            mask = torch.zeros((bsz, 1, 1, blocked.shape[1]), dtype=hidden.dtype, device=hidden.device)
        else:
            mask = torch.ones((bsz, 1, 1, blocked.shape[1]), dtype=torch.bool, device=hidden.device)
    if mask.shape[-1] < blocked.shape[1]:
        raise LatentProbeError(f"the attention mask covers {mask.shape[-1]} keys but {blocked.shape[1]} were seen",
                               "report this as a bug (cache and mask disagree)")
    if mask.shape[-1] > blocked.shape[1]:  # a preallocated (static) cache: later slots are never blocked here
        pad = torch.zeros((blocked.shape[0], mask.shape[-1] - blocked.shape[1]), dtype=torch.bool,
                          device=blocked.device)
        blocked = torch.cat([blocked, pad], dim=1)
    if mask.shape[0] != bsz:
        mask = mask.expand(bsz, *mask.shape[1:])
    where = blocked.view(bsz, 1, 1, -1).to(mask.device)
    if mask.dtype == torch.bool:
        return mask & ~where
    return mask.masked_fill(where, torch.finfo(mask.dtype).min)


def run_knockout(decoder: LatentDecoder, batch, knockout: AttentionKnockout | None, prefill=None):
    """Decode ``batch`` (or a given prefill of it) with ``knockout`` applied to every row (None: no knockout)."""
    prefill = prefill if prefill is not None else decoder.prefill(batch)
    if knockout is None:
        return decoder.decode(prefill)
    edits = [knockout.bind(RowBinding(instance_id=iid)) for iid in prefill.batch.instance_ids]
    with KnockoutHooks(decoder, edits):
        return decoder.decode(prefill, edits)


__all__ = ["AttentionKnockout", "KnockoutHooks", "make_knockouts", "parse_edge", "knock_out", "run_knockout", "EDGES"]
