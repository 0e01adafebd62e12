"""A lens on latent tokens: what each latent step "says" at every layer, and what its fed-back vector is near.

* **Logit lens** (nostalgebraist 2020): the model's own final norm and LM head applied to the residual stream
  at layer L of latent step k (``latent[k].layer[L]``). At L = N the state is already the final-norm output, so
  the lens there is exactly the model's logits (the norm is not applied twice). Per cell: the top-k tokens, the
  rank of the gold answer token in the whole vocabulary (0 = the top token), its probability, and its rank
  among the answer candidates (the option letters or texts the answer slot scores).
* **Nearest input embeddings** of the fed-back vector z_k (``latent[k].layer[0]``): the tokens whose input
  embeddings have the highest cosine with it, and the cosine rank of the gold token. A latent that "is" a token
  sits next to that token's embedding; one that does not sits next to nothing in particular.

Tables (one row per instance x latent step x layer; every row names subject, intervention and seed)::

    lens_table      subject, intervention, seed, instance_id, latent_step, layer, site, top_tokens, top_ids,
                    top_probs, gold_token, gold_rank, gold_prob, gold_candidate_rank, n_candidates
    nearest_table   subject, intervention, seed, instance_id, latent_step, site, nearest_tokens,
                    nearest_cosines, gold_token, gold_cosine_rank

`gold_rank_summary` gives the median gold rank and the mean reciprocal rank per (layer, latent step), the
numbers behind the heatmap (`latentprobe.report.where_figures.lens_heatmap`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..errors import LatentProbeError
from ..model.sites import Site, backbone_parts

LENS_COLUMNS = ["subject", "intervention", "seed", "instance_id", "latent_step", "layer", "site", "top_tokens",
                "top_ids", "top_probs", "gold_token", "gold_rank", "gold_prob", "gold_candidate_rank",
                "n_candidates"]
NEAREST_COLUMNS = ["subject", "intervention", "seed", "instance_id", "latent_step", "site", "nearest_tokens",
                   "nearest_cosines", "gold_token", "gold_cosine_rank"]


def lens_parts(subject) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The final norm and the LM head the lens applies; a clear error when the model has no LM head."""
    model = subject.model
    head = getattr(model, "lm_head", None)
    if head is None and hasattr(model, "get_output_embeddings"):
        head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Module):
        raise LatentProbeError(f"subject {subject.name!r} has no LM head (no lm_head / output embeddings), so "
                               "there is nothing to read a logit lens through",
                               "load the model with its language-modelling head (…ForConditionalGeneration)")
    _, norm = backbone_parts(model)
    return norm, head


def check_lens_subject(subject):
    """Everything the lens needs, checked before any model runs: an LM head and a latent phase."""
    lens_parts(subject)
    if subject.resolved_protocol is None:
        raise LatentProbeError(f"subject {subject.name!r} has no latent phase, so there are no latent steps to read",
                               "use a latent subject (e.g. organism-bottleneck, lvr, monet, mirage)")


def gold_token_id(subject, instance) -> tuple[int | None, list[int] | None]:
    """The first token of the gold answer as the answer slot scores it (option letter or text), and every
    candidate's first token; (None, None) when the instance has no options the tokenizer tells apart."""
    candidates = subject.answer_candidate_ids(instance)
    gold = subject.gold_index(instance)
    if candidates is None or gold is None:
        return None, None
    return candidates[gold], candidates


@torch.no_grad()
def lens_logits(subject, states: torch.Tensor, layer: int) -> torch.Tensor:
    """Logits (…, V) of hidden states at hidden-state layer ``layer``: final norm (except at layer N, which is
    already normed), then the LM head."""
    norm, head = lens_parts(subject)
    weight = head.weight
    hidden = states.to(device=weight.device, dtype=weight.dtype)
    if layer < subject.num_layers:
        hidden = norm(hidden)
    return head(hidden).float()


@torch.no_grad()
def _check_top_k(top_k):
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise LatentProbeError(f"top_k must be an integer >= 1, got {top_k!r}", "pass a positive number of top tokens")


def logit_lens_table(subject, cache, instances, *, layers: Sequence[int] | None = None, top_k: int = 5,
                     intervention: str = "none", seed: int = 0) -> pd.DataFrame:
    """The logit lens at every cached layer of every latent step of every instance (see module docstring).

    Parameters
    ----------
    subject : Subject
    cache : LatentCache
        From `run_with_cache` with ``latent.layer[L]`` sites for the layers to read.
    instances : list of Instance
        The cached instances, in order (for the gold answer).
    layers : sequence of int, optional
        Layers to read (default: every cached layer).
    top_k : int
        Top tokens kept per cell.
    """
    _check_top_k(top_k)
    layers = list(cache.layer_ids if layers is None else layers)
    by_id = {inst.id: inst for inst in instances}
    tokenizer = subject.tokenizer
    rows = []
    for layer in layers:
        states = cache[Site("latent", layer)]  # (B, S, D), NaN past a row's steps
        logits = lens_logits(subject, torch.nan_to_num(states), layer).cpu()
        probs = torch.softmax(logits, dim=-1)
        top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        for r, instance_id in enumerate(cache.instance_ids):
            instance = by_id[instance_id]
            gold, candidates = gold_token_id(subject, instance)
            n_steps = int((~torch.isnan(states[r, :, 0])).sum())
            for k in range(n_steps):
                cell = logits[r, k]
                row = {"subject": subject.name, "intervention": intervention, "seed": seed,
                       "instance_id": instance_id, "latent_step": k, "layer": layer,
                       "site": str(Site("latent", layer, step=k)),
                       "top_ids": top.indices[r, k].tolist(), "top_probs": top.values[r, k].tolist(),
                       "top_tokens": [tokenizer.decode([i]) for i in top.indices[r, k].tolist()],
                       "gold_token": None, "gold_rank": np.nan, "gold_prob": np.nan,
                       "gold_candidate_rank": np.nan, "n_candidates": np.nan}
                if gold is not None:
                    row.update(gold_token=tokenizer.decode([gold]), gold_rank=int((cell > cell[gold]).sum()),
                               gold_prob=float(probs[r, k, gold]),
                               gold_candidate_rank=int((cell[candidates] > cell[gold]).sum()),
                               n_candidates=len(candidates))
                rows.append(row)
    return pd.DataFrame(rows, columns=LENS_COLUMNS)


