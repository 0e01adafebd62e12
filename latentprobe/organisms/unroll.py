"""The decoder's loop, unrolled with gradients: how the organisms are trained exactly as they are decoded.

Training runs the same computation `LatentDecoder` runs at inference, step for step: the prompt is prefilled into
a `DynamicCache` with the decoder's explicit mRoPE positions; the final-norm last hidden state is fed back as the
next input embedding for K latent steps, each at the previous position + 1; then the end token and the
teacher-forced answer follow in one chunk. The key masks come from the decoder's own `effective_attention`, so
an organism's answer mask is the same in training and at inference. The only shortcut is that the vision tower
is frozen, so its features are computed once per instance and scattered into the prompt embeddings, which is
what the model's own forward does with them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model.decoding import LATENT, TEXT, LatentDecoder, _new_cache, _RowState


@dataclass
class EncodedRows:
    """A batch of encoded prompts with frozen image features, ready to unroll (all tensors share the row order)."""

    instance_ids: list[str]
    input_ids: torch.Tensor  # (B, L) left-padded prompt ids (each prompt of a latent organism ends in its start token)
    attention_mask: torch.Tensor  # (B, L)
    image_mask: torch.Tensor  # (B, L) bool: image-token positions
    position_ids: torch.Tensor  # (3, B, L) as LatentDecoder.prefill_positions gives them
    image_embeds: torch.Tensor  # (B, n_image_tokens, D) the frozen vision tower's merged features
    continuation: torch.Tensor  # (B, T) what the model writes after the prompt (or after the end token)
    continuation_mask: torch.Tensor  # (B, T) bool: real tokens (the rest is right padding)
    gold_ids: torch.Tensor  # (B,) token id of the gold option letter
    answer_slot: torch.Tensor  # (B,) index in the continuation of the answer letter
    align_targets: torch.Tensor | None = None  # (B, K, D) latent alignment targets (Mirage / LVR)

    def select(self, index: torch.Tensor) -> "EncodedRows":
        """Rows ``index``, with the prompt columns that are padding in every selected row trimmed away."""
        attention = self.attention_mask[index]
        first = int((attention.sum(0) > 0).nonzero()[0])
        take = lambda t: None if t is None else t[index]
        return EncodedRows(
            instance_ids=[self.instance_ids[i] for i in index.tolist()],
            input_ids=self.input_ids[index, first:], attention_mask=attention[:, first:],
            image_mask=self.image_mask[index, first:], position_ids=self.position_ids[:, index, first:],
            image_embeds=self.image_embeds[index], continuation=self.continuation[index],
            continuation_mask=self.continuation_mask[index], gold_ids=self.gold_ids[index],
            answer_slot=self.answer_slot[index], align_targets=take(self.align_targets))

    def __len__(self) -> int:
        return self.input_ids.shape[0]


@dataclass
class Unrolled:
    """What one unrolled decode produced, with gradients."""

    latents: torch.Tensor | None  # (B, K, D) the vectors fed back, z_0 .. z_{K-1}
    decision_hidden: torch.Tensor | None  # (B, K + 1, D) hidden states where the stop rule decides (z_k's source)
    logits: torch.Tensor  # (B, T, V) logits[:, t] predicts continuation[:, t]
    open_logits: torch.Tensor | None = None  # (B, V) at the prompt's last position, when the model opens latent mode

    def answer_logits(self, answer_slot: torch.Tensor) -> torch.Tensor:
        """(B, V) logits where each row's answer letter is predicted."""
        return self.logits[torch.arange(self.logits.shape[0], device=self.logits.device), answer_slot]


@dataclass
class _KeyMaskState:
    """The three fields `_RowState.effective_attention` reads, kept in lockstep for a batch whose rows all do the
    same thing at every step (training): the decoder's mask logic is reused, not rewritten."""

    attention: list = field(default_factory=list)
    latent_mark: torch.Tensor | None = None
    after_latent: torch.Tensor | None = None
    mode: torch.Tensor | None = None  # (B,) TEXT or LATENT: the decoder's row mode (latents_blind_to_image reads it)

    def append(self, n_columns: int, latent: bool):
        bsz = self.latent_mark.shape[0]
        ones = torch.ones((bsz, n_columns), dtype=self.attention[0].dtype, device=self.latent_mark.device)
        self.attention.append(ones)
        self.latent_mark = torch.cat([self.latent_mark, ones.bool() if latent else ~ones.bool()], dim=1)

    def key_mask(self, answer_mask, image_mask) -> torch.Tensor:
        return _RowState.effective_attention(self, answer_mask, image_mask)


