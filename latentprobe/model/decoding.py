"""The latent-mode decoder: batched, KV-cached, one state machine per row (text -> latent -> text).

This is the only place that runs a model step by step. At every forward it publishes a `StepContext` saying,
for each row, what its input is (a text token, a latent vector, or nothing because the row is done) and which
latent step it is at, so recorders and interventions can address what they touch by (step kind, step index,
layer) instead of by raw positions.

Conventions
    * Latent step k of a row (k = 0, 1, ...) is the k-th position whose input is a latent vector. The vector
      fed there, z_k, is the final-norm last-layer hidden state of the position before it (the start token for
      k = 0 in the training layout, the token before the start token in the inference layout), mapped through
      the protocol's head when it was computed at a latent position (LVR never maps z_0).
    * Layers follow Hugging Face's ``hidden_states`` numbering: 0 is the input embedding (so layer 0 at latent
      step k is z_k itself), i in 1..N-1 is the output of decoder block i-1, and N is the final-norm output.
    * Positions are explicit multimodal (mRoPE) ids carried in the decoder's own state: the prefill takes them
      from ``get_rope_index``; every later step, latent or text, advances by one like a text token. A text-only
      backbone (GPT-2, Llama, Qwen2/3; `latentprobe.model.backbones`) gets the same tensor's first row as 1-D
      ``position_ids``: the loop does not know which backbone it runs.
    * ``max_new_tokens`` counts every generated position, latent ones included, as ``generate`` does. A budget
      that ends inside a latent phase ends the row with ``stop_reason="max_new_tokens_in_latent"``; the latent
      input chosen for a position that never ran is not reported as a token.
    * Latent step 0 depends on the protocol's layout (see `latentprobe.model.protocol`): in the ``training`` layout it
      is the position after the (embedded) start token and z_0 = h(start); in the ``inference`` layout (Monet's
      runner) it is the start token's own position and z_0 is the state that chose the start token.
    * The answer slot (see `latentprobe.model.answer_slot`) is read after decoding: each row's ``answer_logits`` are
      the next-token logits right after the subject's answer prefix, ``answer_slot`` says whether it was found
      in the output or forced.
    * A row whose hidden state, logits or (edited) latent vector is not finite stops with
      ``stop_reason="non_finite"`` and a reason in ``error``; the other rows go on.

The seed loop this replaces kept one latent flag for the whole batch (forcing the end token for every row);
here each row carries its own mode, step count and stop decision, so rows are independent of their batch.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .answer_slot import SlotPlan, gather_logged, plan_slot
from .backbones import backbone_call
from ..errors import LatentProbeError
from .compat import cache_keywords
from .kv_cache import PreallocatedCache, decode_cache, resolve_mode
from .protocol import check_layout

TEXT, LATENT, DONE = 0, 1, 2  # what a row's input is at a step
KV_CACHES = ("auto", "preallocated", "dynamic")
KIND_NAMES = {TEXT: "text", LATENT: "latent", DONE: "done"}


@dataclass
class DecodeConfig:
    """Decoding settings; sampling is seeded per (seed, instance id), so a row's draws do not depend on its batch."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    latent_steps: int | None = None  # overrides the protocol's fixed K or cap; 0 runs no latent step
    latent_layout: str | None = None  # overrides the protocol's layout: "training" or "inference"

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise LatentProbeError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}", "pass a positive number")
        if self.latent_steps is not None:
            if isinstance(self.latent_steps, bool) or not isinstance(self.latent_steps, int) or self.latent_steps < 0:
                raise LatentProbeError(f"latent_steps must be a whole number >= 0, got {self.latent_steps!r}",
                                       "pass 0 for no latent step, or leave it out for the protocol's own count")
        if self.latent_layout is not None:
            check_layout(self.latent_layout)
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise LatentProbeError(f"max_new_tokens must be a whole number, got {self.max_new_tokens!r}",
                                   "pass a positive integer")
        # Sampling settings are checked even for greedy runs: a manifest must never record an impossible value.
        if not math.isfinite(self.temperature) or self.temperature <= 0:
            raise LatentProbeError(f"temperature must be a finite number > 0, got {self.temperature!r}",
                                   "use e.g. temperature=0.7 (do_sample=False for greedy)")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise LatentProbeError(f"top_p must be in (0, 1], got {self.top_p!r}", "use 1.0 for no nucleus cut")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise LatentProbeError(f"top_k must be a whole number >= 0, got {self.top_k!r}", "use 0 for no top-k cut")


@dataclass
class StepContext:
    """What every row is doing at the current forward; read by recorders and interventions."""

    step: int  # -1 for the prefill, then 0, 1, ...
    kinds: torch.Tensor  # (B,) TEXT / LATENT / DONE: the kind of each row's input at this step
    latent_index: torch.Tensor  # (B,) latent step k for LATENT rows, -1 otherwise
    after_latent: torch.Tensor  # (B,) bool: the row has closed a latent phase (its answer region)
    instance_ids: Sequence[str]
    is_prefill: bool = False
    prefill_image_mask: torch.Tensor | None = None  # (B, L) image-token positions, prefill only
    prefill_attention: torch.Tensor | None = None  # (B, L)
    # Decode steps only: which keys are image tokens (B, L prompt columns) and latent inputs (B, keys so far,
    # the current position included); attention knockout reads them to block edges at chosen layers.
    image_keys: torch.Tensor | None = None
    latent_keys: torch.Tensor | None = None
    # A decode with late joins (`LatentDecoder.decode`'s ``join_steps``): which output row each decoded row is
    # (-1: a trunk row, the unedited run its rows are copied from); None: the decoded rows are the output rows.
    output_rows: torch.Tensor | None = None

    def rows(self, kind: int) -> torch.Tensor:
        return (self.kinds == kind).nonzero(as_tuple=True)[0]


class LatentEdit:
    """Interface for anything that edits latent vectors before they are fed back (see interventions)."""

    name = "edit"

    def edit_latent(self, vectors: torch.Tensor, rows: torch.Tensor, steps: torch.Tensor,
                    decoder: "LatentDecoder") -> torch.Tensor:  # pragma: no cover - interface
        return vectors

    def max_latent_steps(self, row: int) -> int | None:
        """A per-row override of the number of latent steps (dropping steps), or None."""
        return None

    def removes_latent_phase(self, row: int) -> bool:
        """True for a row run with no latent phase at all (the ``no-latent`` control): it never chooses the start
        token, and its answer region begins at its first generated token (an organism's answer mask applies
        there). Decode such rows from `prefill_without_start`."""
        return False

    def forces_end_exit(self, row: int) -> bool:
        """True for a row that leaves its latent phase by writing the end token even under a model-choice exit
        (the ``markers-only`` control: start and end markers, nothing between)."""
        return False

    def skipped_positions(self, row: int) -> int:
        """Latent slots whose positions are left empty when the row's latent phase closes (``markers-only`` with
        positions kept: the end marker and the answer sit at the positions they had in the clean run)."""
        return 0


@dataclass
class RowOutput:
    """Everything one row produced."""

    instance_id: str
    prompt_length: int  # real (unpadded) prompt tokens
    generated_ids: list[int]
    step_kinds: list[int]  # per generated position: the kind of its input (TEXT or LATENT)
    text: str
    latent_vectors: torch.Tensor  # (n_latent, D) exactly the vectors fed back, on CPU
    latent_segments: list[tuple[int, int]]  # (offset in generated ids of the first latent position, length)
    forced_start: bool
    stop_reason: str  # "eos", "max_new_tokens", "max_new_tokens_in_latent" or "non_finite"
    answer_logits: torch.Tensor | None = None  # (V,) next-token logits at the answer slot (latentprobe.model.answer_slot)
    raw_text: str = ""  # the text positions decoded with special tokens kept (mediator markers)
    answer_slot: str = "none"  # found / found_inside_token / forced / none (latentprobe.model.answer_slot)
    answer_slot_offset: int = -1  # index in the output (+ forced prefix) of the token the slot predicts
    error: str = ""  # why the row failed (non-finite values); empty when it did not

    @property
    def failed(self) -> bool:
        return bool(self.error)

    @property
    def latent_exit_ids(self) -> list[int]:
        """The id written right after each latent segment (the model's own choice under LVR's exit rule, the end
        token when forced); a segment the budget cut short has none."""
        return [self.generated_ids[start + length] for start, length in self.latent_segments
                if start + length < len(self.generated_ids)]

    @property
    def entered_latent(self) -> bool:
        return bool(self.latent_segments)

    @property
    def n_latent_steps(self) -> int:
        return int(self.latent_vectors.shape[0])

    @property
    def latent_start(self) -> int | None:
        """Offset in the generated ids of the first latent position (None: never in latent mode)."""
        return self.latent_segments[0][0] if self.latent_segments else None