@torch.no_grad()
def nearest_embedding_table(subject, cache, instances, *, top_k: int = 5, intervention: str = "none",
                            seed: int = 0) -> pd.DataFrame:
    """Tokens whose input embeddings are nearest (cosine) to each fed-back vector z_k = ``latent[k].layer[0]``."""
    _check_top_k(top_k)
    embeddings = subject.model.get_input_embeddings().weight.detach().float().cpu()
    unit = torch.nn.functional.normalize(embeddings, dim=-1)
    by_id = {inst.id: inst for inst in instances}
    states = cache[Site("latent", 0)]
    tokenizer = subject.tokenizer
    rows = []
    for r, instance_id in enumerate(cache.instance_ids):
        gold, _ = gold_token_id(subject, by_id[instance_id])
        n_steps = int((~torch.isnan(states[r, :, 0])).sum())
        if n_steps == 0:
            continue
        cosines = torch.nn.functional.normalize(states[r, :n_steps], dim=-1) @ unit.T  # (S, V)
        top = cosines.topk(min(top_k, cosines.shape[-1]), dim=-1)
        for k in range(n_steps):
            rows.append({"subject": subject.name, "intervention": intervention, "seed": seed,
                         "instance_id": instance_id, "latent_step": k, "site": str(Site("latent", 0, step=k)),
                         "nearest_tokens": [tokenizer.decode([i]) for i in top.indices[k].tolist()],
                         "nearest_cosines": top.values[k].tolist(),
                         "gold_token": None if gold is None else tokenizer.decode([gold]),
                         "gold_cosine_rank": np.nan if gold is None else
                         int((cosines[k] > cosines[k, gold]).sum())})
    return pd.DataFrame(rows, columns=NEAREST_COLUMNS)


def gold_rank_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per (subject, layer, latent step): instances, median gold rank, mean reciprocal rank (1 / (rank + 1)),
    the fraction with the gold token on top, the mean gold rank among the candidates, and the fraction where the
    gold candidate beats the other candidates (the lens's answer accuracy; chance = 1 / n_candidates, given)."""
    columns = ["subject", "layer", "latent_step", "n", "median_gold_rank", "mrr", "gold_top1", "mean_candidate_rank",
               "candidate_top1", "candidate_chance"]
    scored = table.dropna(subset=["gold_rank"])
    if scored.empty:
        return pd.DataFrame(columns=columns)
    grouped = scored.assign(rr=1.0 / (scored["gold_rank"] + 1), top1=scored["gold_rank"] == 0,
                            candidate_top1=scored["gold_candidate_rank"] == 0,
                            candidate_chance=1.0 / scored["n_candidates"]).groupby(["subject", "layer", "latent_step"])
    frame = grouped.agg(n=("gold_rank", "size"), median_gold_rank=("gold_rank", "median"), mrr=("rr", "mean"),
                        gold_top1=("top1", "mean"), mean_candidate_rank=("gold_candidate_rank", "mean"),
                        candidate_top1=("candidate_top1", "mean"),
                        candidate_chance=("candidate_chance", "mean")).reset_index()
    return frame[columns]


def run_lens(subject, instances, *, config=None, layers: Sequence[int] | None = None, top_k: int = 5,
             batch_size: int = 16, seed: int = 0, journal=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Decode ``instances`` in batches (`run_with_cache`) and return (lens table, nearest-embedding table).

    Everything is checked (LM head, latent phase, layers) before the model runs. ``journal`` (a
    `latentprobe.runs.journal.ChunkJournal`) keeps each finished batch on disk and skips those it holds.
    """
    from ..model.cache import run_with_cache
    from ..model.sites import check_sites

    check_lens_subject(subject)
    _check_top_k(top_k)
    if batch_size < 1:
        raise LatentProbeError(f"batch size must be >= 1, got {batch_size}", "pass --batch-size 1 or more")
    layers = list(range(subject.num_layers + 1)) if layers is None else list(layers)
    sites = check_sites([Site("latent", layer) for layer in sorted(set(layers) | {0})], subject.num_layers)
    lens_parts_, nearest_parts = [], []
    for start in range(0, len(instances), batch_size):
        done = journal.load(start, ("lens", "nearest")) if journal is not None else None
        if done is not None:
            lens_parts_.append(done["lens"])
            nearest_parts.append(done["nearest"])
            continue
        chunk = instances[start:start + batch_size]
        _, cache = run_with_cache(subject, chunk, sites=sites, config=config)
        lens_parts_.append(logit_lens_table(subject, cache, chunk, layers=layers, top_k=top_k, seed=seed))
        nearest_parts.append(nearest_embedding_table(subject, cache, chunk, top_k=top_k, seed=seed))
        if journal is not None:
            journal.save(start, {"lens": lens_parts_[-1], "nearest": nearest_parts[-1]})
    return pd.concat(lens_parts_, ignore_index=True), pd.concat(nearest_parts, ignore_index=True)
