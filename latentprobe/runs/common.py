"""What every run shares: record rows, failure isolation, manifests, out-of-memory handling, the progress bar.

`trace` (latentprobe.runs.trace), `intervene` (latentprobe.runs.intervene) and the where-and-when runners build
their index rows, isolate failing instances and describe their runs with these functions, so one run's records
and manifest look like another's.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any, Sequence

import torch

from ..model.answers import score_answer
from ..data.instances import Instance, dataset_fingerprint, load_images
from ..model.decoding import DecodeConfig, LatentDecoder, RowOutput
from ..errors import InstanceError
from ..model.recording import Recorder, RecordSpec

log = logging.getLogger(__name__)


def manifest_for(subject, instances: Sequence[Instance], config: DecodeConfig, spec: RecordSpec, layer_ids,
                 kind: str, data_source: str | None, extra: dict | None = None) -> dict[str, Any]:
    """The run's manifest: what ran (subject, protocol, checkpoint), on what data, how it decoded and recorded."""
    return {
        "kind": kind,
        "subject": subject.describe(),
        "subject_name": subject.name,
        "protocol": subject.protocol.describe() if subject.protocol else None,
        "checkpoint": subject.checkpoint,
        "subject_fingerprint": subject.fingerprint(),
        "data": {"source": data_source, "n_instances": len(instances)},
        "data_fingerprint": dataset_fingerprint(list(instances)),
        "seed": config.seed,
        "decode": asdict(config),
        "record": {**spec.describe(), "layer_ids": layer_ids, "num_layers": subject.num_layers},
        # which latent layout ran (latentprobe.model.protocol) and where the answer slot is read (latentprobe.model.answer_slot)
        "latent_layout": (config.latent_layout or subject.protocol.latent_layout) if subject.protocol else None,
        "answer_prefix": subject.answer_slot_prefix,
        **(extra or {}),
    }


def row_record(subject, instance: Instance, row: RowOutput, **extra: Any) -> dict[str, Any]:
    """The index row for one decoded instance (everything but the tensors)."""
    answer_text = subject.answer_region(row.raw_text) if subject.text_mediator_markers else row.text
    scored = score_answer(answer_text, instance, subject.answer_parser)
    probs = subject.answer_probabilities(instance, row.answer_logits)
    gold = subject.gold_index(instance)
    return {
        "instance_id": instance.id, "subject": subject.name, "status": "ok", "error": "",
        "text": row.text, "parsed_answer": scored.canonical, "answer_status": scored.status,
        "correct": bool(scored.correct), "gold_answer": instance.answer,
        "answer_probs": probs, "gold_prob": float(probs[gold]) if probs is not None and gold is not None else None,
        "mediator_text": subject.mediator_span(row.raw_text) if subject.text_mediator_markers else None,
        "entered_latent": row.entered_latent, "latent_start": -1 if row.latent_start is None else row.latent_start,
        "n_latent_steps": row.n_latent_steps, "latent_segments": [list(s) for s in row.latent_segments],
        # A row that enters latent mode again: latentprobe caps every phase at the protocol's K, where Mirage's own
        # loop never ends a second phase (its step count and end flag are not reset); flagged so users can compare.
        "n_latent_phases": len(row.latent_segments), "reentered_latent": len(row.latent_segments) > 1,
        "forced_start": row.forced_start, "stop_reason": row.stop_reason, "n_generated": len(row.generated_ids),
        "answer_slot": row.answer_slot, "answer_slot_offset": row.answer_slot_offset,
        "latent_exit": [subject.tokenizer.convert_ids_to_tokens(i) for i in row.latent_exit_ids],
        "prompt_length": row.prompt_length, "generated_ids": list(row.generated_ids),
        "split": instance.split or "", "task": instance.task or "", "attributes": dict(instance.attributes),
        **extra,
    }


def failed_record(subject, instance: Instance, reason: str, **extra: Any) -> dict[str, Any]:
    """The index row for an instance that failed, with its reason (the rest of the run goes on)."""
    return {"instance_id": instance.id, "subject": subject.name, "status": "failed", "error": reason,
            "correct": False, "entered_latent": False, "n_latent_steps": 0, "n_latent_phases": 0,
            "reentered_latent": False, "split": instance.split or "",
            "task": instance.task or "", "attributes": dict(instance.attributes), **extra}


