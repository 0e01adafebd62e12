"""Nearest-neighbour readout of latent states (arXiv 2602.00462, LatentLens), beside the logit lens.

For each latent step k and layer L, the latent state ``latent[k].layer[L]`` is compared (cosine) with a reference
set of *contextual* token states at the same layer L: by default every text token of the run's own prompts (image
and padding positions left out), or the tokens of a text file the user passes (each non-empty line run through
the model as a plain text prompt). The nearest reference states are listed with their token and a snippet of
their context; the logit lens (`latentprobe.where.lens`) of the same state is listed beside them, since that study
finds the logit lens underestimates what such states encode.

All states come from one no-cache replay of each decoded batch (`latentprobe.model.decoding.replay`), so the
latent states are exactly the decoded ones. Table (`LATENT_LENS_COLUMNS`, one row per instance x step x layer):
``subject, intervention, seed, instance_id, latent_step, layer, site, neighbour_tokens, neighbour_contexts,
neighbour_cosines, neighbour_same_instance, lens_tokens, gold_token, gold_in_neighbours, gold_in_lens``.
Reference states are kept once per distinct text prefix (a causal model gives the same token after the same text
the same state, and the prompts share their template).
`latent_lens_summary` gives, per (layer, step), how often the gold answer's token is among the neighbours and
among the lens's top tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..errors import LatentProbeError
from ..model.decoding import LATENT, DecodeConfig, LatentDecoder, replay
from .lens import check_lens_subject, gold_token_id, lens_logits

LATENT_LENS_COLUMNS = ["subject", "intervention", "seed", "instance_id", "latent_step", "layer", "site",
                       "neighbour_tokens", "neighbour_contexts", "neighbour_cosines", "neighbour_same_instance",
                       "lens_tokens", "gold_token", "gold_in_neighbours", "gold_in_lens"]
CONTEXT = 3  # tokens either side in a neighbour's snippet
MAX_REFERENCE_LINES = 2000


def read_reference_file(path: str | Path) -> list[str]:
    """The non-empty lines of a UTF-8 text file, refused in one line when missing, unreadable, empty or huge."""
    path = Path(path)
    if not path.is_file():
        raise LatentProbeError(f"reference file {path} does not exist", "pass a UTF-8 text file, one snippet a line")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise LatentProbeError(f"reference file {path} cannot be read as UTF-8 text ({type(exc).__name__})",
                               "pass a UTF-8 text file, one snippet a line") from None
    if not lines:
        raise LatentProbeError(f"reference file {path} has no non-empty line", "put one text snippet on each line")
    if len(lines) > MAX_REFERENCE_LINES:
        raise LatentProbeError(f"reference file {path} has {len(lines)} lines (at most {MAX_REFERENCE_LINES})",
                               "pass a shorter file")
    return lines


class _Reference:
    """Contextual token states per layer, with their token strings, snippets and source instance."""

    def __init__(self, layers, image_id=None):
        self.states = {layer: [] for layer in layers}
        self.tokens: list[str] = []
        self.contexts: list[str] = []
        self.owner: list[str] = []
        self.image_id = image_id
        self._seen: set = set()

    def add(self, tokenizer, ids: list[int], hidden_states, row: int, positions: list[int], owner: str,
            offset: int = 0):
        """Positions index ``ids``; the states sit at ``offset + position`` in ``hidden_states``."""
        # A causal model gives the same state to the same token after the same text: keep one copy of each
        # (prompts share their template), unless an image precedes it (other pixels, other state).
        fresh = []
        for p in positions:
            prefix = tuple(ids[:p + 1])
            key = (owner, p) if self.image_id is not None and self.image_id in prefix else prefix
            if key not in self._seen:
                self._seen.add(key)
                fresh.append(p)
        positions = fresh
        if not positions:
            return
        for layer in self.states:
            self.states[layer].append(hidden_states[layer][row, [offset + p for p in positions]].float().cpu())
        pieces = tokenizer.convert_ids_to_tokens(ids)
        for p in positions:
            self.tokens.append(pieces[p])
            left = tokenizer.convert_tokens_to_string(pieces[max(0, p - CONTEXT):p])
            right = tokenizer.convert_tokens_to_string(pieces[p + 1:p + 1 + CONTEXT])
            self.contexts.append(f"{left}[{tokenizer.convert_tokens_to_string([pieces[p]])}]{right}")
            self.owner.append(owner)

    def matrix(self, layer) -> torch.Tensor:
        stacked = torch.cat(self.states[layer])
        return torch.nn.functional.normalize(stacked, dim=-1)


def _text_positions(batch, result, row: int, image_id) -> list[int]:
    ids = result.sequences[row, : result.prompt_length]
    keep = result.attention_mask[row, : result.prompt_length].bool()
    if image_id is not None:
        keep &= ids != image_id
    return keep.nonzero(as_tuple=True)[0].tolist()


@torch.no_grad()
def latent_lens_table(subject, instances, *, layers: Sequence[int] | None = None, top_k: int = 5,
                      reference_file: str | Path | None = None, config: DecodeConfig | None = None,
                      batch_size: int = 8, seed: int = 0) -> pd.DataFrame:
    """The nearest-neighbour readout (see the module docstring). Bad layers, top_k or reference files are refused
    before any model runs."""
    check_lens_subject(subject)
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise LatentProbeError(f"top_k must be a whole number >= 1, got {top_k!r}", "pass e.g. --top-tokens 5")
    n_layers = subject.num_layers
    layers = list(range(n_layers + 1)) if layers is None else [int(layer) for layer in layers]
    bad = [layer for layer in layers if not 0 <= layer <= n_layers]
    if bad:
        raise LatentProbeError(f"layer(s) {bad} out of range for a model with {n_layers} blocks",
                               f"use 0..{n_layers} (0 = embeddings, {n_layers} = final norm)")
    lines = read_reference_file(reference_file) if reference_file is not None else None
    config = config or DecodeConfig(max_new_tokens=subject.max_new_tokens, seed=seed)
    decoder = LatentDecoder(subject, config)
    tokenizer = subject.tokenizer
    image_id = getattr(subject.model.config, "image_token_id", None)
    reference = _Reference(layers, image_id)
    latents = []  # (instance, step, {layer: state})
    for start in range(0, len(instances), batch_size):
        chunk = list(instances[start:start + batch_size])
        batch = subject.encode(chunk)
        result = decoder.run(batch)
        hidden = replay(subject, batch, result, output_hidden_states=True)
        for r, inst in enumerate(chunk):
            if lines is None:
                positions = _text_positions(batch, result, r, image_id)
                first = positions[0] if positions else 0  # the row's first real token (left padding before it)
                prompt = result.sequences[r, first:result.prompt_length].tolist()
                reference.add(tokenizer, prompt, hidden, r, [p - first for p in positions], inst.id,
                              offset=first)
            at = (result.input_kinds[r] == LATENT).nonzero(as_tuple=True)[0].tolist()
            for k, position in enumerate(at):
                latents.append((inst, k, {layer: hidden[layer][r, position].float().cpu() for layer in layers}))
    if lines is not None:
        _file_reference(subject, lines, reference)
    by_layer = {layer: reference.matrix(layer) for layer in layers}
    rows = []
    for inst, k, states in latents:
        gold, _ = gold_token_id(subject, inst)
        gold_token = tokenizer.convert_ids_to_tokens(gold) if gold is not None else None
        for layer in layers:
            state = states[layer]
            cosines = by_layer[layer] @ torch.nn.functional.normalize(state, dim=0)
            order = cosines.argsort(descending=True).tolist()
            idx, shown = [], set()
            for i in order:  # one line per distinct (token, context): at layer 0 every copy of a token is alike
                if (reference.tokens[i], reference.contexts[i]) not in shown:
                    shown.add((reference.tokens[i], reference.contexts[i]))
                    idx.append(i)
                if len(idx) == top_k:
                    break
            lens = lens_logits(subject, state.unsqueeze(0), layer)[0].topk(top_k).indices.tolist()
            lens_tokens = tokenizer.convert_ids_to_tokens(lens)
            neighbour_tokens = [reference.tokens[i] for i in idx]
            rows.append(dict(
                subject=subject.name, intervention="none", seed=seed, instance_id=inst.id, latent_step=k,
                layer=layer, site=f"latent[{k}].layer[{layer}]", neighbour_tokens=neighbour_tokens,
                neighbour_contexts=[reference.contexts[i] for i in idx],
                neighbour_cosines=[round(float(cosines[i]), 4) for i in idx],
                neighbour_same_instance=[reference.owner[i] == inst.id for i in idx], lens_tokens=lens_tokens,
                gold_token=gold_token,
                gold_in_neighbours=None if gold_token is None else gold_token in neighbour_tokens,
                gold_in_lens=None if gold_token is None else gold_token in lens_tokens))
    return pd.DataFrame(rows, columns=LATENT_LENS_COLUMNS)


def _file_reference(subject, lines: list[str], reference: _Reference):
    """Contextual states of a reference text, one plain text prompt (no image, no chat template) per line."""
    tokenizer = subject.tokenizer
    for n, line in enumerate(lines):
        ids = tokenizer(line, add_special_tokens=False)["input_ids"]
        if not ids:
            continue
        input_ids = torch.tensor([ids], device=subject.device)
        positions = torch.arange(len(ids), device=subject.device).view(1, 1, -1).expand(3, 1, -1)
        out = subject.model.model(input_ids=input_ids, position_ids=positions, use_cache=False,
                                  output_hidden_states=True)
        reference.add(tokenizer, ids, out.hidden_states, 0, list(range(len(ids))), f"file:{n + 1}")


def latent_lens_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per (subject, layer, latent step): how often the gold answer's token is among the nearest neighbours and
    among the logit lens's top tokens (rows without a gold token left out)."""
    known = table[table.gold_token.notna()]
    if known.empty:
        return pd.DataFrame(columns=["subject", "layer", "latent_step", "gold_in_neighbours", "gold_in_lens", "n"])
    return (known.assign(gold_in_neighbours=known.gold_in_neighbours.astype(float),
                         gold_in_lens=known.gold_in_lens.astype(float))
            .groupby(["subject", "layer", "latent_step"], as_index=False)
            .agg(gold_in_neighbours=("gold_in_neighbours", "mean"), gold_in_lens=("gold_in_lens", "mean"),
                 n=("instance_id", "nunique")))
