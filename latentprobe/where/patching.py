"""Activation patching maps: which state, at which layer and latent step, carries what the answer uses.

For every instance there are two reference runs, *clean* (input x0) and *corrupted* (x1: the image swapped for
another instance's, or ROME-style noise on the image-token embeddings). A patching cell is one `Site`; patching it
means running one of the two inputs while the state at that site is taken from the other run:

* ``denoise``: run the corrupted input, restore the clean state at the site, and measure how much of the clean
  answer comes back: ``recovery = (p_patched - p_corrupt) / (p_clean - p_corrupt)`` (0 = as corrupted,
  1 = as clean);
* ``noise``: run the clean input, insert the corrupted state, and measure the damage:
  ``damage = (p_clean - p_patched) / (p_clean - p_corrupt)`` (0 = as clean, 1 = as corrupted).

p is the probability of the gold option at the subject's answer slot (renormalised over the options). Where
``|p_clean - p_corrupt| < min_gap`` the ratio means nothing: that instance is excluded from the normalised metric
and counted (``n_excluded``). ``flip_rate`` counts answers (argmax option at the slot) among the instances whose
answer the corruption changed: denoise, the patched answer is the clean one again; noise, it is no longer the
clean one. Means carry percentile bootstrap intervals over instances, flip rates exact (Clopper-Pearson) ones.

The grid (sites are written as in `latentprobe.model.sites`):

* ``latent[k].layer[L]``: one latent step at one layer. Later latent steps are **recomputed** from the patched
  one (the fed-back vectors of steps > k follow), unless ``semantics="pin"``, which feeds the later steps the
  vectors of the run being patched, so the patched state reaches the answer only by being attended to.
* ``latent.layer[L]``, ``answer.layer[L]``: every latent step / every position of the answer region (the text
  positions after the latent phase, aligned by their offset from its end) at once.
* ``image.layer[L]``, ``question.layer[L]``, ``prompt_last.layer[L]``: prompt positions, aligned token by token
  (image tokens in order; ``question`` = the prompt's text tokens except the last one, i.e. the question and
  the chat template around it; ``prompt_last`` = the last prompt token). A row whose clean and corrupted
  prompts do not align (different image sizes) gets no value for these cells.

Cost: the clean and corrupted prompts are prefilled once per batch. Every decode-phase cell (latent steps,
latent, answer) is decoded side by side from that one prefill (`LatentDecoder.decode(prefill, repeats=M)`), so an
L x K grid costs one prefill and one batched decode instead of L x K runs; prompt-phase cells need their own
prefill and are run as one batched prefill per chunk. A ``latent[k]`` cell is the run being patched until step k:
its rows join the decode there, as copies of that run (``join_steps``), and when the map denoises with recomputed
later steps that run is decoded as their trunk instead of on its own (`reference_with_cells`).
``bench/bench_patching.py`` measures the cost.

>>> from latentprobe.model.subjects import load_subject                                        # doctest: +SKIP
>>> result = patch_map(load_subject("organism-bottleneck"), instances, "runs/patch")     # doctest: +SKIP
>>> result.table.query("metric == 'recovery'")                                          # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from ..data.instances import Instance, load_images
from ..model.decoding import LATENT, TEXT, DecodeConfig, DecodeResult, LatentDecoder, StepContext
from ..runs.common import default_instances, progress_bar  # noqa: F401  (default_instances re-exported)
from ..errors import InstanceError, LatentProbeError
from ..interventions.base import _seed_for
from ..model.sites import POSITION_GROUPS, Site, layer_modules
from .hooks import DECODE_GROUPS, PROMPT_GROUPS, _LayerHooks, _register, _Remover, group_positions

log = logging.getLogger(__name__)

DIRECTIONS = ("denoise", "noise")
CORRUPTIONS = ("image-swap", "image-noise", "question-swap")
IMAGE_CORRUPTIONS = ("image-swap", "image-noise")
PROMPT_GROUPS = ("image", "question", "prompt_last")
DECODE_GROUPS = ("latent", "answer")
DEFAULT_GROUPS = ("image", "question", "prompt_last", "latent", "answer")
METRIC_OF = {"denoise": "recovery", "noise": "damage"}  # on the gold probability
LOGODDS_METRIC_OF = {"denoise": "recovery_logodds", "noise": "damage_logodds"}  # on the gold log-odds
SUMMARY_COLUMNS = ["subject", "method", "direction", "corruption", "semantics", "site", "layer", "group", "step",
                   "metric", "estimate", "ci_low", "ci_high", "n", "n_excluded", "seed"]


# ------------------------------------------------------------------------------------------------ the grid
@dataclass(frozen=True)
class PatchGrid:
    """The sites of one patching map: every (layer, latent step) and every (layer, position group), or only the
    sites in ``only`` (e.g. the ones attribution patching ranked highest)."""

    layers: tuple[int, ...]
    steps: tuple[int, ...]
    groups: tuple[str, ...]
    only: tuple[Site, ...] | None = None

    def step_sites(self) -> list[Site]:
        return [s for s in (Site("latent", layer, step) for layer in self.layers for step in self.steps)
                if self.only is None or s in self.only]

    def group_sites(self) -> list[Site]:
        return [s for s in (Site(group, layer) for layer in self.layers for group in self.groups)
                if self.only is None or s in self.only]

    def sites(self) -> list[Site]:
        return self.step_sites() + self.group_sites()

    def describe(self) -> dict:
        out = {"layers": list(self.layers), "steps": list(self.steps), "groups": list(self.groups)}
        return out if self.only is None else {**out, "sites": [str(s) for s in self.only]}


def grid_of_sites(subject, sites: Sequence[Site | str], config: DecodeConfig | None = None) -> PatchGrid:
    """A grid holding exactly ``sites`` (strings like ``latent[2].layer[14]`` or `Site` objects), each checked
    against the subject as `resolve_grid` checks a full grid."""
    parsed = tuple(dict.fromkeys(s if isinstance(s, Site) else Site.parse(s) for s in sites))
    if not parsed:
        raise LatentProbeError("no sites given", "name sites like latent[2].layer[14] or image.layer[3]")
    for site in parsed:
        if site.group == "answer" and site.step is not None:
            raise LatentProbeError(f"site {site}: single answer positions are not patched one by one",
                                   "use answer.layer[L] (the whole answer region)")
    steps = sorted({s.step for s in parsed if s.group == "latent" and s.step is not None})
    groups = [g for g in POSITION_GROUPS if any(s.group == g and s.step is None for s in parsed)]
    full = resolve_grid(subject, sorted({s.layer for s in parsed}), steps, groups, config)
    return dataclasses.replace(full, only=parsed)


def top_attribution_sites(table: pd.DataFrame, k: int = 10, direction: str = "denoise") -> list[Site]:
    """The ``k`` sites with the largest |attribution estimate| in a patching summary: what to patch exactly when
    the full map is too large (a 7B model at every layer)."""
    if k < 1:
        raise LatentProbeError(f"k must be >= 1, got {k}", "ask for at least one site")
    rows = table[(table.method == "attribution") & (table.direction == direction)
                 & (table.metric == LOGODDS_METRIC_OF.get(direction, ""))].dropna(subset=["estimate"])
    if rows.empty:
        raise LatentProbeError(f"no attribution estimates for direction {direction!r} in this table",
                               "run patch_map with attribution=True first")
    ranked = rows.assign(size=rows.estimate.abs()).sort_values("size", ascending=False)
    return [Site.parse(s) for s in ranked.site.head(k)]


def resolve_grid(subject, layers: Sequence[int] | str | None = None, steps: Sequence[int] | None = None,
                 groups: Sequence[str] | None = None, config: DecodeConfig | None = None) -> PatchGrid:
    """Check a requested grid against the subject and fill in the defaults (every layer, step and group).

    Raises `LatentProbeError` for a layer outside 0..N, a step outside the protocol's latent steps, an unknown
    position group, or latent steps asked of a subject without a latent phase -- before any model runs.
    """
    n_layers = subject.num_layers
    if layers is None or layers == "all":
        layers = list(range(n_layers + 1))
    layers = _as_int_list(layers, "layer")
    for layer in layers:
        if not 0 <= layer <= n_layers:
            raise LatentProbeError(f"patching layer {layer} is out of range: {subject.name} has {n_layers} blocks",
                                   f"use layers 0..{n_layers} (0 = embeddings / fed-back vector, {n_layers} = final norm)")
    latent = subject.protocol is not None
    # None: the protocol's K (or cap); 0: no latent step (one rule with DecodeConfig and the CLI)
    configured = config.latent_steps if config is not None else None
    max_steps = (subject.protocol.num_steps if configured is None else configured) if latent else 0
    if steps is None:
        steps = list(range(max_steps))
    steps = _as_int_list(steps, "step")
    if steps and not latent:
        raise LatentProbeError(f"latent steps {steps} asked of {subject.name}, which has no latent phase",
                               "leave --steps out (and use --groups image,question,prompt_last) for this subject")
    for step in steps:
        if not 0 <= step < max_steps:
            raise LatentProbeError(f"latent step {step} is out of range: {subject.name} runs at most "
                                   f"{max_steps} latent steps", f"use steps 0..{max_steps - 1}")
    if groups is None:
        groups = [g for g in DEFAULT_GROUPS if (latent or g in PROMPT_GROUPS)
                  and not (g == "image" and subject.text_only)]  # a text model has no image group
    groups = [str(g).strip() for g in groups if str(g).strip()]
    if "image" in groups and subject.text_only:
        from ..model.backbones import require_images

        require_images(subject, "the image position group")
    for group in groups:
        if group not in POSITION_GROUPS:
            raise LatentProbeError(f"unknown position group {group!r}", f"use some of {', '.join(POSITION_GROUPS)}")
        if group in DECODE_GROUPS and not latent:
            raise LatentProbeError(f"position group {group!r} needs a latent phase, and {subject.name} has none",
                                   "use --groups image,question,prompt_last for this subject")
    if not layers or not (steps or groups):
        raise LatentProbeError("the patching grid is empty", "give at least one layer and one step or group")
    return PatchGrid(tuple(sorted(set(layers))), tuple(sorted(set(steps))), tuple(dict.fromkeys(groups)))


def _as_int_list(values, what: str) -> list[int]:
    out = []
    for value in values:
        if isinstance(value, bool) or not float(value).is_integer():
            raise LatentProbeError(f"patching {what} {value!r} is not an integer", f"give whole numbers for {what}s")
        out.append(int(value))
    return out


def check_patch_request(subject, grid: PatchGrid, n_instances: int, directions: Sequence[str], corruption: str,
                        noise_scale: float, min_gap: float, semantics: str):
    """Refuse, before any model runs, whatever the patching run cannot do."""
    if n_instances < 1:
        raise LatentProbeError("the dataset is empty", "pass data with at least one instance")
    if corruption not in CORRUPTIONS:
        raise LatentProbeError(f"unknown corruption {corruption!r}", f"use one of {', '.join(CORRUPTIONS)}")
    if corruption in IMAGE_CORRUPTIONS and getattr(subject, "text_only", False):
        from ..model.backbones import require_images

        require_images(subject, f"the {corruption} corruption")
    if corruption in ("image-swap", "question-swap") and n_instances < 2:
        raise LatentProbeError(f"{corruption} needs another instance to take from, but there is only one instance",
                               "run on at least two instances" + (", or use --corruption image-noise"
                                                                  if corruption == "image-swap" else ""))
    for direction in directions:
        if direction not in DIRECTIONS:
            raise LatentProbeError(f"unknown patching direction {direction!r}", f"use {' or '.join(DIRECTIONS)}")
    if not directions:
        raise LatentProbeError("no patching direction given", "use denoise, noise or both")
    if not np.isfinite(noise_scale) or noise_scale <= 0:
        raise LatentProbeError(f"noise scale must be a positive number, got {noise_scale}",
                               "ROME's strong corruption is 3 (x the image-embedding std)")
    if not np.isfinite(min_gap) or not 0 < min_gap < 1:  # 0 would divide by gaps of ~1e-9 and report noise
        raise LatentProbeError(f"min_gap must be in (0, 1), got {min_gap}",
                               "it is the smallest |p_clean - p_corrupt| a normalised metric is computed for")
    if semantics not in ("recompute", "pin"):
        raise LatentProbeError(f"unknown semantics {semantics!r}", "use recompute or pin")


# ----------------------------------------------------------------------------------------- reference runs
@dataclass
class RunStates:
    """One reference run's outcome and its states at every grid layer (on the model's device)."""

    result: DecodeResult
    batch: Any  # the PromptBatch that was prefilled
    prefill: Any  # the Prefill, reusable for the patched decodes
    layers: tuple[int, ...]
    prompt: dict[int, torch.Tensor]  # layer -> (B, T, D) prompt states
    latent: torch.Tensor  # (B, K, n_layers, D) states at latent steps
    latent_count: torch.Tensor  # (B,)
    answer: torch.Tensor  # (B, A, n_layers, D) states at answer positions (offset from the latent phase's end)
    answer_count: torch.Tensor  # (B,)
    # per decode step t: the decoder's StepContext fields and the exact key mask and positions it ran with
    step_kinds: list[torch.Tensor] = field(default_factory=list)
    step_latent_index: list[torch.Tensor] = field(default_factory=list)
    step_after_latent: list[torch.Tensor] = field(default_factory=list)
    step_attention: list[torch.Tensor] = field(default_factory=list)
    step_positions: list[torch.Tensor] = field(default_factory=list)

    def layer_pos(self, layer: int) -> int:
        return self.layers.index(layer)


class _StateCapture(_LayerHooks):
    """Hooks that copy the grid's states during one prefill + decode (the reference runs).

    Only what a grid can read is copied: the grid layers at the latent steps it patches (every latent step when it
    has a whole-phase ``latent`` site), the answer positions only when it has an ``answer`` site, the prompt only
    when asked. Layer 0 is kept at every latent step (``pin`` feeds it). A step with nothing to copy copies
    nothing; the per-step kinds, key masks and positions are always kept (attribution replays them).

    In a decode whose rows join late (`LatentDecoder.decode`'s ``join_steps``) it copies the trunk rows only: the
    unedited run of the prefill, one per prompt row (`reference_with_cells`)."""

    def __init__(self, decoder: LatentDecoder, layers: Sequence[int], prompt: bool,
                 latent_steps: Sequence[int] | None = None, answer: bool = True):
        self.decoder, self.layers, self.prompt_wanted = decoder, tuple(layers), prompt
        self.latent_steps = None if latent_steps is None else sorted(set(latent_steps))
        self.answer_wanted = answer
        self.prompt: dict[int, torch.Tensor] = {}
        self.steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]] = []
        self.handles = []
        self._copy_layers: tuple[int, ...] = ()
        self._trunks: int | None = None  # in a decode with late joins: the trunk rows (the first ones) it copies

    def __enter__(self):
        self.hook_layers(self.layers, self._reader)
        self.handles.append(_Remover(self.decoder.add_step_listener(self._on_step, on_reindex=self._on_reindex)))
        # the key mask and positions of every decode step, as the decoder computed them (attribution replays them)
        self.masks: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._previous_forward = self.decoder.forward_fn
        inner = self._previous_forward or self.decoder.inner_model

        def forward(**kwargs):
            ctx = self.decoder.context
            if ctx is not None and not ctx.is_prefill:
                mask, positions = kwargs["attention_mask"], kwargs["position_ids"]
                if ctx.output_rows is not None:
                    mask, positions = mask[: self._trunks], positions[:, : self._trunks]
                self.masks.append((mask, positions))
            return inner(**kwargs)

        self.decoder.forward_fn = forward
        return self

    def __exit__(self, *exc):
        self.decoder.forward_fn = self._previous_forward
        super().__exit__(*exc)

    def _on_reindex(self, rows: torch.Tensor, index: torch.Tensor | None):
        if index is None:  # a decode with late joins starts: its trunks are its first rows and stay there
            self._trunks = int((rows < 0).sum())

    def _on_step(self, ctx: StepContext):
        if ctx.is_prefill:
            return
        kinds, latent_index, after_latent = ctx.kinds, ctx.latent_index, ctx.after_latent
        if ctx.output_rows is not None:
            kinds, latent_index, after_latent = (t[: self._trunks] for t in (kinds, latent_index, after_latent))
        self.steps.append((kinds.clone(), latent_index.clone(), after_latent.clone(), {}))
        latent = kinds == LATENT
        wanted = latent if self.latent_steps is None else latent & torch.isin(
            latent_index, torch.tensor(self.latent_steps, device=latent.device))
        answer = (kinds == TEXT) & after_latent if self.answer_wanted else torch.zeros_like(latent)
        any_wanted, any_latent = torch.stack([(wanted | answer).any(), latent.any()]).tolist()  # one host read
        self._copy_layers = self.layers if any_wanted else ((0,) if any_latent and 0 in self.layers else ())

    def _reader(self, layer):
        def read(hidden):
            ctx = self.decoder.context
            if ctx is None:
                return None
            if ctx.is_prefill:
                if self.prompt_wanted:
                    self.prompt[layer] = hidden.detach().clone()
            elif self.steps and layer in self._copy_layers:
                rows = slice(None) if ctx.output_rows is None else slice(0, self._trunks)
                self.steps[-1][3][layer] = hidden[rows, -1].detach().clone()
            return None

        return read

    def states(self, result, batch, prefill) -> RunStates:
        bsz = result.sequences.shape[0]
        dim = self.decoder.subject.hidden_size
        device = prefill.hidden.device
        n_layers = len(self.layers)
        if self.steps:
            kinds = torch.stack([s[0] for s in self.steps])  # (T, B)
            index = torch.stack([s[1] for s in self.steps])
            after = torch.stack([s[2] for s in self.steps])
        else:
            kinds = index = torch.zeros((0, bsz), dtype=torch.long, device=device)
            after = torch.zeros((0, bsz), dtype=torch.bool, device=device)
        is_latent = kinds == LATENT
        in_answer = (kinds == TEXT) & after
        latent_count, answer_count = is_latent.sum(dim=0), in_answer.sum(dim=0)
        answer_offset = in_answer.long().cumsum(dim=0) - 1
        width = max(int(latent_count.max()) if bsz else 0, 1)
        latent = torch.zeros((bsz, width, n_layers, dim), device=device)
        answer_width = max(int(answer_count.max()) if bsz else 0, 1) if self.answer_wanted else 0
        answer = torch.zeros((bsz, answer_width, n_layers, dim), device=device)
        for t, (_, _, _, by_layer) in enumerate(self.steps):
            if not by_layer:
                continue
            rows = is_latent[t].nonzero(as_tuple=True)[0]
            answer_rows = in_answer[t].nonzero(as_tuple=True)[0] if self.answer_wanted else rows[:0]
            for layer, states in by_layer.items():
                pos = self.layers.index(layer)
                latent[rows, index[t, rows], pos] = states[rows].float()
                answer[answer_rows, answer_offset[t, answer_rows], pos] = states[answer_rows].float()
        return RunStates(result=result, batch=batch, prefill=prefill, layers=self.layers, prompt=self.prompt,
                         latent=latent, latent_count=latent_count, answer=answer, answer_count=answer_count,
                         step_kinds=[s[0] for s in self.steps], step_latent_index=[s[1] for s in self.steps],
                         step_after_latent=[s[2] for s in self.steps], step_attention=[m[0] for m in self.masks],
                         step_positions=[m[1] for m in self.masks])


class ImageEmbeddingNoise:
    """ROME-style corruption: Gaussian noise of ``scale`` x the per-dimension std of the image-token embeddings
    (over the dataset) added to every image token's input embedding in the prefill, seeded per instance."""

    def __init__(self, decoder: LatentDecoder, dim_std: torch.Tensor, scale: float, seed: int):
        self.decoder, self.dim_std, self.scale, self.seed = decoder, dim_std, float(scale), seed
        self.handle = None
        self.name = f"image-noise(scale={self.scale:g},rel=std)"

    def __enter__(self):
        block0, is_pre = layer_modules(self.decoder.model, self.decoder.subject.num_layers)[0]
        self.handle = _register(block0, is_pre, self._add)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def _add(self, hidden):
        ctx = self.decoder.context
        if ctx is None or not ctx.is_prefill or ctx.prefill_image_mask is None:
            return None
        out = hidden.clone()
        for r, iid in enumerate(ctx.instance_ids):
            where = ctx.prefill_image_mask[r].nonzero(as_tuple=True)[0]
            if len(where):
                gen = torch.Generator().manual_seed(_seed_for(self.seed, iid, "image-embedding-noise"))
                draw = torch.randn((len(where), hidden.shape[-1]), generator=gen)
                out[r, where] += (self.scale * self.dim_std.cpu() * draw).to(out)
        return out


def image_embedding_std(subject, instances: Sequence[Instance], batch_size: int = 16) -> torch.Tensor:
    """Per-dimension std of the vision tower's merged image-token features over ``instances`` (the input
    embeddings of the image tokens): the reference scale of ROME-style image noise."""
    features = []
    model = subject.model.model
    with torch.no_grad():
        for start in range(0, len(instances), batch_size):
            chunk = instances[start:start + batch_size]
            images = [img for inst in chunk for img in _safe_images(inst) or []]
            if not images:
                continue
            processed = subject.image_processor(images=images, return_tensors="pt")
            out = model.get_image_features(processed["pixel_values"].to(subject.device),
                                           processed["image_grid_thw"].to(subject.device))
            pooled = out.pooler_output if hasattr(out, "pooler_output") else out
            features += [f.float().reshape(-1, f.shape[-1]).cpu() for f in pooled]
    if not features or sum(len(f) for f in features) < 2:
        raise LatentProbeError("image-noise needs image tokens, and these instances have none",
                               "use instances with images, or --corruption image-swap")
    return torch.cat(features).std(dim=0)


def _safe_images(inst):
    try:
        return load_images(inst)
    except InstanceError:
        return None


# ------------------------------------------------------------------------------------------ patched runs
_STEP, _ALL_LATENT, _ANSWER = 0, 1, 2


class DecodePatcher(_LayerHooks):
    """Patch decode-phase sites while a prefill is decoded ``repeats`` times side by side: row b*M + c of the
    decoded batch is instance b with cell ``cells[c]`` restored from ``source`` (``base`` is the run being
    patched: its latents are what ``pin`` feeds to later steps). It follows a decode whose rows join late
    (`join_steps`): a cell at latent step k acts only from that step on, and the trunk rows are never patched."""

    def __init__(self, decoder: LatentDecoder, cells: Sequence[Site], source: RunStates, base: RunStates,
                 pin: bool = False):
        self.decoder, self.cells, self.source, self.base, self.pin = decoder, list(cells), source, base, pin
        self.handles = []
        self.writes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __enter__(self):
        device = self.source.latent.device
        m = len(self.cells)
        bsz = self.source.latent.shape[0]
        kind = [(_STEP if c.step is not None else _ALL_LATENT) if c.group == "latent" else _ANSWER for c in self.cells]
        self.row_instance = torch.arange(bsz * m, device=device) // m
        self.cell_layer = torch.tensor([c.layer for c in self.cells], device=device).repeat(bsz)
        self.cell_kind = torch.tensor(kind, device=device).repeat(bsz)
        self.cell_step = torch.tensor([-1 if c.step is None else c.step for c in self.cells], device=device).repeat(bsz)
        self.answer_seen = torch.zeros(bsz * m, dtype=torch.long, device=device)
        layers = sorted({c.layer for c in self.cells} | ({0} if self.pin else set()))
        self.hook_layers(layers, self._writer)
        self.handles.append(_Remover(self.decoder.add_step_listener(self._on_step, on_reindex=self._on_reindex)))
        return self

    def join_steps(self, bsz: int) -> list[int]:
        """Per decoded row (instance b, cell c at row b*M + c): the latent step before which it is the unpatched
        run (a ``latent[k]`` cell: k; a whole-phase or answer cell: 0), for `LatentDecoder.decode`."""
        return [c.step if c.group == "latent" and c.step is not None else 0 for _ in range(bsz) for c in self.cells]

    def _on_reindex(self, rows: torch.Tensor, index: torch.Tensor | None):
        self.answer_seen = torch.zeros(len(rows), dtype=torch.long, device=rows.device) if index is None \
            else self.answer_seen[index]

    def _on_step(self, ctx: StepContext):
        self.writes = {}
        if ctx.is_prefill:
            return
        if ctx.step == 0:
            if len(self.answer_seen) != len(ctx.kinds):
                self.answer_seen = torch.zeros(len(ctx.kinds), dtype=torch.long, device=ctx.kinds.device)
            self.answer_seen.zero_()
        kinds, index = ctx.kinds, ctx.latent_index
        b, cell_kind, cell_step, cell_layer = self.row_instance, self.cell_kind, self.cell_step, self.cell_layer
        if ctx.output_rows is not None:  # rows joining late: decoded row -> output row (-1, a trunk: never patched)
            logical = ctx.output_rows.clamp(min=0)
            b, cell_step, cell_layer = b[logical], cell_step[logical], cell_layer[logical]
            cell_kind = cell_kind[logical].masked_fill(ctx.output_rows < 0, -1)
        in_answer = (kinds == TEXT) & ctx.after_latent
        offset = self.answer_seen.clone()
        self.answer_seen += in_answer.long()
        is_latent = kinds == LATENT
        latent_hit = is_latent & (((cell_kind == _STEP) & (index == cell_step)) | (cell_kind == _ALL_LATENT))
        latent_hit &= index < self.source.latent_count[b]
        answer_hit = in_answer & (cell_kind == _ANSWER) & (offset < self.source.answer_count[b])
        pinned = None
        if self.pin:
            pinned = is_latent & (cell_kind == _STEP) & (index > cell_step) & (index < self.base.latent_count[b])
        for layer in self.source.layers:
            rows_l = (latent_hit & (cell_layer == layer)).nonzero(as_tuple=True)[0]
            rows_a = (answer_hit & (cell_layer == layer)).nonzero(as_tuple=True)[0]
            pos = self.source.layer_pos(layer)
            rows, vectors = [], []
            if len(rows_l):
                rows.append(rows_l)
                vectors.append(self.source.latent[b[rows_l], index[rows_l], pos])
            if len(rows_a):
                rows.append(rows_a)
                vectors.append(self.source.answer[b[rows_a], offset[rows_a], pos])
            if layer == 0 and pinned is not None:
                rows_p = pinned.nonzero(as_tuple=True)[0]
                if len(rows_p):
                    rows.append(rows_p)
                    vectors.append(self.base.latent[b[rows_p], index[rows_p], self.base.layer_pos(0)])
            if rows:
                self.writes[layer] = (torch.cat(rows), torch.cat(vectors))

    def _writer(self, layer):
        def write(hidden):
            ctx = self.decoder.context
            if ctx is None or ctx.is_prefill or layer not in self.writes:
                return None
            rows, vectors = self.writes[layer]
            out = hidden.clone()
            out[rows, -1] = vectors.to(out.dtype)
            return out

        return write


class PrefillPatcher(_LayerHooks):
    """Patch prompt-phase sites in a prefill of ``base_batch.repeat(M)``: row b*M + c is instance b with the
    positions of ``cells[c]`` at its layer taken from ``source`` (aligned token by token)."""

    def __init__(self, decoder: LatentDecoder, cells: Sequence[Site], source: RunStates, base_batch):
        self.decoder, self.cells, self.source = decoder, list(cells), source
        self.handles = []
        m = len(cells)
        bsz = base_batch.batch_size
        self.plan: dict[int, list[tuple[int, torch.Tensor, int, torch.Tensor]]] = {}
        self.misaligned: set[tuple[int, int]] = set()  # (instance row, cell index)
        for b in range(bsz):
            for c, cell in enumerate(self.cells):
                target = group_positions(base_batch, b, cell.group)
                origin = group_positions(source.batch, b, cell.group)
                if len(target) != len(origin):
                    self.misaligned.add((b, c))
                    continue
                self.plan.setdefault(cell.layer, []).append((b * m + c, target, b, origin))

    def __enter__(self):
        self.hook_layers(sorted(self.plan), self._writer)
        return self

    def _writer(self, layer):
        def write(hidden):
            ctx = self.decoder.context
            if ctx is None or not ctx.is_prefill:
                return None
            out = hidden.clone()
            states = self.source.prompt[layer]
            for row, target, b, origin in self.plan[layer]:
                out[row, target] = states[b, origin].to(out.dtype)
            return out

        return write


# --------------------------------------------------------------------------------------------- the runner
@dataclass
class PatchResult:
    """Everything one patching run produced (also written to ``out_dir``)."""

    rows: pd.DataFrame  # one row per instance x direction x site (and method)
    table: pd.DataFrame  # tidy summary, SUMMARY_COLUMNS
    agreement: pd.DataFrame  # attribution vs exact: Spearman rank correlation per direction
    grid: PatchGrid
    out_dir: str | None = None
    figures: list[str] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = []
        for direction in self.table.direction.unique():
            exact = self.table[(self.table.direction == direction) & (self.table.method == "exact")
                               & (self.table.metric == METRIC_OF[direction])]
            shown = exact.dropna(subset=["estimate"]).sort_values("estimate", ascending=False)
            if shown.empty:
                excluded = int(exact.n_excluded.max()) if len(exact) else 0
                out.append(f"{direction:<8} no instance left: the corruption moved p_gold by less than min_gap in "
                           f"all {excluded} (use another corruption, or a subject that reads the image)")
            for row in shown.head(5).itertuples():
                from ..stats.effects import interval_text

                out.append(f"{direction:<8} {row.site:<24} {row.metric:<9} "
                           f"{interval_text(row.estimate, row.ci_low, row.ci_high, row.n)} n={row.n} "
                           f"(excluded {row.n_excluded})")
        for row in self.agreement.dropna(subset=["spearman_rho"]).itertuples():
            out.append(f"attribution vs exact ({row.direction}): Spearman rho {row.spearman_rho:+.3f} "
                       f"over {row.n_sites} sites")
        if self.failures:
            out.append(f"skipped   {len(self.failures)} instances (e.g. {self.failures[0][0]}: {self.failures[0][1]})")
        if self.out_dir:
            out.append(f"results   {self.out_dir}/patching_summary.csv")
        return out


def patch_map(subject, instances: Sequence[Instance], out_dir: str | Path | None = None, *,
              layers: Sequence[int] | str | None = None, steps: Sequence[int] | None = None,
              groups: Sequence[str] | None = None, sites: Sequence[Site | str] | None = None,
              directions: Sequence[str] = DIRECTIONS, corruption: str = "image-swap", noise_scale: float = 3.0, semantics: str = "recompute",
              min_gap: float = 0.05, attribution: bool = True, config: DecodeConfig | None = None,
              batch_size: int = 8, max_rows: int = 512, seed: int = 0, n_boot: int = 1000,
              progress: bool = False, resume: bool = False) -> PatchResult:
    """Exact activation patching over the (layer x latent step) and (layer x position group) grid, both
    directions, plus attribution patching (one forward/backward pair per run) where ``attribution``.

    Parameters
    ----------
    subject : Subject
    instances : sequence of Instance
    out_dir : path, optional
        Where ``patching_rows.parquet``, ``patching_summary.parquet/.csv``, ``patching_agreement.csv``, the
        heatmaps and ``patching_manifest.json`` go (nothing is written when None).
    layers, steps, groups :
        The grid (defaults: every layer 0..N, every latent step, every position group).
    sites : sequence of Site or str, optional
        Patch exactly these sites instead of a grid (e.g. `top_attribution_sites` of a cheaper run).
    directions : ``denoise`` and/or ``noise``.
    corruption : ``image-swap`` (another instance's image, a seeded derangement), ``image-noise``
        (``noise_scale`` x the per-dimension std of the image-token embeddings) or ``question-swap`` (another
        instance's question, options and template kept: the corruption for text subjects).
    semantics : ``recompute`` (later latent steps follow the patched one) or ``pin`` (they keep the values of
        the run being patched).
    min_gap : instances with ``|p_clean - p_corrupt| < min_gap`` are excluded from recovery / damage.
    max_rows : at most this many rows decoded side by side (bounds memory on large models).
    resume : continue an interrupted run in ``out_dir`` (the same settings; finished batches are read back, the
        others computed: the tables equal an uninterrupted run's).

    Returns
    -------
    PatchResult
    """
    import time

    started = time.time()
    config = config or DecodeConfig(max_new_tokens=subject.max_new_tokens, seed=seed)
    instances = list(instances)
    grid = grid_of_sites(subject, sites, config) if sites is not None else resolve_grid(subject, layers, steps, groups,
                                                                                       config)
    directions = tuple(dict.fromkeys(directions))
    check_patch_request(subject, grid, len(instances), directions, corruption, noise_scale, min_gap, semantics)
    if batch_size < 1 or max_rows < 1:
        raise LatentProbeError(f"batch_size and max_rows must be >= 1 (got {batch_size}, {max_rows})",
                               "pass positive numbers")
    if not (n_boot >= 1 and float(n_boot).is_integer()):  # used only at the end, after every model pass
        raise LatentProbeError(f"n_boot must be an integer >= 1, got {n_boot}", "pass a positive bootstrap count")
    lock = journal = None
    if out_dir is not None:  # a new folder (or, resuming, its own run), held against a second writer
        from ..runs.folders import RunFolderLock
        from ..runs.journal import ChunkJournal, prepare_resumable_folder

        lock = RunFolderLock(prepare_resumable_folder(out_dir, "patch", resume))
    try:
        if out_dir is not None:
            journal = ChunkJournal(out_dir, "patch", {
                "subject_fingerprint": subject.fingerprint(), "instance_ids": [i.id for i in instances],
                "grid": grid.describe(), "directions": list(directions), "corruption": corruption,
                "noise_scale": noise_scale, "semantics": semantics, "min_gap": min_gap, "attribution": attribution,
                "decode": asdict(config), "batch_size": batch_size, "max_rows": max_rows, "seed": seed}, resume)
        return _patch_into(subject, instances, out_dir, grid, directions, corruption, noise_scale, semantics,
                           min_gap, attribution, config, batch_size, max_rows, seed, n_boot, progress, started,
                           journal)
    finally:
        if lock is not None:
            lock.release()


def _patch_into(subject, instances, out_dir, grid, directions, corruption, noise_scale, semantics, min_gap,
                attribution, config, batch_size, max_rows, seed, n_boot, progress, started,
                journal=None) -> PatchResult:
    import time

    from ..interventions import derangement

    decoder = LatentDecoder(subject, config)
    noise = None
    if corruption == "image-noise":
        noise = ImageEmbeddingNoise(decoder, image_embedding_std(subject, instances), noise_scale, seed)
    corruption_name = noise.name if noise is not None else corruption
    swaps = corruption in ("image-swap", "question-swap")
    donors = derangement(len(instances), seed) if swaps else list(range(len(instances)))
    by_id = {inst.id: inst for inst in instances}
    failures: list[tuple[str, str]] = []
    usable = []
    for inst in instances:  # each image read once here to refuse the unreadable; kept only for its own chunk
        images = _safe_images(inst)
        if images is None:
            failures.append((inst.id, "unreadable image"))
            continue
        if not images and corruption in IMAGE_CORRUPTIONS:
            failures.append((inst.id, "no image to corrupt"))
            continue
        usable.append(inst)
        del images  # holding every instance's decoded images made memory grow with the dataset
    if not usable:
        raise LatentProbeError("no instance has a readable image to corrupt",
                               "check the data's image paths" if corruption in IMAGE_CORRUPTIONS else
                               "check the data's image paths (question-swap keeps each instance's images)")
    donor_of = {inst.id: instances[d].id for inst, d in zip(instances, donors)}
    exact_parts: list[pd.DataFrame] = []
    attribution_parts: list[pd.DataFrame] = []
    timing = {"reference": 0.0, "exact": 0.0, "attribution": 0.0}
    bar = progress_bar(len(usable), progress, "patch")
    for start in range(0, len(usable), batch_size):
        chunk = usable[start:start + batch_size]
        done = journal.load(start, ("exact", "attribution")) if journal is not None else None
        if done is not None:  # finished before an interruption (patch --resume)
            exact_parts.append(done["exact"])
            attribution_parts.append(done["attribution"])
            bar.update(len(chunk))
            continue
        rows: list[dict] = []
        attribution_rows: list[dict] = []
        tick = time.time()
        clean_images = [_images_by_id(by_id, i.id) for i in chunk]
        shared = "denoise" in directions and can_share_reference(decoder, grid, semantics)
        if corruption == "question-swap":  # this instance's images and options, the donor's question
            prompts = [subject.prompt_text(i, n_images=len(images), question=by_id[donor_of[i.id]].question)
                       for i, images in zip(chunk, clean_images)]
            corrupt_batch = subject.encode(chunk, images=clean_images, prompts=prompts)
        else:
            corrupt_images = clean_images if noise is not None else \
                [_images_by_id(by_id, donor_of[i.id]) for i in chunk]
            corrupt_batch = subject.encode(chunk, images=corrupt_images)
        clean = reference_run(decoder, subject.encode(chunk, images=clean_images), grid, None)
        denoised = None
        if shared:  # the corrupted run decoded as the trunk of its denoising cells (`reference_with_cells`)
            corrupt, denoised = reference_with_cells(decoder, subject, chunk, grid, corrupt_batch, clean, noise,
                                                     max_rows)
        else:
            corrupt = reference_run(decoder, corrupt_batch, grid, noise)
        outcomes = {"clean": _outcomes(subject, chunk, clean.result), "corrupt": _outcomes(subject, chunk, corrupt.result)}
        timing["reference"] += time.time() - tick
        for direction in directions:
            tick = time.time()
            base, source = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
            base_noise = noise if direction == "denoise" else None
            patched = run_cells(decoder, subject, chunk, grid, base, source, base_noise, semantics, max_rows,
                                done=denoised if direction == "denoise" else None)
            for site, per_instance in patched.items():
                for b, (inst, outcome) in enumerate(zip(chunk, per_instance)):
                    rows.append(_row(subject, inst, b, direction, corruption_name, semantics, site, outcome,
                                     outcomes, min_gap, seed, "exact"))
            timing["exact"] += time.time() - tick
            if attribution:
                from .attribution import attribution_map

                tick = time.time()
                estimates = attribution_map(decoder, subject, chunk, grid, base, source, base_noise)
                for site, values in estimates.items():
                    for b, (inst, value) in enumerate(zip(chunk, values)):
                        attribution_rows.append(_attribution_row(subject, inst, b, direction, corruption_name,
                                                                 semantics, site, value, outcomes, min_gap, seed))
                timing["attribution"] += time.time() - tick
        frames = {"exact": pd.DataFrame(rows), "attribution": pd.DataFrame(attribution_rows)}
        if journal is not None:  # kept on disk, and read back so a resumed run is built from the same frames
            journal.save(start, frames)
            frames = journal.load(start, ("exact", "attribution"))
        exact_parts.append(frames["exact"])
        attribution_parts.append(frames["attribution"])
        bar.update(len(chunk))
    bar.close()
    parts = [f for f in exact_parts + attribution_parts if len(f)]
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    table = summarize_patching(frame, n_boot=n_boot, seed=seed)
    agreement = attribution_agreement(table)
    result = PatchResult(rows=frame, table=table, agreement=agreement, grid=grid,
                         out_dir=None if out_dir is None else str(out_dir), failures=failures,
                         seconds={**timing, "total": time.time() - started})
    if out_dir is not None:
        _write(result, Path(out_dir), subject, config, corruption_name, directions, semantics, min_gap,
               len(instances), seed)
    return result


def _images_by_id(by_id: dict, instance_id):
    """The images of instance ``instance_id``, read now (a chunk's own and its donors'; never all at once)."""
    inst = by_id.get(instance_id)
    if inst is None:
        raise LatentProbeError(f"no donor {instance_id}", "internal: donors come from the same instances")
    images = _safe_images(inst)
    if images is None:
        raise LatentProbeError(f"the image of {instance_id} cannot be read now (it could be when the run started)",
                               "fix the data's image paths")
    return images


def _capture_for(decoder: LatentDecoder, grid: PatchGrid, prompt_states: bool) -> "_StateCapture":
    """The hooks a reference run of ``grid`` needs; layer 0 is always kept at every latent step (``pin`` feeds it)."""
    layers = tuple(sorted(set(grid.layers) | {0}))
    group_sites = grid.group_sites()
    whole_phase = any(s.group == "latent" for s in group_sites)
    latent_steps = None if whole_phase else sorted({s.step for s in grid.step_sites()})
    answer = any(s.group == "answer" for s in group_sites)
    prompt = prompt_states and any(s.group in PROMPT_GROUPS for s in group_sites)
    return _StateCapture(decoder, layers, prompt, latent_steps, answer)


def reference_run(decoder: LatentDecoder, batch, grid: PatchGrid, noise: ImageEmbeddingNoise | None,
                  prompt_states: bool = True) -> RunStates:
    """Prefill and decode ``batch`` once (with the corruption's noise when given), copying the states the grid's
    sites read (see `_StateCapture`); layer 0 is always kept at every latent step (``pin`` feeds it)."""
    from contextlib import ExitStack

    with ExitStack() as stack:
        if noise is not None:
            stack.enter_context(noise)
        capture = stack.enter_context(_capture_for(decoder, grid, prompt_states))
        prefill = decoder.prefill(batch)
        result = decoder.decode(prefill)
    return capture.states(result, prefill.batch, prefill)


def can_share_reference(decoder: LatentDecoder, grid: PatchGrid, semantics: str) -> bool:
    """Whether `reference_with_cells` can decode a run being patched together with its cells: recomputed later
    steps (``pin`` reads the run's own latents while its cells decode), greedy decoding, a ``latent[k]`` cell
    with k > 0 (its rows join late, so the unedited run is decoded as their trunk) and listeners that follow."""
    return (semantics == "recompute" and not decoder.config.do_sample and decoder.listeners_follow_joins()
            and any(s.step for s in grid.step_sites()))


def reference_with_cells(decoder: LatentDecoder, subject, chunk: Sequence[Instance], grid: PatchGrid, batch,
                         source: RunStates, noise: ImageEmbeddingNoise | None, max_rows: int,
                         prompt_states: bool = True) -> tuple[RunStates, dict[Site, list]]:
    """The run being patched (``batch``, with the corruption's noise) and its decode-phase cells restored from
    ``source`` (recompute), in one decode: the run is the trunk its ``latent[k]`` cells join at step k
    (`LatentDecoder.decode`'s ``join_steps`` and ``keep_trunks``), so it is prefilled once and never decoded on its
    own; its states are copied from the trunk rows (`_StateCapture`). Returns its `RunStates` (as `reference_run`)
    and the outcomes of the first ``max_rows`` rows' cells (as `run_cells`; give them back to it as ``done``).
    Check `can_share_reference` first."""
    from contextlib import ExitStack

    bsz = len(chunk)
    cells = _decode_cells(grid)[: max(1, max_rows // bsz)]
    if not any(c.step for c in cells if c.group == "latent"):  # the first pass has no late joins: no trunk
        cells = [c for c in _decode_cells(grid) if c.step][:1] + cells[:-1]
    with ExitStack() as stack:
        capture = stack.enter_context(_capture_for(decoder, grid, prompt_states))
        with ExitStack() as prefill_only:
            if noise is not None:
                prefill_only.enter_context(noise)
            prefill = decoder.prefill(batch)
        patcher = stack.enter_context(DecodePatcher(decoder, cells, source, None))
        result = decoder.decode(prefill, repeats=len(cells), join_steps=patcher.join_steps(bsz), keep_trunks=True)
    n_cells = bsz * len(cells)
    base = capture.states(_take_rows(result, range(n_cells, n_cells + bsz)), prefill.batch, prefill)
    out = {cell: [_probs_or_none(subject, inst, result.rows[b * len(cells) + c], _site_exists(cell, source, base, b))
                  for b, inst in enumerate(chunk)] for c, cell in enumerate(cells)}
    return base, out


def _decode_cells(grid: PatchGrid) -> list[Site]:
    return grid.step_sites() + [s for s in grid.group_sites() if s.group in DECODE_GROUPS]


def _take_rows(result: DecodeResult, rows) -> DecodeResult:
    index = torch.tensor(list(rows), dtype=torch.long)
    return DecodeResult(rows=[result.rows[r] for r in index.tolist()], sequences=result.sequences[index],
                        attention_mask=result.attention_mask[index], position_ids=result.position_ids[:, index],
                        input_kinds=result.input_kinds[index], prompt_length=result.prompt_length,
                        latent_inputs=result.latent_inputs[index])


def run_cells(decoder: LatentDecoder, subject, chunk: Sequence[Instance], grid: PatchGrid, base: RunStates,
              source: RunStates, base_noise: ImageEmbeddingNoise | None, semantics: str, max_rows: int,
              join_late: bool = True, done: dict | None = None) -> dict[Site, list[tuple[list[float] | None, float]]]:
    """Decode ``base`` with each grid site restored from ``source``; per site, per instance: the answer
    probabilities at the slot and the gold log-odds (None and NaN where the site does not exist there).

    Decode-phase cells run side by side from ``base``'s prefill; with ``join_late`` a ``latent[k]`` cell's rows
    start at latent step k as copies of the unpatched run (the steps before are that run's: `join_steps` in
    `LatentDecoder.decode`), which saves the k steps each such row would repeat. Cells in ``done`` (outcomes
    from `reference_with_cells`) are not run again."""
    from contextlib import ExitStack

    bsz = len(chunk)
    per_pass = max(1, max_rows // bsz)
    out: dict[Site, list] = dict(done or {})
    decode_cells = [s for s in _decode_cells(grid) if s not in out]
    prompt_cells = [s for s in grid.group_sites() if s.group in PROMPT_GROUPS]
    for start in range(0, len(decode_cells), per_pass):
        cells = decode_cells[start:start + per_pass]
        with DecodePatcher(decoder, cells, source, base, pin=semantics == "pin") as patcher:
            # a cell at latent step k is the unpatched run before step k: its rows join there (`join_steps`)
            late = join_late and not decoder.config.do_sample and decoder.listeners_follow_joins()
            joins = patcher.join_steps(bsz) if late else None
            result = decoder.decode(base.prefill, repeats=len(cells), join_steps=joins)
        for c, cell in enumerate(cells):
            out[cell] = [_probs_or_none(subject, inst, result.rows[b * len(cells) + c],
                                        _site_exists(cell, source, base, b)) for b, inst in enumerate(chunk)]
    for start in range(0, len(prompt_cells), per_pass):
        cells = prompt_cells[start:start + per_pass]
        repeated = base.batch.repeat(len(cells)) if len(cells) > 1 else base.batch
        with ExitStack() as stack:
            if base_noise is not None:
                stack.enter_context(base_noise)
            patcher = stack.enter_context(PrefillPatcher(decoder, cells, source, base.batch))
            prefill = decoder.prefill(repeated)
        result = decoder.decode(prefill, consume=True)
        for c, cell in enumerate(cells):
            out[cell] = [_probs_or_none(subject, inst, result.rows[b * len(cells) + c], (b, c) not in patcher.misaligned)
                         for b, inst in enumerate(chunk)]
    return {cell: out[cell] for cell in _decode_cells(grid) + prompt_cells}  # the grid's order, whoever ran them


def _site_exists(cell: Site, source: RunStates, base: RunStates, b: int) -> bool:
    if cell.group == "latent":
        have = min(int(source.latent_count[b]), int(base.latent_count[b]))
        return have > 0 if cell.step is None else cell.step < have
    if cell.group == "answer":
        return int(source.answer_count[b]) > 0 and int(base.answer_count[b]) > 0
    return True


def answer_outcome(subject, inst, logits) -> tuple[list[float] | None, float]:
    """(option probabilities at the answer slot, gold log-odds): log p_gold - log(1 - p_gold) over the options,
    computed from the logits so it stays finite when a probability rounds to 0 or 1."""
    probs = subject.answer_probabilities(inst, logits)
    ids, gold = subject.answer_candidate_ids(inst), subject.gold_index(inst)
    if probs is None or ids is None or gold is None:
        return probs, float("nan")
    values = logits[ids].double()
    others = torch.cat([values[:gold], values[gold + 1:]])
    return probs, float(values[gold] - torch.logsumexp(others, dim=0)) if len(others) else float("nan")


def _probs_or_none(subject, inst, row, exists: bool):
    if not exists or row.answer_logits is None:
        return None, float("nan")
    return answer_outcome(subject, inst, row.answer_logits)


def _outcomes(subject, chunk, result: DecodeResult) -> list[tuple[list[float] | None, float]]:
    return [_probs_or_none(subject, inst, row, True) for inst, row in zip(chunk, result.rows)]


def _base_row(subject, inst, b, direction, corruption, semantics, site: Site, outcomes, min_gap, seed, method):
    gold = subject.gold_index(inst)
    (clean, lo_clean), (corrupt, lo_corrupt) = outcomes["clean"][b], outcomes["corrupt"][b]
    p_clean = float(clean[gold]) if clean is not None and gold is not None else float("nan")
    p_corrupt = float(corrupt[gold]) if corrupt is not None and gold is not None else float("nan")
    gap = p_clean - p_corrupt
    return {
        "subject": subject.name, "instance_id": inst.id, "method": method, "direction": direction,
        "corruption": corruption, "semantics": semantics, "site": str(site), "layer": site.layer,
        "group": site.group, "step": -1 if site.step is None else site.step, "seed": seed,
        "p_clean": p_clean, "p_corrupt": p_corrupt, "gap": gap,
        "logodds_clean": lo_clean, "logodds_corrupt": lo_corrupt,
        "excluded": not (np.isfinite(gap) and abs(gap) >= min_gap),
        "answer_clean": _argmax(clean), "answer_corrupt": _argmax(corrupt),
    }


def _row(subject, inst, b, direction, corruption, semantics, site, outcome, outcomes, min_gap, seed, method):
    row = _base_row(subject, inst, b, direction, corruption, semantics, site, outcomes, min_gap, seed, method)
    probs, logodds = outcome
    gold = subject.gold_index(inst)
    p = float(probs[gold]) if probs is not None and gold is not None else float("nan")
    row["p_patched"], row["logodds_patched"] = p, logodds
    row["answer_patched"] = _argmax(probs)
    keep = not row["excluded"]
    row["value"] = normalized_effect(direction, row["p_clean"], row["p_corrupt"], p) if keep else float("nan")
    row["value_logodds"] = normalized_effect(direction, row["logodds_clean"], row["logodds_corrupt"], logodds) \
        if keep else float("nan")
    row["flipped"] = _flipped(direction, row["answer_clean"], row["answer_corrupt"], row["answer_patched"])
    return row


def _attribution_row(subject, inst, b, direction, corruption, semantics, site, estimate, outcomes, min_gap, seed):
    """``estimate`` is the first-order change of the gold log-odds from patching the site (attribution); the
    probability metric is not estimated (NaN)."""
    row = _base_row(subject, inst, b, direction, corruption, semantics, site, outcomes, min_gap, seed, "attribution")
    base = row["logodds_corrupt"] if direction == "denoise" else row["logodds_clean"]
    row["p_patched"] = float("nan")
    row["logodds_patched"] = float("nan") if estimate is None else base + float(estimate)
    row["answer_patched"] = -1
    row["value"] = float("nan")
    row["value_logodds"] = normalized_effect(direction, row["logodds_clean"], row["logodds_corrupt"],
                                             row["logodds_patched"]) if not row["excluded"] else float("nan")
    row["flipped"] = None
    return row


def normalized_effect(direction: str, clean: float, corrupt: float, patched: float) -> float:
    """Recovery (denoise) or damage (noise) of a metric, as a fraction of its clean-corrupt gap.

    >>> normalized_effect("denoise", 0.9, 0.1, 0.5), normalized_effect("noise", 0.9, 0.1, 0.5)
    (0.5, 0.5)
    """
    gap = clean - corrupt
    if not np.isfinite(gap) or gap == 0:
        return float("nan")
    if direction == "denoise":
        return (patched - corrupt) / gap
    return (clean - patched) / gap


def _argmax(probs) -> int:
    return -1 if probs is None else int(np.argmax(probs))


def _flipped(direction, clean, corrupt, patched):
    """Only instances whose answer the corruption changed count (None otherwise, or when a value is missing)."""
    if min(clean, corrupt, patched) < 0 or clean == corrupt:
        return None
    return patched == clean if direction == "denoise" else patched != clean


# ------------------------------------------------------------------------------------------- statistics
def summarize_patching(rows: pd.DataFrame, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> pd.DataFrame:
    """Tidy summary (SUMMARY_COLUMNS) of per-instance patching rows: mean normalised effects (on the gold
    probability and on the gold log-odds) with percentile bootstrap intervals over instances, and the flip rate
    with an exact (Clopper-Pearson) interval. Attribution rows estimate the log-odds metric only."""
    from scipy.stats import binomtest

    from ..stats.effects import paired_bootstrap

    if rows.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    keys = ["subject", "method", "direction", "corruption", "semantics", "site", "layer", "group", "step", "seed"]
    out = []
    for key, group in rows.groupby(keys, sort=False):
        base = dict(zip(keys, key))
        direction = base["direction"]
        included = group[~group.excluded.astype(bool)]
        metrics = [(LOGODDS_METRIC_OF[direction], "value_logodds")]
        if base["method"] == "exact":
            metrics.insert(0, (METRIC_OF[direction], "value"))
        for metric, column in metrics:
            values = included[column].to_numpy(dtype=float)
            present = values[np.isfinite(values)]
            est, low, high = paired_bootstrap(present, n_boot=n_boot, seed=seed, alpha=alpha) if len(present) \
                else (float("nan"),) * 3
            out.append({**base, "metric": metric, "estimate": est, "ci_low": low, "ci_high": high,
                        "n": int(len(present)), "n_excluded": int(len(group) - len(included))})
        if base["method"] == "exact":
            flips = group.flipped.dropna().astype(bool)
            if len(flips):
                k, n = int(flips.sum()), int(len(flips))
                ci = binomtest(k, n).proportion_ci(confidence_level=1 - alpha, method="exact")
                out.append({**base, "metric": "flip_rate", "estimate": k / n, "ci_low": ci.low, "ci_high": ci.high,
                            "n": n, "n_excluded": int(len(group) - n)})
    return pd.DataFrame(out)[SUMMARY_COLUMNS]


def attribution_agreement(table: pd.DataFrame) -> pd.DataFrame:
    """Spearman rank correlation between attribution and exact patching (both on the gold log-odds metric)
    over the sites where both ran."""
    from scipy.stats import spearmanr

    columns = ["subject", "direction", "corruption", "semantics", "n_sites", "spearman_rho", "p_value"]
    if table.empty or "attribution" not in set(table.method):
        return pd.DataFrame(columns=columns)
    out = []
    metric = table[table.metric.isin(list(LOGODDS_METRIC_OF.values()))]
    for key, group in metric.groupby(["subject", "direction", "corruption", "semantics"], sort=False):
        wide = group.pivot_table(index="site", columns="method", values="estimate").dropna()
        if {"exact", "attribution"} <= set(wide.columns) and len(wide) >= 3:
            rho, p = spearmanr(wide["exact"], wide["attribution"])
        else:
            rho = p = float("nan")
        out.append(dict(zip(["subject", "direction", "corruption", "semantics"], key), n_sites=len(wide),
                        spearman_rho=float(rho), p_value=float(p)))
    return pd.DataFrame(out, columns=columns)


# ------------------------------------------------------------------------------------------------ output
def _write(result: PatchResult, out: Path, subject, config, corruption, directions, semantics, min_gap,
           n_instances, seed):
    from ..fileio import atomic_write, atomic_write_json

    rows = result.rows.copy()
    rows["flipped"] = rows["flipped"].map(lambda v: None if v is None or (isinstance(v, float) and np.isnan(v))
                                          else bool(v)).astype("boolean")
    atomic_write(out / "patching_rows.parquet", lambda tmp: rows.to_parquet(tmp, index=False))
    atomic_write(out / "patching_summary.parquet", lambda tmp: result.table.to_parquet(tmp, index=False))
    atomic_write(out / "patching_summary.csv", lambda tmp: result.table.to_csv(tmp, index=False))
    atomic_write(out / "patching_agreement.csv", lambda tmp: result.agreement.to_csv(tmp, index=False))
    atomic_write_json(out / "patching_manifest.json", {
        "kind": "patch", "subject_name": subject.name, "subject_fingerprint": subject.fingerprint(),
        "grid": result.grid.describe(), "directions": list(directions), "corruption": corruption,
        "semantics": semantics, "min_gap": min_gap, "n_instances": n_instances, "seed": seed,
        "decode": asdict(config), "failures": result.failures, "seconds": result.seconds,
        "figures": result.figures})


def read_patching(run_dir: str | Path) -> pd.DataFrame:
    """The tidy summary of a patching run folder (``patching_summary.parquet``)."""
    path = Path(run_dir) / "patching_summary.parquet"
    if not path.exists():
        raise LatentProbeError(f"{run_dir} holds no patching results", "run `latentprobe patch --out DIR` first")
    return pd.read_parquet(path)


def describe_grid_cost(grid: PatchGrid, n_instances: int) -> dict[str, Any]:
    """How many forwards the grid needs with prefill reuse vs independent runs (for the bench and the manifest)."""
    decode_cells = len(grid.step_sites()) + sum(1 for s in grid.group_sites() if s.group in DECODE_GROUPS)
    prompt_cells = sum(1 for s in grid.group_sites() if s.group in PROMPT_GROUPS)
    return {"decode_cells": decode_cells, "prompt_cells": prompt_cells,
            "prefills_reused": 2 * n_instances, "prefills_independent": (decode_cells + prompt_cells) * n_instances}


__all__ = ["PatchGrid", "PatchResult", "resolve_grid", "grid_of_sites", "top_attribution_sites", "patch_map", "reference_run", "run_cells",
           "summarize_patching", "attribution_agreement", "normalized_effect", "read_patching", "default_instances",
           "DecodePatcher", "PrefillPatcher", "ImageEmbeddingNoise", "image_embedding_std"]