def decode_with_isolation(decoder: LatentDecoder, subject, instances: list[Instance], recorder: Recorder | None,
                          images: list[list] | None = None, keep_prefill=None):
    """Decode a batch; if the batch fails, decode its instances one by one so only the culprit fails.

    Yields (instance, images, row_output or None, tensors or None, error or None). Images are loaded here
    unless given; an unreadable image fails only its own instance. ``keep_prefill(instances, prefill)`` is called
    with the prompt prefill of every batch decoded (after its records are read), for a caller that decodes the
    same prompts again (an intervention run's edits).
    """
    ready, loaded = [], []
    for k, inst in enumerate(instances):
        try:
            loaded.append(images[k] if images is not None else load_images(inst))
            ready.append(inst)
        except InstanceError as exc:
            yield inst, None, None, None, str(exc)
    if not ready:
        return
    try:
        batch = subject.encode(ready, images=loaded)
        if keep_prefill is None:
            result = decoder.run(batch)
        else:  # `run`'s two halves, so that the prefill outlives the decode (which works on a copy of its cache)
            prefill = decoder.prefill(batch)
            result = decoder.decode(prefill)
        records = recorder.records() if recorder is not None else [{} for _ in ready]
        if keep_prefill is not None:
            keep_prefill(ready, prefill)
        for inst, imgs, row, tensors in zip(ready, loaded, result.rows, records):
            if row.failed:  # non-finite values: this row alone fails, with the decoder's reason
                yield inst, imgs, None, None, row.error
            else:
                yield inst, imgs, row, tensors, None
    except (InstanceError, RuntimeError, ValueError, IndexError) as exc:
        if len(ready) == 1:
            yield ready[0], loaded[0], None, None, f"{type(exc).__name__}: {exc}"
            return
        if is_oom(exc):  # out of memory: halve the batch (and free what the failed one held), lose nothing
            log.warning("out of memory at batch %d; retrying in halves", len(ready))
            free_accelerator_memory()
            half = len(ready) // 2
            parts = [(ready[:half], loaded[:half]), (ready[half:], loaded[half:])]
        else:  # anything else: isolate the failing instance
            parts = [([inst], [imgs]) for inst, imgs in zip(ready, loaded)]
        for insts, imgs in parts:
            yield from decode_with_isolation(decoder, subject, insts, recorder, images=imgs, keep_prefill=keep_prefill)


def free_accelerator_memory():
    """Release what a failed batch held on the accelerator."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error (then halving the batch may succeed)."""
    return "out of memory" in str(exc).lower()


class LineProgress:
    """Progress as plain lines on stderr, for logs and redirected output (a tqdm bar there prints nothing useful):
    one line at most every ``every`` seconds and at the end, e.g. ``trace: 120/600 instances (20%), 45 s``."""

    def __init__(self, total: int, desc: str, every: float = 30.0, stream=None):
        import sys
        import time

        self.total, self.desc, self.every, self.n = int(total), desc, every, 0
        self.stream = stream or sys.stderr
        self.started = self.last = time.monotonic()

    def update(self, n: int = 1):
        import time

        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every and self.n < self.total:
            self.last = now
            self._say(now)

    def _say(self, now: float):
        share = f" ({self.n / self.total:.0%})" if self.total else ""
        print(f"{self.desc}: {self.n}/{self.total} instances{share}, {now - self.started:.0f} s",
              file=self.stream, flush=True)

    def close(self):
        import time

        now = time.monotonic()
        if self.total and now - self.started >= 5:  # a run of a few seconds needs no progress line
            self._say(now)


def progress_bar(total: int, enabled: bool, desc: str):
    """A tqdm bar over instances on a terminal, progress lines every 30 s when stderr is not one (a log file, a
    pipe, a notebook's captured output), nothing when not ``enabled``."""
    import sys

    from tqdm.auto import tqdm

    if enabled and not sys.stderr.isatty() and "ipykernel" not in sys.modules:  # a notebook gets tqdm's widget
        return LineProgress(total, desc)
    return tqdm(total=total, disable=not enabled, desc=desc, unit="inst", leave=False)


# the names these had when they were private to latentprobe.tracing (read only through that deprecated shim)
_progress = progress_bar
_free_accelerator_memory = free_accelerator_memory
_is_oom = is_oom


def default_instances(subject_name: str, limit: int | None = None, split: str = "test") -> tuple[list[Instance], str]:
    """(instances, source label) a subject runs on when no data is given: an organism's own held-out split
    (never seen in training), the built-in text set for a text-only subject, the built-in images for any other.

    >>> instances, source = default_instances("tiny", limit=2)
    >>> len(instances), source
    (2, 'builtin')
    """
    from ..data.loading import load_instances
    from ..model.subjects import SUBJECTS, _register_builtin_families

    _register_builtin_families()
    spec = SUBJECTS.get(str(subject_name))
    if spec is not None:
        return spec.default_instances(limit=limit, split=split)
    from ..model.subjects import is_text_subject

    return load_instances("builtin-text" if is_text_subject(subject_name) else None, limit=limit)
