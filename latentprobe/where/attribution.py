"""Attribution patching: the whole patching map from one forward and one backward pass.

Exact patching runs the model once per site. Attribution patching (Nanda 2023; Syed et al. 2023) replaces each of
those runs by its first-order Taylor estimate around the run being patched:

    m_patched - m_base  ~=  (h_source - h_base) . d m / d h_base          (one dot product per site)

summed over the positions of a group site, where m is the gold log-odds at the answer slot (log p_gold -
log(1 - p_gold) over the options). The log-odds, not the probability, because the probability's gradient
vanishes where the answer is confident (p near 0 or 1), which is exactly where a clean and a corrupted run sit;
exact patching reports the same log-odds metric beside its probability metric, and the two maps are compared
on it. The gradient is taken through the decoder's own computation: the base
run is replayed step by step with gradients (same prefill, same key masks and positions as the decoder used,
each latent step's input computed from the previous step's final-norm state), so the derivative at a latent
step includes the path through the later fed-back vectors -- it estimates the ``recompute`` semantics. One
replay and one ``torch.autograd.grad`` give every site of the grid; parameter gradients are never formed.

It is a linear approximation: it is good where the model is near-linear between the two states and can be far
off where a state saturates a softmax (a confident answer). It is reported beside exact patching with the
Spearman rank correlation between the two maps (`latentprobe.where.patching.attribution_agreement`); on large maps
(7B, every position) it is the cheap way to choose which sites to patch exactly.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..model.decoding import LATENT, TEXT, LatentDecoder, StepContext
from .hooks import _LayerHooks
from ..model.sites import Site


def slot_steps(result) -> list[int]:
    """Per row, the decode step whose output holds the answer-slot logits (-1: the prefill's last position).

    Read from the decoder's own slot bookkeeping (`latentprobe.model.answer_slot`): a slot found in the output at
    offset k is predicted by the forward of decode step k - 1. A forced slot (prefix appended after the run) or
    a failed row has no step in the run to replay: -2."""
    out = []
    for row in result.rows:
        found = getattr(row, "answer_slot", None) in ("found", "found_inside_token")
        out.append(int(row.answer_slot_offset) - 1 if found and row.answer_slot_offset >= 0 else -2)
    return out


class _GradStates(_LayerHooks):
    """Hooks that make every grid layer's state a graph node whose gradient can be asked for."""

    def __init__(self, decoder: LatentDecoder, layers: Sequence[int]):
        self.decoder, self.layers = decoder, tuple(layers)
        self.prompt: dict[int, torch.Tensor] = {}
        self.steps: list[dict[int, torch.Tensor]] = []
        self.handles = []

    def __enter__(self):
        self.hook_layers(self.layers, self._keeper)
        return self

    def _keeper(self, layer):
        def keep(hidden):
            replaced = None
            if not hidden.requires_grad:  # e.g. text embeddings of a frozen model: make the state a leaf
                hidden = replaced = hidden.detach().requires_grad_(True)
            ctx = self.decoder.context
            if ctx is not None and ctx.is_prefill:
                self.prompt[layer] = hidden
            elif self.steps:
                self.steps[-1][layer] = hidden
            return replaced

        return keep


def attribution_map(decoder: LatentDecoder, subject, chunk, grid, base, source, base_noise=None, *,
                    return_replay: bool = False) -> dict[Site, list[float | None]]:
    """First-order estimates of ``m_patched - m_base`` (gold log-odds at the answer slot) for every site of
    ``grid``, per instance of ``chunk``, from one gradient replay of the ``base`` run (see the module docs).
    ``base`` and ``source`` are `latentprobe.where.patching.RunStates` of the same instances. With ``return_replay``
    also returns the gold log-odds the replay computed (they reproduce the base run's)."""
    from contextlib import ExitStack

    from .hooks import PROMPT_GROUPS, group_positions

    result = base.result
    bsz = result.sequences.shape[0]
    slots = slot_steps(result)
    reached = [s >= -1 for s in slots]
    needed = max([s for s in slots] + [-1]) + 1  # decode steps to replay
    layers = tuple(sorted(set(grid.layers)))
    batch = base.batch
    device = batch.input_ids.device
    golds, candidates = [], []
    for inst in chunk:
        ids = subject.answer_candidate_ids(inst)
        gold = subject.gold_index(inst)
        candidates.append(ids)
        golds.append(gold)
    with ExitStack() as stack, torch.enable_grad():
        if base_noise is not None:
            stack.enter_context(base_noise)
        grads_of = stack.enter_context(_GradStates(decoder, layers))
        decoder.context = StepContext(-1, torch.full((bsz,), TEXT, device=device), torch.full((bsz,), -1, device=device),
                                      torch.zeros(bsz, dtype=torch.bool, device=device), batch.instance_ids,
                                      is_prefill=True, prefill_image_mask=batch.mm_token_type_ids.bool(),
                                      prefill_attention=batch.attention_mask)
        cache = _new_cache(decoder)
        hidden = decoder._forward(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                  position_ids=base.prefill.position_ids, past_key_values=cache, use_cache=True,
                                  pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                                  mm_token_type_ids=batch.mm_token_type_ids)
        last = hidden[:, -1]
        slot_hidden = [last[r] if slots[r] == -1 else None for r in range(bsz)]
        length = result.prompt_length
        for t in range(needed):
            kinds = base.step_kinds[t]
            ids = result.sequences[:, length + t].to(device)
            inputs = decoder.embed(ids.unsqueeze(1))
            if bool((kinds == LATENT).any()):
                fed = decoder._feedback(last).unsqueeze(1).to(inputs.dtype)
                inputs = torch.where((kinds == LATENT).view(-1, 1, 1), fed, inputs)
            decoder.context = StepContext(t, kinds, base.step_latent_index[t], base.step_after_latent[t],
                                          batch.instance_ids)
            grads_of.steps.append({})
            hidden = decoder._forward(inputs_embeds=inputs, attention_mask=base.step_attention[t],
                                      position_ids=base.step_positions[t], past_key_values=cache, use_cache=True)
            last = hidden[:, -1]
            for r in range(bsz):
                if slots[r] == t:
                    slot_hidden[r] = last[r]
        decoder.context = None
        terms = []
        for r in range(bsz):
            if slot_hidden[r] is None or candidates[r] is None or golds[r] is None:
                continue
            options = decoder.lm_head(slot_hidden[r]).float()[candidates[r]]
            others = torch.cat([options[:golds[r]], options[golds[r] + 1:]])
            terms.append(options[golds[r]] - torch.logsumexp(others, dim=0))  # the gold log-odds
        if not terms:
            empty = {site: [None] * bsz for site in grid.sites()}
            return (empty, []) if return_replay else empty
        total = torch.stack(terms).sum()  # rows are independent: d total / d h_r = d p_r / d h_r
        wanted = [(("prompt", layer), grads_of.prompt[layer]) for layer in layers if layer in grads_of.prompt]
        wanted += [(("step", t, layer), states[layer]) for t, states in enumerate(grads_of.steps)
                   for layer in layers if layer in states]
        grads = torch.autograd.grad(total, [tensor for _, tensor in wanted], allow_unused=True)
    grad_of = {key: (torch.zeros_like(tensor) if g is None else g).detach() for (key, tensor), g in zip(wanted, grads)}
    replayed = [float(t.detach()) for t in terms]

    # Where each base row's latent steps and answer positions sit among the replayed steps.
    latent_step_of = [dict() for _ in range(bsz)]
    answer_steps_of = [[] for _ in range(bsz)]
    for t in range(needed):
        kinds, index, after = base.step_kinds[t], base.step_latent_index[t], base.step_after_latent[t]
        for r in range(bsz):
            if kinds[r] == LATENT:
                latent_step_of[r][int(index[r])] = t
            elif kinds[r] == TEXT and after[r] and t <= slots[r]:
                answer_steps_of[r].append(t)

    def step_term(r, t, layer, source_vector):
        key = ("step", t, layer)
        if key not in grad_of:
            return 0.0
        state = grads_of.steps[t][layer][r, -1].detach().float()
        return float(((source_vector.float() - state) * grad_of[key][r, -1].float()).sum())

    out: dict[Site, list[float | None]] = {}
    for site in grid.sites():
        values = []
        for r in range(bsz):
            if not reached[r] or candidates[r] is None or golds[r] is None:
                values.append(None)
                continue
            layer = site.layer
            pos = source.layer_pos(layer)
            if site.group == "latent":
                steps = [site.step] if site.step is not None else sorted(latent_step_of[r])
                have = int(source.latent_count[r])
                usable = [k for k in steps if k < have and k in latent_step_of[r]]
                if not usable:
                    values.append(None)
                    continue
                values.append(sum(step_term(r, latent_step_of[r][k], layer, source.latent[r, k, pos]) for k in usable))
            elif site.group == "answer":
                have = int(source.answer_count[r])
                usable = [(j, t) for j, t in enumerate(answer_steps_of[r]) if j < have]
                if not usable or int(base.answer_count[r]) == 0:
                    values.append(None)
                    continue
                values.append(sum(step_term(r, t, layer, source.answer[r, j, pos]) for j, t in usable))
            elif site.group in PROMPT_GROUPS:
                target = group_positions(batch, r, site.group)
                origin = group_positions(source.batch, r, site.group)
                if len(target) != len(origin) or ("prompt", layer) not in grad_of:
                    values.append(None)
                    continue
                delta = source.prompt[layer][r, origin].float() - grads_of.prompt[layer][r, target].detach().float()
                values.append(float((delta * grad_of[("prompt", layer)][r, target].float()).sum()))
            else:  # pragma: no cover - resolve_grid admits no other group
                values.append(None)
        out[site] = values
    return (out, replayed) if return_replay else out


def _new_cache(decoder):
    from ..model.decoding import _new_cache as new

    return new(decoder.model)


__all__ = ["attribution_map", "slot_steps"]