@dataclass
class DecodeResult:
    rows: list[RowOutput]
    sequences: torch.Tensor  # (B, L + T) prompt (left-padded) and generated ids
    attention_mask: torch.Tensor  # (B, L + T)
    position_ids: torch.Tensor  # (3, B, L + T) the positions each input was run at
    input_kinds: torch.Tensor  # (B, L + T) TEXT/LATENT/DONE per position (prompt: TEXT)
    prompt_length: int  # padded prompt length L
    latent_inputs: torch.Tensor  # (B, L + T, D) latent vectors at LATENT positions, zeros elsewhere


@dataclass
class Prefill:
    """A prompt run once: its cache, last hidden state and positions, reusable by `LatentDecoder.decode`."""

    batch: Any
    cache: Any
    hidden: torch.Tensor
    position_ids: torch.Tensor
    start_pending: torch.Tensor | None = None  # (B,) rows whose stripped start token the decoder writes (inference)


def row_generator(seed: int, instance_id: str, device, stream: Any = 0) -> torch.Generator:
    """A generator seeded from (seed, instance id, stream): sampled rows do not depend on batch composition.
    Stream 0 is the instance's own stream; other streams (repeats of one prompt) give other samples."""
    key = f"{seed}:{instance_id}" if stream == 0 else f"{seed}:{instance_id}:{stream}"
    digest = hashlib.sha256(key.encode()).digest()
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return gen