def unroll(decoder: LatentDecoder, rows: EncodedRows, n_latent: int, answer_mask: str | None = None,
           end_id: int | None = None, start_id: int | None = None) -> Unrolled:
    """Prefill, ``n_latent`` latent steps (0 for organisms without latent mode), then the end token (latent
    organisms) and the continuation teacher-forced in one chunk. Runs with gradients unless called under
    ``torch.no_grad``.

    With ``start_id`` the prompt does not end in the start token: the model opens latent mode itself, as the
    decoder runs it when it chooses the start token (its logits at the prompt's last position are returned as
    ``open_logits``), and the start token is fed as the first generated input, already in latent mode."""
    model = decoder.model
    embeds = decoder.embed(rows.input_ids)
    image_embeds = rows.image_embeds.to(embeds.dtype).reshape(-1, embeds.shape[-1])
    embeds = embeds.masked_scatter(rows.image_mask.unsqueeze(-1), image_embeds)
    cache = _new_cache(model)
    hidden = decoder._forward(inputs_embeds=embeds, attention_mask=rows.attention_mask,
                              position_ids=rows.position_ids, past_key_values=cache, use_cache=True)
    last = hidden[:, -1]
    # Same bookkeeping as _RowState: the next position is the prompt's largest position + 1, per row.
    next_position = rows.position_ids.max(dim=2).values.max(dim=0).values + 1
    bsz = rows.input_ids.shape[0]
    masks = _KeyMaskState(attention=[rows.attention_mask], latent_mark=torch.zeros_like(rows.image_mask),
                          after_latent=torch.zeros(bsz, dtype=torch.bool, device=last.device),
                          mode=torch.full((bsz,), TEXT, dtype=torch.long, device=last.device))
    latents, decisions = [], []
    open_logits = None
    if n_latent and start_id is not None:  # the model's own start token, decoded in latent mode (decoder.open_latent)
        open_logits = decoder.lm_head(last).float()
        masks.mode[:] = LATENT
        masks.append(1, latent=False)
        start = torch.full((bsz, 1), start_id, dtype=rows.input_ids.dtype, device=rows.input_ids.device)
        hidden = decoder._forward(inputs_embeds=decoder.embed(start), past_key_values=cache, use_cache=True,
                                  attention_mask=masks.key_mask(answer_mask, rows.image_mask),
                                  position_ids=next_position.view(1, -1, 1).expand(3, -1, 1))
        last = hidden[:, -1]
        next_position = next_position + 1
    if n_latent:
        masks.mode[:] = LATENT
        for _ in range(n_latent):
            decisions.append(last)
            vector = decoder._feedback(last)
            latents.append(vector)
            masks.append(1, latent=True)
            positions = next_position.view(1, -1, 1).expand(3, -1, 1)
            hidden = decoder._forward(inputs_embeds=vector.unsqueeze(1), past_key_values=cache, use_cache=True,
                                      attention_mask=masks.key_mask(answer_mask, rows.image_mask),
                                      position_ids=positions)
            last = hidden[:, -1]
            next_position = next_position + 1
        decisions.append(last)
        masks.after_latent[:] = True  # the end token and everything after it is the answer region
        masks.mode[:] = TEXT
        end = torch.full((bsz, 1), end_id, dtype=rows.continuation.dtype, device=rows.continuation.device)
        chunk = torch.cat([end, rows.continuation[:, :-1]], dim=1)
    else:
        chunk = rows.continuation[:, :-1]
    chunk_hidden = last.new_zeros((bsz, 0, last.shape[-1]))
    if chunk.shape[1]:
        masks.append(chunk.shape[1], latent=False)
        offsets = torch.arange(chunk.shape[1], device=chunk.device)
        positions = (next_position.view(-1, 1) + offsets).unsqueeze(0).expand(3, -1, -1)
        chunk_hidden = decoder._forward(inputs_embeds=decoder.embed(chunk), past_key_values=cache, use_cache=True,
                                        attention_mask=masks.key_mask(answer_mask, rows.image_mask),
                                        position_ids=positions)
    answer_hidden = chunk_hidden if n_latent else torch.cat([last.unsqueeze(1), chunk_hidden], dim=1)
    return Unrolled(latents=torch.stack(latents, dim=1) if latents else None,
                    decision_hidden=torch.stack(decisions, dim=1) if decisions else None,
                    logits=decoder.lm_head(answer_hidden).float(), open_logits=open_logits)
