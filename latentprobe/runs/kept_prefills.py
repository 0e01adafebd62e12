"""The clean pass's prompt prefills, kept for the edits of the same batch: one prefill per clean prompt.

An intervention run decodes every clean instance first (the edits need every donor's clean run and the dataset's
latent statistics), then edits batch by batch, and most edits decode from the clean prompt's prefill (nothing a
latent edit does can change the prompt's keys and values). Keeping the clean pass's prefill of a batch saves
prefilling the same prompts again for its edits. Kept prefills hold their keys and values (on the model's
device) until their batch is edited, so they are kept up to a budget, in the order the edits will take them: at
most `KEPT_PREFILL_BATCHES` batches and `KEPT_PREFILL_BYTES` bytes, so a run's memory stays flat in the number of
instances (the first batches of a large run are saved a prefill, a small study every batch). A batch over the
budget, a batch the clean pass split (an isolated failure, an out-of-memory halving) or a resumed
run's batches are prefilled again, as before.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

# A batch of 8 Qwen2.5-VL-7B prompts of ~1,300 tokens holds ~0.6 GB of keys and values in bf16: the budget keeps
# the first such batch (its edits come first) and every batch of a small model, without holding a whole large
# study's prompts on the accelerator.
KEPT_PREFILL_BYTES = 2**30
# A bound on the count as well: bytes alone would let a small model keep every batch of a large run (1,024
# instances of the tiny subject: 230 MiB more than 64 instances, bench/bench_memory.py).
KEPT_PREFILL_BATCHES = 4


@dataclass
class KeptPrefill:
    """One clean batch's prefill and what the Recorder captured of its prompt (`Recorder.prompt_states`)."""

    prefill: Any
    prompt_states: dict
    nbytes: int


class KeptPrefills:
    """Clean prefills by the instance ids of their batch, within ``budget`` bytes and ``max_batches`` batches."""

    def __init__(self, budget: int | None = None, max_batches: int | None = None):
        self.budget = KEPT_PREFILL_BYTES if budget is None else budget
        self.max_batches = KEPT_PREFILL_BATCHES if max_batches is None else max_batches
        self._kept: dict[tuple[str, ...], KeptPrefill] = {}
        self.reused = 0  # batches whose edits decoded from a kept prefill (for tests and benchmarks)

    @property
    def nbytes(self) -> int:
        return sum(kept.nbytes for kept in self._kept.values())

    def keep(self, instance_ids: Sequence[str], prefill, prompt_states: dict) -> bool:
        """Keep ``prefill`` for the batch ``instance_ids`` if it fits the budget; returns whether it was kept."""
        if len(self._kept) >= self.max_batches:
            return False
        size = prefill_nbytes(prefill) + _tensor_bytes(prompt_states)
        if self.nbytes + size > self.budget:
            return False
        self._kept[tuple(instance_ids)] = KeptPrefill(prefill, prompt_states, size)
        return True

    def take(self, instance_ids: Sequence[str]) -> KeptPrefill | None:
        """The kept prefill of exactly this batch (and it is no longer kept), or None."""
        kept = self._kept.pop(tuple(instance_ids), None)
        if kept is not None:
            self.reused += 1
        return kept

    def discard(self, instance_ids: Sequence[str]):
        """Stop keeping this batch's prefill (its edits are done, or none of them needed it)."""
        self._kept.pop(tuple(instance_ids), None)

    def retain_only(self, batches: Iterable[Sequence[str]]):
        """Drop what no batch in ``batches`` will take (a batch the clean pass split), freeing its memory now."""
        wanted = {tuple(ids) for ids in batches}
        for key in [k for k in self._kept if k not in wanted]:
            del self._kept[key]

    def clear(self):
        self._kept.clear()


def prefill_nbytes(prefill) -> int:
    """Bytes held by a `Prefill`: its keys and values, last hidden state, positions and prompt batch (pixels
    included). A cache whose layout is unknown counts as too large to keep."""
    cache_bytes = 0
    layers = getattr(prefill.cache, "layers", None)
    if layers is None:
        return 2**62
    for layer in layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                cache_bytes += tensor.numel() * tensor.element_size()
    batch = prefill.batch
    batch_tensors = [getattr(batch, f.name) for f in dataclasses.fields(batch)] if dataclasses.is_dataclass(batch) \
        else []
    return cache_bytes + _tensor_bytes([prefill.hidden, prefill.position_ids, prefill.start_pending, *batch_tensors])


def _tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0