class LatentDecoder:
    """Decode a `PromptBatch` for a `Subject`, in latent mode where its protocol says so.

    Example::

        >>> from latentprobe.model.subjects import load_subject
        >>> from latentprobe.data import builtin_instances
        >>> subject = load_subject("tiny")
        >>> decoder = LatentDecoder(subject, DecodeConfig(max_new_tokens=12))
        >>> result = decoder.run(subject.encode(builtin_instances()[:2]))
        >>> [row.n_latent_steps for row in result.rows]  # the tiny subject forces 4 latent steps
        [4, 4]
    """

    def __init__(self, subject, config: DecodeConfig | None = None, kv_cache: str = "auto"):
        self.subject = subject
        self.config = config or DecodeConfig(max_new_tokens=subject.max_new_tokens)
        if kv_cache not in KV_CACHES:
            raise LatentProbeError(f"unknown kv_cache {kv_cache!r}", f"use one of {', '.join(KV_CACHES)}")
        # The decode's key/value cache (`latentprobe.model.kv_cache`): "preallocated" writes keys and values in place
        # (a step's copies flat in the output's length), "dynamic" is transformers' DynamicCache (torch.cat per step),
        # "auto" preallocates when a layer's cache reaches kv_cache.AUTO_PREALLOCATE_BYTES. Same outputs bit for bit.
        self.kv_cache = kv_cache
        self._kv_pool: list | None = None  # the last preallocated CPU cache's buffers, reused by the next decode
        self.model = subject.model
        self.protocol = subject.resolved_protocol
        self.context: StepContext | None = None
        self._step_listeners: list[Callable[[StepContext], None]] = []
        self._expand_listeners: list[Callable[[int], None]] = []
        self._reindex_listeners: dict[Callable, Callable] = {}
        self.forward_fn: Callable[..., Any] | None = None  # replaces the inner model call (nnsight runner)
        head = None
        if self.protocol is not None and self.protocol.head_module:
            head = _get_submodule(self.model, self.protocol.head_module)
        self.feedback_head = head
        # What one forward calls: the backbone (positions, embeddings and module paths per architecture are the
        # backbone registry's business, not this loop's).
        self._backbone = backbone_call(self.model)
        self.answer_prefix = answer_slot_prefix(subject)
        self._answer_prefix_ids = (subject.tokenizer.encode(self.answer_prefix, add_special_tokens=False)
                                   if self.answer_prefix else [])

    @property
    def latent_layout(self) -> str | None:
        """The layout that runs: the config's override, else the protocol's (None without a protocol)."""
        if self.protocol is None:
            return None
        return self.config.latent_layout or self.protocol.latent_layout

    # -- the language model call --------------------------------------------------------------------------
    @property
    def inner_model(self):
        return self._backbone

    @property
    def lm_head(self):
        return self.model.lm_head

    def _forward(self, **kwargs) -> torch.Tensor:
        """One forward of the multimodal backbone; returns the final-norm hidden state of every position."""
        fn = self.forward_fn or self.inner_model
        out = fn(**cache_keywords(self.inner_model, kwargs))  # transformers >= 5.25 names the cache `cache`
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)

    # -- public -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, batch, edits: Sequence[LatentEdit | None] | LatentEdit | None = None,
            answer_mask: str | None = "protocol") -> DecodeResult:
        """Decode ``batch``; ``edits`` is one edit for all rows or one (or None) per row."""
        return self.decode(self.prefill(batch), edits, answer_mask=answer_mask)

    @torch.no_grad()
    def prefill(self, batch) -> "Prefill":
        """Run the prompt once. The result can be decoded several times (`decode(..., repeats=M)`): nothing an
        intervention on the latent vectors does can change the prompt's keys and values.

        In the ``inference`` layout a prompt ending with the start token (a forced start) is run without it: its
        embedding is never fed; the decoder writes the start token itself at the first step, with the prompt's
        last hidden state as its input (latent step 0), as if the model had chosen it."""
        device = self.subject.device
        batch = batch.to(device)
        forced = None
        if self.latent_layout == "inference":
            batch, forced = _strip_forced_start(batch, self.protocol.start_id)
        bsz = batch.batch_size
        # Explicit mRoPE positions: the model's own fallback silently uses 1-D positions.
        position_ids = self.prefill_positions(batch)
        cache = _new_cache(self.model)
        self._publish(StepContext(-1, torch.full((bsz,), TEXT, device=device), torch.full((bsz,), -1, device=device),
                                  torch.zeros(bsz, dtype=torch.bool, device=device), batch.instance_ids,
                                  is_prefill=True, prefill_image_mask=batch.mm_token_type_ids.bool(),
                                  prefill_attention=batch.attention_mask))
        hidden = self._forward(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                               position_ids=position_ids, past_key_values=cache, use_cache=True,
                               pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                               mm_token_type_ids=batch.mm_token_type_ids)[:, -1]
        self.context = None
        return Prefill(batch=batch, cache=cache, hidden=hidden, position_ids=position_ids, start_pending=forced)

    @torch.no_grad()
    def decode(self, prefill: "Prefill", edits=None, *, repeats: int = 1, answer_mask: str | None = "protocol",
               consume: bool = False, streams: Sequence[Any] | None = None,
               join_steps: Sequence[int] | None = None, keep_trunks: bool = False) -> DecodeResult:
        """Decode from a prefill. With ``repeats`` = M, every prompt row is decoded M times side by side (row
        b's copies are rows b*M .. b*M+M-1), each with its own edit: one batched loop for a sweep of edits.
        The prefill's cache is copied unless ``consume`` (into a preallocated one under ``kv_cache`` "auto" when it
        is large, see `latentprobe.model.kv_cache`).

        Under sampling, copy m draws from the seeded stream ``streams[m]`` (default ``m``: M different, reproducible
        samples; copy 0 draws what an unrepeated decode draws). Pass ``streams=[0] * M`` to give every copy the
        instance's own stream (common random numbers, as the intervention runner does).

        ``join_steps`` (one per decoded row, default all 0): row r with ``join_steps[r]`` = k > 0 is promised to be,
        until it feeds latent step k, the unedited decode of its prompt row (its edit and every step listener act
        only from latent step k on). Such rows are not run before then: one unedited *trunk* row per prompt row is
        decoded, and when it is about to feed latent step k the waiting rows join the batch as copies of it (state,
        logs and cache); a trunk that stops before step k hands its rows its whole run. The result is that of
        running every row from the start (`tests/test_decoder_joins.py`: the same ids; vectors and logits to float
        rounding, as the batch around a row has another size), for less work: a patching grid's cells at latent
        step k skip the k steps they share with the unpatched run. Step listeners must take part
        (``on_reindex`` in `add_step_listener`); rows joining late may carry no control flags or step-count
        override (their edits would act before step k); under sampling every copy must draw from one stream.
        With ``keep_trunks`` (every prompt row must then have rows joining late) the result's rows are the decoded
        rows followed by one trunk row per prompt row, in order: the prompt decoded without edits, for free."""
        from dataclasses import replace as dc_replace

        if repeats < 1:
            raise LatentProbeError(f"repeats must be >= 1, got {repeats}", "decode each prompt row at least once")
        streams = list(range(repeats)) if streams is None else list(streams)
        if len(streams) != repeats:
            raise LatentProbeError(f"{len(streams)} sampling streams given for {repeats} repeats",
                                   "give one stream per repeat")
        n_rows = prefill.batch.batch_size * repeats
        joins = _check_joins(join_steps, n_rows)
        if keep_trunks and (joins is None or any(not any(joins[b * repeats:(b + 1) * repeats])
                                                 for b in range(prefill.batch.batch_size))):
            raise LatentProbeError("keep_trunks needs rows joining late (a join step > 0) for every prompt row",
                                   "decode the prompt on its own, or give each prompt row a row that joins late")
        if joins is not None:
            return self._decode_with_joins(prefill, _per_row(edits, n_rows), repeats, answer_mask, consume, streams,
                                           joins, keep_trunks)
        batch = prefill.batch
        if repeats > 1:  # the decode never reads pixels (the prompt's keys are cached): repeat the rest only
            batch = dc_replace(batch, pixel_values=None, image_grid_thw=None).repeat(repeats)
        cache = self._decode_cache(prefill.cache, repeats=repeats, consume=consume)
        hidden, position_ids = prefill.hidden, prefill.position_ids
        start_pending = prefill.start_pending
        if repeats > 1:
            hidden = hidden.repeat_interleave(repeats, dim=0)
            position_ids = position_ids.repeat_interleave(repeats, dim=1)
            if start_pending is not None:
                start_pending = start_pending.repeat_interleave(repeats, dim=0)
            for fn in self._expand_listeners:
                fn(repeats)
        device = hidden.device
        row_edits = _per_row(edits, batch.batch_size)
        generators = None
        if self.config.do_sample:
            generators = [row_generator(self.config.seed, iid, device, streams[r % repeats])
                          for r, iid in enumerate(batch.instance_ids)]
        return self._run_loop(batch, cache, hidden, position_ids, start_pending, row_edits, generators, answer_mask)

    def _run_loop(self, batch, cache, hidden, position_ids, start_pending, row_edits, generators, answer_mask,
                  joiner: "_Joiner | None" = None) -> DecodeResult:
        """The decoding loop over ``batch``'s rows (with a `_Joiner`: the rows decoded so far, growing)."""
        if answer_mask == "protocol":
            answer_mask = self.protocol.answer_mask if self.protocol is not None else None
        cfg = self.config
        device = hidden.device
        eos = torch.tensor(self.subject.eos_token_ids, device=device)
        pad_id = self.subject.pad_token_id
        state = _RowState.start(batch, self.protocol, position_ids, cfg, self.subject.hidden_size, device,
                                row_edits=row_edits, start_pending=start_pending,
                                needs_logits=self._needs_logits_rule())
        image_mask = batch.mm_token_type_ids.bool()
        self.last_cache = None
        step = 0
        while True:
            if joiner is not None and joiner.ready(state):
                batch, hidden, row_edits, generators = joiner.join(state, cache, hidden, row_edits, generators)
                image_mask = batch.mm_token_type_ids.bool()
            next_ids, next_latent = self._decide(state, hidden, row_edits, generators, eos, pad_id)
            kinds = state.input_kind
            state.append_inputs(next_ids, kinds, next_latent)
            positions = state.current_positions()
            if state.all_done():  # the last chosen ids are in the sequence; nothing is left to run
                break
            inputs = self.embed(next_ids.unsqueeze(1))
            if next_latent is not None:
                inputs = torch.where((kinds == LATENT).view(-1, 1, 1), next_latent.unsqueeze(1).to(inputs.dtype), inputs)
            attention = state.effective_attention(answer_mask, image_mask)
            self._publish(StepContext(step, kinds, state.input_latent_index.clone(), state.after_latent.clone(),
                                      batch.instance_ids, image_keys=image_mask, latent_keys=state.latent_keys,
                                      output_rows=None if joiner is None else joiner.logical))
            hidden = self._forward(inputs_embeds=inputs, attention_mask=attention, position_ids=positions,
                                   past_key_values=cache, use_cache=True)[:, -1]
            state.advance_positions()
            step += 1
        if joiner is not None and joiner.pending:  # trunks that stopped before their rows' step: copies of them
            batch, hidden, row_edits, generators = joiner.join(state, cache, hidden, row_edits, generators, final=True)
            image_mask = batch.mm_token_type_ids.bool()
        order = None if joiner is None else joiner.order()
        result = state.result(self.subject, batch, rows=order)
        self._read_answer_slots(result, state, cache, batch, answer_mask, image_mask, step,
                                output_rows=None if joiner is None else joiner.logical, state_rows=order)
        self.context = None
        self.last_cache = cache  # valid until the next decode, which may write into its buffers
        if isinstance(cache, PreallocatedCache) and cache.layers and hidden.device.type == "cpu":
            self._kv_pool = cache.buffers()
        return result

    def _decode_cache(self, source, *, index=None, repeats: int = 1, rows_room: int = 0, consume: bool = False):
        """The cache this decode runs on (`latentprobe.model.kv_cache.decode_cache`). A preallocated one is written
        into the buffers of the last preallocated CPU cache when they are large enough (handed out once): on a CPU
        a fresh buffer of tens of MiB page-faults at its first write; a GPU's caching allocator reuses memory."""
        reserve = self.cache_reserve()
        mode = resolve_mode(source, self.kv_cache, index=index, repeats=repeats, reserve=reserve, rows_room=rows_room)
        pool = None
        if mode == "preallocated" and self._kv_pool is not None:
            pool, self._kv_pool = self._kv_pool, None
            self.last_cache = None  # its buffers may now belong to the new decode
        return decode_cache(source, index=index, repeats=repeats, reserve=reserve, rows_room=rows_room, mode=mode,
                            consume=consume, pool=pool)

    def _decode_with_joins(self, prefill, row_edits, repeats, answer_mask, consume, streams, joins,
                           keep_trunks: bool = False):
        """`decode` with rows joining late (see ``join_steps``): trunk rows and rows that start at once first."""
        from dataclasses import replace as dc_replace

        if not self.listeners_follow_joins():
            raise LatentProbeError("rows joining a decode late need every step listener to follow the row layout",
                                   "register the listener with add_step_listener(..., on_reindex=...), or decode "
                                   "without join_steps")
        for r, k in enumerate(joins):
            edit = row_edits[r]
            if k and edit is not None and (edit.max_latent_steps(r) is not None or edit.removes_latent_phase(r)
                                           or edit.forces_end_exit(r) or edit.skipped_positions(r)):
                raise LatentProbeError(f"row {r} joins at latent step {k} but its edit changes the latent phase "
                                       "from the start", "give such rows join step 0")
        if self.config.do_sample and len(set(streams)) > 1:
            raise LatentProbeError("rows joining late copy their trunk's sampling stream, but the copies draw from "
                                   f"{len(set(streams))} streams", "pass streams=[0] * repeats")
        trunk_of = sorted({r // repeats for r, k in enumerate(joins) if k})  # prompt rows with a trunk
        start_rows = [r for r, k in enumerate(joins) if not k]
        logical = [-1] * len(trunk_of) + start_rows  # trunk rows first (their physical index never changes)
        prompt_rows = trunk_of + [r // repeats for r in start_rows]
        device = prefill.hidden.device
        index = torch.tensor(prompt_rows, dtype=torch.long, device=device)
        batch = _select_rows(dc_replace(prefill.batch, pixel_values=None, image_grid_thw=None), prompt_rows)
        n_joining = sum(1 for k in joins if k)
        cache = self._decode_cache(prefill.cache, index=index, rows_room=len(prompt_rows) + n_joining,
                                   consume=consume)
        hidden, position_ids = prefill.hidden[index], prefill.position_ids[:, index]
        start_pending = None if prefill.start_pending is None else prefill.start_pending[index]
        physical_edits = [None] * len(trunk_of) + [row_edits[r] for r in start_rows]
        generators = None
        if self.config.do_sample:
            generators = [row_generator(self.config.seed, iid, device, streams[0]) for iid in batch.instance_ids]
        waiting = {}
        for r, k in enumerate(joins):
            if k:
                waiting.setdefault(trunk_of.index(r // repeats), []).append((k, r))
        joiner = _Joiner(self, batch, prompt_rows, logical, waiting, row_edits, repeats, device, keep_trunks)
        for fn in self._reindex_listeners.values():
            fn(joiner.logical, None)
        return self._run_loop(batch, cache, hidden, position_ids, start_pending, physical_edits, generators,
                              answer_mask, joiner)

    def cache_reserve(self) -> int:
        """Positions a decode's preallocated cache keeps room for after the prompt: the token budget and a
        teacher-forced answer prefix (more only costs one reallocation)."""
        return self.config.max_new_tokens + len(self._answer_prefix_ids) + 2

    def prefill_positions(self, batch) -> torch.Tensor:
        """mRoPE position ids of the prompt, as ``get_rope_index`` gives them (3, B, L)."""
        if batch.image_grid_thw is None:
            text_pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
            return text_pos.unsqueeze(0).expand(3, -1, -1).contiguous()
        position_ids, _ = self.inner_model.get_rope_index(
            batch.input_ids, mm_token_type_ids=batch.mm_token_type_ids, image_grid_thw=batch.image_grid_thw,
            attention_mask=batch.attention_mask)
        return position_ids

    def add_step_listener(self, fn: Callable[[StepContext], None],
                          on_expand: Callable[[int], None] | None = None,
                          on_reindex: Callable[[torch.Tensor, torch.Tensor | None], None] | None = None
                          ) -> Callable[[], None]:
        """Call ``fn(context)`` before every forward (and ``on_expand(M)`` when a prefill is decoded M times
        side by side); returns a function that removes them. ``on_reindex(rows, index)`` follows a decode whose
        rows join late (``join_steps``): called with ``index`` None when it starts, then each time rows join, the
        decoded rows being the previous ones at ``index``; ``rows`` gives each decoded row's output row (-1: a
        trunk), as `StepContext.output_rows` does. A listener without it refuses such decodes."""
        self._step_listeners.append(fn)
        if on_expand is not None:
            self._expand_listeners.append(on_expand)
        if on_reindex is not None:
            self._reindex_listeners[fn] = on_reindex

        def remove():
            self._step_listeners.remove(fn)
            if on_expand is not None:
                self._expand_listeners.remove(on_expand)
            self._reindex_listeners.pop(fn, None)

        return remove

    def listeners_follow_joins(self) -> bool:
        """Whether every step listener follows rows joining late (``join_steps`` in `decode`)."""
        return all(fn in self._reindex_listeners for fn in self._step_listeners)

    # -- internals ------------------------------------------------------------------------------------------
    def _publish(self, context: StepContext):
        self.context = context
        for fn in self._step_listeners:
            fn(context)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def _select(self, logits: torch.Tensor, rows: torch.Tensor, generators) -> torch.Tensor:
        if not self.config.do_sample:
            return logits.argmax(dim=-1)
        scores = _warp(logits, self.config)
        probs = torch.softmax(scores, dim=-1)
        picks = [torch.multinomial(probs[i], 1, generator=generators[r]) for i, r in enumerate(rows.tolist())]
        return torch.cat(picks)

    def _feedback(self, hidden: torch.Tensor, computed_at_latent: bool = True) -> torch.Tensor:
        """The vector fed back from ``hidden``: through the protocol's head when the state was computed at a latent
        position (LVR never maps z_0, the start token's state). Used by the organisms' training unroll."""
        if self.feedback_head is None or not (computed_at_latent or self.protocol.head_maps_first):
            return hidden
        return self.feedback_head(hidden).to(hidden.dtype)

    def _through_head(self, hidden: torch.Tensor, rows: torch.Tensor, state: "_RowState") -> torch.Tensor:
        """LVR's head maps states computed at latent positions; the state of the position before the first latent
        step (z_0) is fed as it is (src/train/monkey_patch_forward_lvr.py: the head runs only in LVR mode)."""
        if self.feedback_head is None or not len(rows):
            return hidden
        if self.protocol.head_maps_first:  # CODI maps every fed vector, z_0 included
            return self.feedback_head(hidden).to(hidden.dtype)
        at_latent = (state.input_kind[rows] == LATENT).unsqueeze(-1)
        return torch.where(at_latent, self.feedback_head(hidden).to(hidden.dtype), hidden)

    def _decide(self, state: "_RowState", hidden, row_edits, generators, eos, pad_id):
        """Choose each row's next id (and latent vector) from the forward just run; update row modes.

        Row bookkeeping is done with whole-batch masks. The host reads the device at most twice per step: the
        rows that need logits and whether all rows are done (one read, made at the end of the previous step by
        `_RowState.record_choice`), and, only when a row can feed a latent vector at this step, which rows do
        (edits and the head are applied to those rows alone)."""
        proto = self.protocol
        bsz = hidden.shape[0]
        device = hidden.device
        state.log_hidden(hidden)
        state.finite = torch.isfinite(hidden).all(dim=-1)
        state.latent_bad = None
        mode = state.mode
        is_text = mode == TEXT
        any_latent = state.host_any_latent
        is_latent = mode == LATENT
        ends = is_latent & (state.phase_count >= state.limit) if any_latent else None
        need_rows = state.host_need  # rows whose choice is needed: the LM head runs for them alone
        choice = torch.full((bsz,), pad_id, dtype=torch.long, device=device)
        if need_rows:
            need = state.index_tensor(need_rows)
            states = hidden[need]
            if any_latent and self.feedback_head is not None:  # deciding latent rows read their state via the head
                states = torch.where(is_latent[need].unsqueeze(-1), self._through_head(states, need, state), states)
            logits = self._logits(states)
            scores = logits
            if proto is not None and proto.never_in_text_ids and state.host_any_text:  # ILVR's template, CODI's eot
                scores = logits.clone()
                ids = torch.tensor(sorted(proto.never_in_text_ids), dtype=torch.long, device=device)
                text_need = is_text[need].nonzero(as_tuple=True)[0]
                scores[text_need.unsqueeze(1), ids.unsqueeze(0)] = float("-inf")
            if state.no_latent is not None:  # rows without a latent phase never choose to open one
                if scores is logits:
                    scores = logits.clone()
                scores[state.no_latent[need], proto.start_id] = float("-inf")
            choice[need] = self._select(scores, need, generators)
            if hidden.dtype == torch.float16:  # finite states can overflow to infinite logits only in float16
                state.finite[need] &= torch.isfinite(logits).all(dim=-1)
        if state.start_pending is not None:  # a forced start in the inference layout: the start is the choice
            choice = torch.where(state.start_pending, torch.full_like(choice, proto.start_id), choice)
            state.start_pending = None

        # Rows that decide a text token: text rows, and latent rows whose phase ends here (the end token when the
        # exit is forced, the model's own choice under LVR's exit rule).
        deciding, deciding_ids, feeding = is_text, choice, None
        if any_latent:
            if proto.stop_rule == "end_token":
                ends = ends | (is_latent & (choice == proto.end_id))
            if proto.exit_rule != "model_choice":
                deciding_ids = torch.where(ends, torch.full_like(choice, proto.end_id), choice)
            if state.force_end is not None:  # markers-only: the end marker whatever the exit rule
                deciding_ids = torch.where(ends & state.force_end, torch.full_like(choice, proto.end_id),
                                           deciding_ids)
            state.close_latent(ends)
            deciding = is_text | ends
            feeding = is_latent & ~ends
        next_ids = torch.where(deciding, deciding_ids, torch.full_like(choice, pad_id))
        next_kind = torch.where(deciding, torch.full_like(choice, TEXT), torch.full_like(choice, DONE))
        opens_fed = None
        if proto is not None:
            opens = deciding & (deciding_ids == proto.start_id)
            state.open_latent(opens)
            if self.latent_layout == "inference":
                # The start token's position takes the state that chose it (step 0); no step to run: as text.
                opens_fed = opens & (state.limit > 0)
                feeding = opens_fed if feeding is None else feeding | opens_fed
        next_latent = None
        if feeding is not None:
            host_rows = [r for r, flag in enumerate(feeding.tolist()) if flag]  # the step's second (last) read
            if host_rows:
                feed_rows = state.index_tensor(host_rows)
                vectors = self._through_head(hidden[feed_rows], feed_rows, state)
                steps = state.latent_total[feed_rows]
                edited = _apply_edits(vectors, feed_rows, host_rows, steps, row_edits, self)
                if edited is not vectors or self.feedback_head is not None:  # only an edit or a head adds inf/NaN
                    state.latent_bad = torch.zeros_like(state.finite)
                    state.latent_bad[feed_rows] = ~torch.isfinite(edited).all(dim=-1)
                next_latent = torch.zeros_like(hidden)
                next_latent[feed_rows] = edited.to(hidden.dtype)
                fed_ids = torch.full_like(choice, proto.pad_id) if proto.write_pad_ids else choice
                if opens_fed is not None:
                    fed_ids = torch.where(opens_fed, torch.full_like(choice, proto.start_id), fed_ids)
                next_ids = torch.where(feeding, fed_ids, next_ids)
                next_kind = next_kind.masked_fill(feeding, LATENT)
                state.feed_latent(feeding)
        state.record_choice(next_ids, next_kind, eos, self.config.max_new_tokens)
        return next_ids, next_latent

    def _needs_logits_rule(self) -> str:
        """Which latent rows need logits: "all" (the stop rule reads the choice), "exit" (LVR's exit choice after
        the last latent step), or "none"."""
        proto = self.protocol
        if proto is None:
            return "none"
        if proto.needs_logits_in_latent:
            return "all"
        return "exit" if proto.exit_rule == "model_choice" else "none"

    def _read_answer_slots(self, result: DecodeResult, state: "_RowState", cache, batch, answer_mask, image_mask,
                           steps_run: int, output_rows: torch.Tensor | None = None,
                           state_rows: list[int] | None = None):
        """Each row's answer slot (see `latentprobe.model.answer_slot`): logged states where the prefix was found;
        the rest are teacher-forced through the cache together (`_teacher_force`). ``state_rows``: the decoded
        row (of ``state``, ``cache`` and ``batch``) of each result row, when they differ (late joins)."""
        tokenizer = self.subject.tokenizer
        eos_ids = set(self.subject.eos_token_ids)
        at = list(range(len(result.rows))) if state_rows is None else list(state_rows)
        kinds = result.input_kinds[:, result.prompt_length:].tolist()
        plans: list[SlotPlan | None] = []
        for r, row in enumerate(result.rows):
            if row.failed:
                plans.append(None)
                continue
            fed = [kind != DONE for kind in kinds[r][: len(row.generated_ids)]]
            plans.append(plan_slot(tokenizer, self.answer_prefix, self._answer_prefix_ids, batch.prompts[at[r]],
                                   row.generated_ids, [k == TEXT for k in row.step_kinds], fed, eos_ids))
        logits: dict[int, torch.Tensor] = {}
        usable = [SlotPlan("none", -1)] * len(state.mode)  # per decoded row
        for r, plan in enumerate(plans):
            if plan is not None:
                usable[at[r]] = plan
        result_row = {p: r for r, p in enumerate(at)}
        rows, states = gather_logged(state.hidden_log, usable)
        if rows:
            for p, value in zip(rows, self._logits(states)):
                logits[result_row[p]] = value
        forced_rows = [r for r, p in enumerate(plans) if p is not None and p.forced_ids]
        if forced_rows:
            for r, value in zip(forced_rows, self._teacher_force(state, cache, [at[r] for r in forced_rows],
                                                                 [plans[r].forced_ids for r in forced_rows],
                                                                 answer_mask, image_mask, batch, steps_run,
                                                                 logical=output_rows)):
                logits[r] = value
        for r, row in enumerate(result.rows):
            plan = plans[r]
            if plan is None:
                continue
            row.answer_slot, row.answer_slot_offset = plan.status, plan.offset
            row.answer_logits = logits[r].float().cpu() if r in logits else None
            if row.answer_logits is not None and not torch.isfinite(row.answer_logits).all():
                row.answer_logits, row.answer_slot = None, "none"

    def _teacher_force(self, state, cache, rows: list[int], forced: list[list[int]], answer_mask, image_mask,
                       batch, step: int, logical: torch.Tensor | None = None) -> torch.Tensor:
        """Feed ``forced[i]`` after the last position row ``rows[i]`` fed, all rows together, and return the logits
        after each row's last forced id. The cache is cropped back after.

        The forced ids run as single-token steps of the whole batch (rows with fewer or no forced ids are masked
        there), like the decoding loop's own steps: through a cache, a one-token step is the cheap path (several
        query tokens at once make the attention copy every cached key and value for grouped-query heads), so a
        sweep or a patching grid of M rows pays len(forced) batched steps, not one wide forward of M rows."""
        device = state.device
        bsz = len(state.mode)
        width = max(len(ids) for ids in forced)
        ids = torch.full((bsz, width), self.subject.pad_token_id, dtype=torch.long)
        present = torch.zeros((bsz, width), dtype=torch.long)
        for r, seq in zip(rows, forced):
            ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            present[r, : len(seq)] = 1
        ids, present = ids.to(device), present.to(device)
        # keys: what the cache holds (the last ids chosen in the loop were never run); the forced ids follow
        state.length = cache.get_seq_length()
        # the forced prefix sits after the latent phase: an organism's answer mask applies to it
        entered = torch.zeros(bsz, dtype=torch.bool, device=device)
        index = torch.tensor(rows, device=device)
        entered[index] = state.latent_mark[index, : state.length].any(dim=1)
        state.after_latent |= entered
        done = torch.full((bsz,), DONE, dtype=torch.long, device=device)
        no_step = torch.full((bsz,), -1, dtype=torch.long, device=device)
        last_of = {}
        for i, seq in enumerate(forced):
            last_of.setdefault(len(seq) - 1, []).append(i)
        slot_states: list[torch.Tensor | None] = [None] * len(rows)
        ran = 0
        try:
            for j in range(width):
                state.append_keys(present[:, j])
                attention = state.effective_attention(answer_mask, image_mask)
                positions = (state.next_position + j).view(1, -1, 1).expand(3, -1, 1).contiguous()
                self._publish(StepContext(step + j, done, no_step, state.after_latent.clone(), batch.instance_ids,
                                          output_rows=logical))
                ran += 1
                hidden = self._forward(inputs_embeds=self.embed(ids[:, j:j + 1]), attention_mask=attention,
                                       position_ids=positions, past_key_values=cache, use_cache=True)[:, -1]
                for i in last_of.get(j, []):
                    slot_states[i] = hidden[rows[i]]
        finally:
            if ran:
                cache.crop(-ran)  # drop the forced positions (a negative count, as transformers 5 asks)
        return self._logits(torch.stack(slot_states))


NONFINITE_STATE, NONFINITE_LATENT = 3, 4  # stop codes; 1 eos, 2 budget, 5 budget inside a latent phase
STOP_REASONS = {1: "eos", 2: "max_new_tokens", 3: "non_finite", 4: "non_finite", 5: "max_new_tokens_in_latent"}


def answer_slot_prefix(subject) -> str | None:
    """The text after which a subject's answer slot sits: its own ``answer_prefix``, else the close marker of its
    text mediator, else its protocol's end token; None (the first generated position) for plain models."""
    prefix = getattr(subject, "answer_prefix", None)
    if prefix:
        return prefix
    markers = getattr(subject, "text_mediator_markers", None)
    if markers:
        return markers[1]
    if subject.protocol is not None:
        return subject.protocol.end_token
    return None


def _strip_forced_start(batch, start_id: int):
    """A batch whose prompts end with the start token, without it, and the rows that must start (see prefill)."""
    from dataclasses import replace as dc_replace

    last = batch.input_ids[:, -1] == start_id
    if not bool(last.any()):
        return batch, None
    if not bool(last.all()):
        raise LatentProbeError("in the inference layout a batch must force the latent start in every row or in none",
                               "put prompts that end with the start token in a batch of their own")
    if batch.input_ids.shape[1] < 2:
        raise LatentProbeError("a prompt made only of the start token cannot be run in the inference layout",
                               "give the prompt some text before the start token")
    trim = lambda t: t[:, :-1]
    return dc_replace(batch, input_ids=trim(batch.input_ids), attention_mask=trim(batch.attention_mask),
                      mm_token_type_ids=trim(batch.mm_token_type_ids)), last


def from_first_image(image_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: each row's prompt positions from its first image token on (none in a row without an image)."""
    return image_mask.long().cumsum(dim=1) > 0


class _RowState:
    """Per-row decoding state, kept as tensors on the model's device.

    Each step is logged as whole-batch tensors (chosen ids, input kinds, live rows, latent inputs, the final
    hidden state); per-row lists (generated ids, latent vectors, segments) are derived once in `result`, so the
    decoding loop does not synchronise with the host once per row per step.

    The key-side columns (ids, kinds, key mask, latent marks) live in buffers allocated for the token budget and
    written in place (doubled if ever outgrown): a step costs the same at the 1,000th generated token as at the
    first, where concatenating growing tensors made it grow with the output's length.
    """

    @classmethod
    def start(cls, batch, proto, position_ids, cfg, hidden_size, device, row_edits=None, start_pending=None,
              needs_logits: str = "none"):
        self = cls()
        bsz = batch.batch_size
        self.device = device
        self.hidden_size = hidden_size
        self.prompt_length = batch.input_ids.shape[1]
        self.length = self.prompt_length  # columns written so far (prompt + generated inputs)
        capacity = self.prompt_length + cfg.max_new_tokens + 1
        self.sequences = _buffer(batch.input_ids, capacity, 0)
        self.attention = _buffer(batch.attention_mask, capacity, 0)
        self.kinds = _buffer(torch.full_like(batch.input_ids, TEXT), capacity, DONE)
        self.latent_mark = _buffer(torch.zeros_like(batch.input_ids, dtype=torch.bool), capacity, False)
        self.positions = [position_ids]
        self.latent_inputs: list[torch.Tensor | None] = []
        self.live_log: list[torch.Tensor] = []  # per step: rows whose choice is part of their output
        self.hidden_log: list[torch.Tensor] = []  # per step: the final hidden state the choice was made from
        self.next_position = position_ids.max(dim=2).values.max(dim=0).values + 1  # (B,)
        self.mode = torch.full((bsz,), TEXT, dtype=torch.long, device=device)
        self.phase_count = torch.zeros(bsz, dtype=torch.long, device=device)
        self.latent_total = torch.zeros(bsz, dtype=torch.long, device=device)
        self.after_latent = torch.zeros(bsz, dtype=torch.bool, device=device)
        self.n_generated = torch.zeros(bsz, dtype=torch.long, device=device)
        self.stop_code = torch.zeros(bsz, dtype=torch.long, device=device)  # see STOP_REASONS
        self.finite = torch.ones(bsz, dtype=torch.bool, device=device)  # this step's state (and logits) finite
        self.latent_bad: torch.Tensor | None = None  # this step's edited latent vectors not finite
        self.input_kind = torch.full((bsz,), TEXT, dtype=torch.long, device=device)
        self.input_latent_index = torch.full((bsz,), -1, dtype=torch.long, device=device)
        self.forced_start = torch.zeros(bsz, dtype=torch.bool, device=device)
        self.start_pending = start_pending
        self.limit = self._latent_limits(bsz, row_edits or [None] * bsz, proto, cfg)
        self.no_latent, self.force_end, self.position_skip = _control_flags(row_edits or [None] * bsz, device)
        if self.position_skip is not None and proto is not None and (cfg.latent_layout or proto.latent_layout) == "inference":
            # there the start token's own position is slot 0: one slot fewer to skip
           
            self.position_skip = (self.position_skip - 1).clamp(min=0)
        if self.no_latent is not None:
            self.after_latent |= self.no_latent  # no latent phase: the answer region starts at once
        self.needs_logits = needs_logits
        self._all_rows = torch.arange(bsz, device=device)
        if proto is not None:
            forced = batch.input_ids[:, -1] == proto.start_id
            pending = start_pending if start_pending is not None else torch.zeros_like(forced)
            if self.no_latent is not None and bool((self.no_latent & (forced | pending)).any()):
                raise LatentProbeError("a row without a latent phase was decoded from a prefill that forces the "
                                       "latent start", "decode it from prefill_without_start(decoder, prefill)")
            self.forced_start = forced
            self.mode = torch.where(forced, torch.full_like(self.mode, LATENT), self.mode)
        if start_pending is not None:
            self.forced_start = self.forced_start | start_pending
        self._read_host()
        return self

    def _latent_limits(self, bsz, row_edits, proto, cfg) -> torch.Tensor:
        """Each row's number of latent steps: the protocol's K or cap, or its edit's override (fixed per decode)."""
        default = 0
        if proto is not None:
            default = proto.num_steps if cfg.latent_steps is None else cfg.latent_steps
        limits = [default] * bsz
        for r, edit in enumerate(row_edits):
            override = edit.max_latent_steps(r) if edit is not None else None
            if override is not None:
                limits[r] = override
        return torch.tensor(limits, dtype=torch.long, device=self.device)

    def _read_host(self):
        """The one read of the device per step: every row's mode and whether the next step needs its logits
        (text rows; latent rows whose choice the protocol reads). Kept on the host for the next `_decide`."""
        latent = self.mode == LATENT
        if self.needs_logits == "exit":
            latent = latent & (self.phase_count >= self.limit)
        elif self.needs_logits == "none":
            latent = torch.zeros_like(latent)
        need = (self.mode == TEXT) | latent
        self.host_modes, self.host_needed, self.host_latent_total = \
            torch.stack([self.mode, need.long(), self.latent_total]).tolist()
        self._derive_host()

    def _derive_host(self):
        modes = self.host_modes
        self.host_need = [r for r, flag in enumerate(self.host_needed) if flag]
        self.host_any_latent = LATENT in modes
        self.host_any_text = TEXT in modes
        self.host_all_done = all(m == DONE for m in modes)

    _ROW_TENSORS = ("sequences", "attention", "kinds", "latent_mark", "next_position", "mode", "phase_count",
                    "latent_total", "after_latent", "n_generated", "stop_code", "finite", "latent_bad", "input_kind",
                    "input_latent_index", "forced_start", "start_pending", "limit", "no_latent", "force_end",
                    "position_skip")

    def reindex(self, index: torch.Tensor, index_list: list[int]):
        """The rows become the current rows at ``index`` (rows joining a decode as copies of their trunk): every
        per-row tensor, every step's log and the host copies of the last read (no device read)."""
        for name in self._ROW_TENSORS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[index])
        self.positions = [p[:, index] for p in self.positions]
        self.latent_inputs = [None if v is None else v[index] for v in self.latent_inputs]
        self.live_log = [v[index] for v in self.live_log]
        self.hidden_log = [v[index] for v in self.hidden_log]
        self._all_rows = torch.arange(len(index_list), device=self.device)
        self.host_modes = [self.host_modes[i] for i in index_list]
        self.host_needed = [self.host_needed[i] for i in index_list]
        self.host_latent_total = [self.host_latent_total[i] for i in index_list]
        self._derive_host()

    def index_tensor(self, rows: list[int]) -> torch.Tensor:
        """Row indices on the device (all rows: a tensor made once; else a host-to-device copy, not a sync)."""
        if len(rows) == len(self._all_rows):
            return self._all_rows
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    # mode transitions (row masks)
    def open_latent(self, rows: torch.Tensor):
        self.mode = self.mode.masked_fill(rows, LATENT)
        self.phase_count = self.phase_count.masked_fill(rows, 0)

    def close_latent(self, rows: torch.Tensor):
        self.mode = self.mode.masked_fill(rows, TEXT)
        self.after_latent = self.after_latent | rows
        if self.position_skip is not None:  # markers-only with positions kept: jump over the slots' positions
            self.next_position = self.next_position + self.position_skip * rows.long()

    def feed_latent(self, rows: torch.Tensor):
        self.phase_count = self.phase_count + rows.long()
        self.latent_total = self.latent_total + rows.long()

    def log_hidden(self, hidden):
        self.hidden_log.append(hidden)

    def record_choice(self, next_ids, next_kind, eos, max_new_tokens):
        """A text-mode eos, the token budget or a non-finite value ends a row; what each row feeds next becomes its
        input kind. A latent input chosen for a position that will never run, and the choice made from non-finite
        values, are not part of the row's output."""
        live = self.mode != DONE
        bad_state = ~self.finite
        bad = live & (bad_state if self.latent_bad is None else bad_state | self.latent_bad)
        ok = live & ~bad
        hit_eos = ok & (next_kind == TEXT) & torch.isin(next_ids, eos)
        self.n_generated += live.long()
        out_of_budget = ok & ~hit_eos & (self.n_generated >= max_new_tokens)
        in_latent = out_of_budget & (next_kind == LATENT)
        # a row stops once (its code is 0 until then): eos 1, budget 2, budget inside a latent phase 5, non-finite 3/4
        self.stop_code += hit_eos.long() + 2 * out_of_budget.long() + 3 * in_latent.long()
        if self.latent_bad is None:
            self.stop_code += NONFINITE_STATE * bad.long()
        else:
            self.stop_code += bad.long() * torch.where(bad_state, NONFINITE_STATE, NONFINITE_LATENT)
        finished = hit_eos | out_of_budget | bad
        # A latent vector chosen as the input of a position that will never run was not fed back: undo it.
        self.latent_total -= (finished & (next_kind == LATENT)).long()
        self.mode = self.mode.masked_fill(finished, DONE)
        next_kind = next_kind.masked_fill(~ok | finished, DONE)
        self.live_log.append(ok & ~in_latent)
        self.input_kind = next_kind
        self.input_latent_index = (self.latent_total - 1).masked_fill(next_kind != LATENT, -1)
        self._read_host()

    def all_done(self) -> bool:
        return self.host_all_done  # read with the step's modes in `record_choice`

    # sequence bookkeeping
    def _reserve(self, columns: int):
        """Room for ``columns`` more key columns: the buffers double when outgrown (amortised O(1) per step)."""
        need = self.length + columns
        if need <= self.attention.shape[1]:
            return
        capacity = max(need, 2 * self.attention.shape[1])
        self.sequences = _buffer(self.sequences[:, : self.length], capacity, 0)
        self.attention = _buffer(self.attention[:, : self.length], capacity, 0)
        self.kinds = _buffer(self.kinds[:, : self.length], capacity, DONE)
        self.latent_mark = _buffer(self.latent_mark[:, : self.length], capacity, False)

    def append_inputs(self, next_ids, kinds, next_latent):
        self._reserve(1)
        t = self.length
        self.sequences[:, t] = next_ids
        self.attention[:, t] = kinds != DONE
        self.kinds[:, t] = kinds
        self.latent_mark[:, t] = kinds == LATENT
        self.latent_inputs.append(next_latent)
        self.length = t + 1

    def append_keys(self, attend: torch.Tensor):
        """A key column that is not part of any row's output (a teacher-forced answer prefix): text, attended
        where ``attend``."""
        self._reserve(1)
        t = self.length
        self.attention[:, t] = attend
        self.latent_mark[:, t] = False
        self.length = t + 1

    @property
    def latent_keys(self) -> torch.Tensor:
        """(B, keys so far) which keys were latent inputs (a view: written columns are never rewritten)."""
        return self.latent_mark[:, : self.length]

    def current_positions(self) -> torch.Tensor:
        pos = self.next_position.view(1, -1, 1).expand(3, -1, 1).contiguous()
        self.positions.append(pos)
        return pos

    def advance_positions(self):
        self.next_position = self.next_position + (self.input_kind != DONE).long()

    def effective_attention(self, answer_mask, image_mask) -> torch.Tensor:
        """The key mask for this step: padding, plus an organism's answer mask for rows past their latents.
        (`organisms.unroll` calls this on its own state, whose ``attention`` is a list of column blocks.)"""
        if isinstance(self.attention, list):
            attention, latent_mark = torch.cat(self.attention, dim=1), self.latent_mark
        else:
            attention, latent_mark = self.attention[:, : self.length], self.latent_mark
        return _key_mask(attention, latent_mark, self.after_latent, answer_mask, image_mask,
                         getattr(self, "mode", None))

    def result(self, subject, batch, rows: list[int] | None = None) -> DecodeResult:
        """Derive every row's outputs from the step logs (one transfer to the host); with ``rows``, those rows in
        that order (a decode whose rows joined late: its output rows, then any trunks kept)."""
        length = self.length
        index = None if rows is None else torch.tensor(rows, dtype=torch.long, device=self.sequences.device)
        pick = (lambda t: t) if index is None else (lambda t: t[index.to(t.device)])
        sequences = pick(self.sequences[:, :length]).to("cpu", copy=True)
        kinds = pick(self.kinds[:, :length]).to("cpu", copy=True)
        live = pick(torch.stack(self.live_log, dim=1)).cpu() if self.live_log \
            else torch.zeros((len(sequences), 0), dtype=torch.bool)
        bsz, length = sequences.shape
        latent_inputs = torch.zeros((bsz, length, self.hidden_size), dtype=torch.float32)
        fed = [(t, vec) for t, vec in enumerate(self.latent_inputs) if vec is not None]
        if fed:  # one transfer for every step's latent inputs; only vectors that were really fed
            columns = torch.tensor([self.prompt_length + t for t, _ in fed])
            vectors = pick(torch.stack([vec for _, vec in fed], dim=1)).float().cpu()
            latent_inputs[:, columns] = vectors * (kinds[:, columns] == LATENT).unsqueeze(-1)
        stop_code = pick(self.stop_code).cpu().tolist()
        forced = pick(self.forced_start).cpu().tolist()
        instance_ids = batch.instance_ids if rows is None else [batch.instance_ids[p] for p in rows]
        generated_part = sequences[:, self.prompt_length:]
        kinds_part = kinds[:, self.prompt_length:]
        # per-row lists from one host copy of each log (no per-row or per-step reads)
        live_rows, id_rows, kind_rows = live.tolist(), generated_part.tolist(), kinds_part.tolist()
        prompt_lengths = pick(batch.attention_mask).sum(dim=1).tolist()
        out = []
        for r in range(bsz):
            steps = [t for t, flag in enumerate(live_rows[r]) if flag]
            ids = [id_rows[r][t] for t in steps]
            step_kinds = [LATENT if kind_rows[r][t] == LATENT else TEXT for t in steps]
            latent_offsets = [j for j, k in enumerate(step_kinds) if k == LATENT]
            segments: list[list[int]] = []
            for j in latent_offsets:
                if segments and segments[-1][0] + segments[-1][1] == j:
                    segments[-1][1] += 1
                else:
                    segments.append([j, 1])
            positions = [self.prompt_length + steps[j] for j in latent_offsets]
            vectors = latent_inputs[r, positions] if positions else torch.zeros((0, self.hidden_size))
            text_ids = [tok for tok, kind in zip(ids, step_kinds) if kind == TEXT]
            error = ""
            if stop_code[r] in (NONFINITE_STATE, NONFINITE_LATENT):
                what = "hidden state or logits" if stop_code[r] == NONFINITE_STATE else "latent vector (after any edit)"
                error = (f"non-finite values (NaN or inf) in the {what} at generated position {len(ids)}; "
                         "the row was stopped there")
            out.append(RowOutput(
                instance_id=instance_ids[r], prompt_length=int(prompt_lengths[r]),
                generated_ids=ids, step_kinds=step_kinds,
                text=subject.tokenizer.decode(text_ids, skip_special_tokens=True),
                latent_vectors=vectors, latent_segments=[tuple(seg) for seg in segments],
                forced_start=bool(forced[r]), stop_reason=STOP_REASONS.get(stop_code[r], ""),
                raw_text=subject.tokenizer.decode(text_ids, skip_special_tokens=False), error=error))
        positions = torch.cat(self.positions, dim=2)
        return DecodeResult(rows=out, sequences=sequences,
                            attention_mask=pick(self.attention[:, :length]).to("cpu", copy=True),
                            position_ids=(positions if index is None else positions[:, index]).cpu(), input_kinds=kinds,
                            prompt_length=self.prompt_length, latent_inputs=latent_inputs)


def _check_joins(join_steps, n_rows: int) -> list[int] | None:
    """``join_steps`` checked (one whole number >= 0 per decoded row); None when no row joins late."""
    if join_steps is None:
        return None
    joins = list(join_steps)
    if len(joins) != n_rows:
        raise LatentProbeError(f"{len(joins)} join steps given for a decode of {n_rows} rows",
                               "give one join step per decoded row (prompt rows x repeats)")
    for k in joins:
        if isinstance(k, bool) or not float(k).is_integer() or k < 0:
            raise LatentProbeError(f"join step {k!r} is not a whole number >= 0", "0 runs a row from the start")
    joins = [int(k) for k in joins]
    return joins if any(joins) else None


def _select_rows(batch, rows: list[int]):
    """The prompt batch's rows ``rows`` (with repeats), without images (a decode never reads pixels)."""
    from dataclasses import replace as dc_replace

    index = torch.tensor(rows, dtype=torch.long, device=batch.input_ids.device)
    return dc_replace(batch, instance_ids=[batch.instance_ids[r] for r in rows], input_ids=batch.input_ids[index],
                      attention_mask=batch.attention_mask[index], mm_token_type_ids=batch.mm_token_type_ids[index],
                      pixel_values=None, image_grid_thw=None, prompts=[batch.prompts[r] for r in rows],
                      image_counts=[batch.image_counts[r] for r in rows] if batch.image_counts else [])


def _clone_generator(generator: torch.Generator) -> torch.Generator:
    twin = torch.Generator(device=generator.device)
    twin.set_state(generator.get_state())
    return twin


class _Joiner:
    """The rows of a decode with late joins (`LatentDecoder.decode`'s ``join_steps``): each decoded row's output
    row (-1: a trunk) and the rows still waiting for their trunk to reach their latent step."""

    def __init__(self, decoder, batch, prompt_rows, logical, waiting, row_edits, repeats, device,
                 keep_trunks: bool = False):
        self.decoder, self.repeats, self.device = decoder, repeats, device
        self.keep_trunks = keep_trunks  # the result keeps one trunk row per prompt row after the output rows
        self.prompt_batch = batch  # the prompt rows' batch (selected from the prefill's, no images)
        self.base_rows = list(range(len(prompt_rows)))  # each decoded row's row in prompt_batch
        self.logical_list = list(logical)
        self.logical = torch.tensor(logical, dtype=torch.long, device=device)
        self.waiting = {t: sorted(rows) for t, rows in waiting.items()}  # trunk row -> [(join step, output row)]
        self.row_edits = row_edits

    @property
    def pending(self) -> bool:
        return bool(self.waiting)

    def ready(self, state) -> bool:
        """Whether a trunk is about to feed (or is past) the first latent step its waiting rows join at."""
        return any(state.host_modes[t] == DONE or state.host_latent_total[t] >= rows[0][0]
                   for t, rows in self.waiting.items())

    def join(self, state, cache, hidden, row_edits, generators, final: bool = False):
        from .kv_cache import append_rows

        sources, joined = [], []
        for t in list(self.waiting):
            rows = self.waiting[t]
            done = final or state.host_modes[t] == DONE
            while rows and (done or rows[0][0] <= state.host_latent_total[t]):
                sources.append(t)
                joined.append(rows.pop(0)[1])
            if not rows:
                del self.waiting[t]
        if not sources:
            return self._batch(), hidden, row_edits, generators
        index_list = list(range(len(self.logical_list))) + sources
        index = torch.tensor(index_list, dtype=torch.long, device=self.device)
        state.reindex(index, index_list)
        append_rows(cache, sources)
        hidden = hidden[index]
        row_edits = list(row_edits) + [self.row_edits[r] for r in joined]
        if generators is not None:
            generators = list(generators) + [_clone_generator(generators[t]) for t in sources]
        self.base_rows += [self.base_rows[t] for t in sources]
        self.logical_list += joined
        self.logical = torch.tensor(self.logical_list, dtype=torch.long, device=self.device)
        for fn in self.decoder._reindex_listeners.values():
            fn(self.logical, index)
        return self._batch(), hidden, row_edits, generators

    def _batch(self):
        return _select_rows(self.prompt_batch, self.base_rows)

    def order(self) -> list[int]:
        """The decoded row of each output row, in order, then (``keep_trunks``) the trunk rows."""
        where = {r: p for p, r in enumerate(self.logical_list) if r >= 0}
        trunks = [p for p, r in enumerate(self.logical_list) if r < 0] if self.keep_trunks else []
        return [where[r] for r in range(len(where))] + trunks


def _control_flags(row_edits, device):
    """Per-row (no latent phase, forced end exit, skipped positions) from the edits; None where no row has one."""
    flags = []
    for method, dtype in (("removes_latent_phase", torch.bool), ("forces_end_exit", torch.bool),
                          ("skipped_positions", torch.long)):
        values = [int(getattr(edit, method, lambda r: 0)(r)) if edit is not None else 0
                  for r, edit in enumerate(row_edits)]
        flags.append(torch.tensor(values, dtype=dtype, device=device) if any(values) else None)
    return tuple(flags)


@torch.no_grad()
def prefill_without_start(decoder: "LatentDecoder", prefill: "Prefill") -> "Prefill":
    """The prefill of the same prompts without their forced latent start token, derived from ``prefill`` (the
    ``no-latent`` control reuses the clean prefill). In the ``inference`` layout the start token was never run:
    only its pending write is dropped. In the ``training`` layout the cache is cropped before the start token and
    the last prompt token is run again (one position, no recorder context) for the state that chooses the first
    token. Prompts that do not end with the start token come back as they are."""
    import copy
    from dataclasses import replace as dc_replace

    proto = decoder.protocol
    if proto is None:
        return prefill
    if prefill.start_pending is not None:
        return Prefill(batch=prefill.batch, cache=prefill.cache, hidden=prefill.hidden,
                       position_ids=prefill.position_ids, start_pending=None)
    batch = prefill.batch
    last = batch.input_ids[:, -1] == proto.start_id
    if not bool(last.any()):
        return prefill
    if not bool(last.all()) or batch.input_ids.shape[1] < 3:
        raise LatentProbeError("a no-latent prefill needs every prompt of the batch to end with the start token "
                               "after some text", "put prompts that force the latent start in a batch of their own")
    trim = lambda t: t[:, :-1]
    start = proto.start_token
    prompts = [p[: -len(start)] if start and p.endswith(start) else p for p in batch.prompts]
    batch = dc_replace(batch, input_ids=trim(batch.input_ids), attention_mask=trim(batch.attention_mask),
                       mm_token_type_ids=trim(batch.mm_token_type_ids), prompts=prompts)
    cache = copy.deepcopy(prefill.cache)
    cache.crop(-2)  # drop the start token and the position before it, which is run again for its state
    position_ids = prefill.position_ids[:, :, :-1]
    hidden = decoder._forward(inputs_embeds=decoder.embed(batch.input_ids[:, -1:]), attention_mask=batch.attention_mask,
                              position_ids=position_ids[:, :, -1:].contiguous(), past_key_values=cache,
                              use_cache=True)[:, -1]
    return Prefill(batch=batch, cache=cache, hidden=hidden, position_ids=position_ids, start_pending=None)
def _buffer(head: torch.Tensor, capacity: int, fill) -> torch.Tensor:
    """A (B, capacity) tensor like ``head`` whose first columns are ``head`` and the rest ``fill``."""
    out = torch.full((head.shape[0], capacity), fill, dtype=head.dtype, device=head.device)
    out[:, : head.shape[1]] = head
    return out


def _key_mask(attention, latent_mark, after_latent, answer_mask, image_mask, mode=None) -> torch.Tensor:
    """Padding, plus an organism's answer mask (blocking image or latent keys) for rows past their latents, or
    (``latents_blind_to_image``) blocking the image for rows in latent mode."""
    if answer_mask is None:
        return attention
    if "+" in answer_mask:  # several masks at once, each as alone (the text-bypass organism)
        for part in answer_mask.split("+"):
            attention = _key_mask(attention, latent_mark, after_latent, part, image_mask, mode)
        return attention
    length = attention.shape[1]
    if answer_mask == "answer_blind_to_image":
        blocked = torch.zeros_like(attention, dtype=torch.bool)
        blocked[:, : image_mask.shape[1]] = image_mask
    elif answer_mask == "answer_blind_to_latents":
        blocked = latent_mark[:, :length]
    elif answer_mask == "latents_blind_to_image":
        # While a row is in latent mode (its start token and latent positions as queries), it cannot attend the
        # image or any prompt position after it (whose upper-layer states read the image); the answer can.
        blocked = torch.zeros_like(attention, dtype=torch.bool)
        blocked[:, : image_mask.shape[1]] = from_first_image(image_mask)
        return attention.masked_fill(blocked & (mode == LATENT).unsqueeze(1), 0)
    elif answer_mask in ("answer_blind_to_prompt", "latents_blind_to_prompt"):
        # Every prompt position (image_mask spans the prompt's columns), for rows past their latents or in latent
        # mode (the text organisms: their prompt is the question, so this is the question's route)
        blocked = torch.zeros_like(attention, dtype=torch.bool)
        blocked[:, : image_mask.shape[1]] = True
        if answer_mask == "latents_blind_to_prompt":
            return attention.masked_fill(blocked & (mode == LATENT).unsqueeze(1), 0)
    else:
        raise LatentProbeError(f"unknown answer mask {answer_mask!r}",
                               "use answer_blind_to_image, answer_blind_to_latents, latents_blind_to_image, "
                               "answer_blind_to_prompt or latents_blind_to_prompt (or several joined by '+')")
    blocked = blocked & after_latent.unsqueeze(1)
    return attention.masked_fill(blocked, 0)


def _per_row(edits, bsz) -> list:
    if edits is None or isinstance(edits, LatentEdit) or not isinstance(edits, (list, tuple)):
        return [edits] * bsz
    if len(edits) != bsz:
        raise LatentProbeError(f"{len(edits)} edits given for a batch of {bsz}", "give one edit per row, or one for all")
    return list(edits)


def _apply_edits(vectors, rows, host_rows, steps, row_edits, decoder):
    """Apply each row's edit to its latent vector; rows sharing an edit object are edited together.
    ``host_rows`` is ``rows`` already read to the host (grouping costs no further device read)."""
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(host_rows):
        if row_edits[r] is not None:
            groups.setdefault(id(row_edits[r]), []).append(i)
    if not groups:
        return vectors
    vectors = vectors.clone()
    for members in groups.values():
        idx = torch.tensor(members, device=vectors.device)
        edit = row_edits[host_rows[members[0]]]
        vectors[idx] = edit.edit_latent(vectors[idx], rows[idx], steps[idx], decoder).to(vectors.dtype)
    return vectors


def _warp(logits: torch.Tensor, cfg: DecodeConfig) -> torch.Tensor:
    """Temperature, top-k and top-p with transformers' own logits warpers."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    scores = logits
    if cfg.temperature != 1.0:
        scores = TemperatureLogitsWarper(cfg.temperature)(None, scores)
    if cfg.top_k:
        scores = TopKLogitsWarper(cfg.top_k)(None, scores)
    if cfg.top_p < 1.0:
        scores = TopPLogitsWarper(cfg.top_p)(None, scores)
    return scores


def _new_cache(model):
    """A prefill's cache: transformers' `DynamicCache` (a decode copies it into the cache it runs on,
    `latentprobe.model.kv_cache.decode_cache`)."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config.get_text_config())


def _get_submodule(model, path: str):
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


@torch.no_grad()
def replay(subject, batch, result: DecodeResult, position_ids: torch.Tensor | None = None,
           output_hidden_states: bool = False, attention_mask: torch.Tensor | None = None):
    """Run a whole decoded sequence in one forward without a cache (the reference for cached decoding).

    Ids drive image scattering and positions; embeddings are the ids' embeddings except at the positions whose
    input was a latent vector (``result.input_kinds == LATENT``), where the fed vectors are used as given (a
    zeroed latent stays a latent). Positions default to ``get_rope_index`` over the full sequence. Returns the
    final-norm hidden states (B, T, D), or the full ``hidden_states`` tuple when ``output_hidden_states``.
    ``attention_mask`` replaces the padding mask in the forward (e.g. a 4D mask with an organism's answer mask).
    """
    device = subject.device
    sequences = result.sequences.to(device)
    forward_mask = None if attention_mask is None else attention_mask.to(device)
    attention_mask = result.attention_mask.to(device)
    batch = batch.to(device)
    mm_types = torch.zeros_like(sequences)
    mm_types[:, : batch.mm_token_type_ids.shape[1]] = batch.mm_token_type_ids
    embeds = subject.model.get_input_embeddings()(sequences)
    # A generated <|image_pad|> is text: hide it from the image scatter (which counts image ids), keep its embedding.
    image_id = getattr(subject.model.config, "image_token_id", None)
    if image_id is not None:
        generated = torch.zeros_like(sequences, dtype=torch.bool)
        generated[:, result.prompt_length:] = True
        sequences = sequences.masked_fill(generated & (sequences == image_id), subject.pad_token_id)
    is_latent = (result.input_kinds == LATENT).to(device).unsqueeze(-1)
    embeds = torch.where(is_latent, result.latent_inputs.to(device=device, dtype=embeds.dtype), embeds)
    if position_ids is None:
        if batch.image_grid_thw is not None:
            position_ids, _ = subject.model.model.get_rope_index(  # images: Qwen2.5-VL
                sequences, mm_token_type_ids=mm_types, image_grid_thw=batch.image_grid_thw,
                attention_mask=attention_mask)
        else:
            position_ids = ((attention_mask.cumsum(-1) - 1).clamp(min=0)).unsqueeze(0).expand(3, -1, -1)
    out = backbone_call(subject.model)(input_ids=sequences, inputs_embeds=embeds,
                                       attention_mask=attention_mask if forward_mask is None else forward_mask,
                              position_ids=position_ids.to(device), pixel_values=batch.pixel_values,
                              image_grid_thw=batch.image_grid_thw, mm_token_type_ids=mm_types, use_cache=False,
                              output_hidden_states=output_hidden_states)
    return out.hidden_states if output_hidden_states else out.last_hidden_state
