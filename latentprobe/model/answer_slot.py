"""The answer slot: where in a run's output the probability of the gold answer is read.

None of the real latent models writes its answer letter right after the latent phase (LVR writes
"\\n<answer> B </answer>", Monet reasons and then writes ``\\boxed{B}``, Mirage "The answer is \\boxed{...}").
So each subject names its **answer prefix**, the text it writes just before the answer, as data
(``Subject.answer_prefix``):

=================  ======================================================================================
family             prefix
=================  ======================================================================================
LVR                ``<answer>``
Monet, Mirage      ``\\boxed{``
CapImagine         the close marker of its imagination text (``Subject.text_mediator_markers[1]``)
organisms, tiny    the latent end token (the first decision after the latent phase), or the close marker
Qwen2.5-VL         none: the slot is the first generated position
=================  ======================================================================================

The slot is the position right after the **last** occurrence of the prefix in the output's text positions (the
parsers read the last ``\\boxed{}`` too). The occurrence is found by matching decoded text, not token ids, so
it does not depend on how the prefix was tokenised in context. Each row says how its slot was obtained:

``found``               the prefix ends at a token boundary of the output; the slot is the model's own next-token
                        distribution there (the one it decoded from, or, if the prefix was the last token chosen
                        before the budget or eos ended the row, that token teacher-forced through the cache).
``found_inside_token``  the prefix ends inside a token (e.g. a merged ``>\\n``); the slot is after that token.
``forced``              the output has no prefix: the prefix is appended to the output (after the last token fed;
                        a final eos is dropped) and the distribution after it is read, teacher-forced through the
                        row's KV cache (no full recompute).
``none``                no slot (the row failed).

A prompt that already ends with the prefix (a forced text mediator) puts the slot at the first generated position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SLOT_STATUSES = ("found", "found_inside_token", "forced", "none")


@dataclass
class SlotPlan:
    """How one row's slot will be read: from a stored hidden state, or by teacher-forcing ``forced_ids``."""

    status: str
    offset: int  # index, in the output (+ forced ids), of the token the slot predicts
    hidden_step: int | None = None  # read the hidden state logged at this decoding step
    forced_ids: list[int] | None = None  # or feed these ids after the row's last fed position


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def find_prefix_end(tokenizer, ids: list[int], prefix: str) -> tuple[int, bool] | None:
    """Index ``k`` of the token of ``ids`` in which the last occurrence of ``prefix`` ends, and whether it ends
    exactly at that token's end; None when the decoded text does not contain ``prefix``.

    >>> from latentprobe.model.subjects.tiny import build_tokenizer
    >>> tok = build_tokenizer()
    >>> ids = tok.encode("so the answer is \\\\boxed{B}", add_special_tokens=False)
    >>> k, exact = find_prefix_end(tok, ids, "\\\\boxed{")
    >>> tok.decode(ids[:k + 1]).endswith("\\\\boxed{"), exact
    (True, True)
    """
    if not ids or not prefix:
        return None
    full = _decode(tokenizer, ids)
    start = full.rfind(prefix)
    if start < 0:
        return None
    end = start + len(prefix)
    # The shortest head of ids whose text reaches the end of the occurrence (decoded length grows with the head).
    low, high = 0, len(ids) - 1
    while low < high:
        mid = (low + high) // 2
        if len(_decode(tokenizer, ids[:mid + 1])) >= end:
            high = mid
        else:
            low = mid + 1
    head = _decode(tokenizer, ids[:low + 1])
    return low, head.endswith(prefix) and head.rfind(prefix) == start


def plan_slot(tokenizer, prefix: str | None, prefix_ids: list[int], prompt_text: str, generated: list[int],
              text_mask: list[bool], fed: list[bool], eos_ids: set[int]) -> SlotPlan:
    """Where one row's slot is, from its output alone (no model call).

    ``generated`` are the row's output ids, ``text_mask`` says which of them are text positions (latent positions
    are never searched), ``fed`` which of them were run through the model (the last token chosen before eos or the
    budget ended the row was not). The hidden state logged at step ``j + 1`` is the one computed from output
    token ``j``; step 0 is the prompt's last position.
    """
    if prefix is None:
        return SlotPlan("found", 0, hidden_step=0)
    text_offsets = [j for j, is_text in enumerate(text_mask) if is_text]
    hit = find_prefix_end(tokenizer, [generated[j] for j in text_offsets], prefix) if text_offsets else None
    if hit is not None:
        j = text_offsets[hit[0]]
        status = "found" if hit[1] else "found_inside_token"
        if fed[j]:
            return SlotPlan(status, j + 1, hidden_step=j + 1)
        return SlotPlan(status, j + 1, forced_ids=[generated[j]])  # chosen last, never run: run it now
    if prompt_text.endswith(prefix):  # the prompt ends with it (a forced text mediator): the first decision
        return SlotPlan("found", 0, hidden_step=0)
    # Not in the output: append it after the last position the row fed (an unfed last text token is part of
    # the output and is fed first; a final eos is dropped).
    kept = list(generated)
    pending: list[int] = []
    if kept and not fed[-1]:
        last = kept.pop()
        if text_mask[-1] and last not in eos_ids:
            pending = [last]
            kept.append(last)
    return SlotPlan("forced", len(kept) + len(prefix_ids), forced_ids=pending + list(prefix_ids))


def gather_logged(hidden_log: list[torch.Tensor], plans: list[SlotPlan]) -> tuple[list[int], torch.Tensor | None]:
    """The logged hidden states of the rows whose slot was found at a decoding step: (rows, (n, D))."""
    rows = [r for r, plan in enumerate(plans) if plan.hidden_step is not None]
    if not rows:
        return [], None
    return rows, torch.stack([hidden_log[plans[r].hidden_step][r] for r in rows])
