"""A key/value cache written in place into preallocated buffers (the decoder's choice for large caches).

transformers' `DynamicCache` appends each step's keys and values with ``torch.cat``: every step copies the whole
cache of every layer, so a step's cost grows with the output's length (and, in a batched sweep or patching grid,
with the number of rows times the prompt's length). `PreallocatedCache` keeps, per layer, one buffer of
``(batch, kv_heads, capacity, head_dim)`` for the keys and one for the values, allocated at the first update for
the prompt plus ``reserve`` more positions, writes each step's keys and values into the next columns, and hands
the attention a **view** of the columns written so far. The attention therefore sees exactly the tensors (same
shapes, same values) that a `DynamicCache` would give it: the outputs are the same bit for bit
(`tests/test_kv_cache.py` compares whole decodes, sweeps, controls and teacher-forced answer slots with both). A
decode builds one from its prefill's `DynamicCache` with `decode_cache`.

What differs from `DynamicCache`:

* capacity: the buffers are sized once; a write past the end reallocates them at twice the size (amortised O(1)
  per step), so a wrong ``reserve`` costs one copy, never a wrong answer;
* ``crop``, ``batch_repeat_interleave``, ``batch_select_indices``, ``copy.deepcopy`` and `append_rows` (rows
  joining a decode late) copy only the columns in use (a deep copy keeps the capacity);
* it is for inference only: writing into a buffer that an earlier step's attention saved for backward would
  break autograd, so `decode_cache` gives a `DynamicCache` when gradients are enabled (the organisms' training
  unroll and attribution patching build their own `DynamicCache`);
* it pays only for large caches: on the 2-core CPU measured, a small cache's per-step copy is nearly free and
  leaves the keys and values in the CPU's caches for the attention right after it, so ``kv_cache="auto"`` (the
  decoder's default) preallocates only when a layer's keys and values reach `AUTO_PREALLOCATE_BYTES` (2 MiB) by
  the end of the decode (long outputs, sweeps and patching grids of many rows);
* on a CPU a decode writes into the previous preallocated cache's buffers when they are large enough (a fresh
  buffer of tens of MiB costs a page fault per 4 KiB at its first write), so a decoder's ``last_cache`` is valid
  only until its next decode.

Sliding-window layers (none in the backbones latentprobe registers) keep transformers' own layer class.

>>> import torch
>>> layer = PreallocatedLayer(reserve=4)
>>> keys, values = layer.update(torch.ones(1, 2, 3, 8), torch.ones(1, 2, 3, 8))
>>> keys.shape, layer.capacity
(torch.Size([1, 2, 3, 8]), 7)
>>> keys, _ = layer.update(torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8))
>>> keys.shape, layer.get_seq_length()
(torch.Size([1, 2, 4, 8]), 4)
"""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """One layer's keys and values in preallocated buffers; ``keys``/``values`` are views of the used columns."""

    def __init__(self, reserve: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.reserve = max(int(reserve), 0)
        self.length = 0
        self.rows = 0  # rows in use (the buffers may hold more: `append_rows` fills them)
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return 0 if self._key_buffer is None else self._key_buffer.shape[-2]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def _allocate(self, like_keys: torch.Tensor, like_values: torch.Tensor, batch: int, capacity: int):
        heads = like_keys.shape[1]
        keys = torch.empty((batch, heads, capacity, like_keys.shape[-1]), dtype=like_keys.dtype,
                           device=like_keys.device)
        values = torch.empty((batch, like_values.shape[1], capacity, like_values.shape[-1]),
                             dtype=like_values.dtype, device=like_values.device)
        return keys, values

    @classmethod
    def loaded(cls, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor | None = None, repeats: int = 1,
               reserve: int = 0, rows_room: int = 0, buffers: tuple | None = None) -> "PreallocatedLayer":
        """A layer holding ``keys``/``values`` (B, H, L, D) rows ``index`` (or each row ``repeats`` times), with room
        for ``reserve`` more positions and ``rows_room`` rows; one copy, no repeated temporary. ``buffers``: a
        finished cache's (keys, values) buffers to write into instead of new ones, when they are large enough."""
        layer = cls(reserve=reserve)
        layer.lazy_initialization(keys, values)
        length = keys.shape[2]
        rows = len(index) if index is not None else keys.shape[0] * repeats
        layer.length, layer.rows = length, rows
        if _fits(buffers, keys, values, max(rows, rows_room), length + layer.reserve):
            layer._key_buffer, layer._value_buffer = buffers
        else:
            layer._key_buffer, layer._value_buffer = layer._allocate(keys, values, max(rows, rows_room),
                                                                     length + layer.reserve)
        for buffer, source in ((layer._key_buffer, keys), (layer._value_buffer, values)):
            if index is not None:
                buffer[:rows, :, :length] = source[index]
            elif repeats > 1:
                shape = (keys.shape[0], repeats) + tuple(buffer.shape[1:])
                buffer[:rows].view(shape)[:, :, :, :length] = source.unsqueeze(1)
            else:
                buffer[:rows, :, :length] = source
        layer._set_views()
        return layer

    def _set_views(self):
        self.keys = self._key_buffer[: self.rows, :, : self.length]
        self.values = self._value_buffer[: self.rows, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        need = self.length + new
        if self._key_buffer is None:
            self.rows = key_states.shape[0]
            self._key_buffer, self._value_buffer = self._allocate(key_states, value_states, self.rows,
                                                                  need + self.reserve)
        elif key_states.shape[0] != self.rows:
            raise ValueError(f"{key_states.shape[0]} rows of keys for a cache of {self.rows} rows")
        elif need > self.capacity:  # outgrown: double (a wrong reserve costs one copy, never a wrong answer)
            self._resize(self._key_buffer.shape[0], max(need, 2 * self.capacity))
        self._key_buffer[: self.rows, :, self.length: need] = key_states
        self._value_buffer[: self.rows, :, self.length: need] = value_states
        self.length = need
        self._set_views()
        return self.keys, self.values

    def _resize(self, rows: int, capacity: int):
        """Buffers of ``rows`` x ``capacity`` holding the used rows and columns."""
        keys, values = self._allocate(self._key_buffer, self._value_buffer, rows, capacity)
        keys[: self.rows, :, : self.length] = self.keys
        values[: self.rows, :, : self.length] = self.values
        self._key_buffer, self._value_buffer = keys, values
        self._set_views()

    def append_rows(self, source: list[int]) -> None:
        """Append copies of rows ``source`` (their used columns) after the rows in use; the buffers keep room for
        more rows, so appending a few rows at a time copies only those rows (a run of one row, broadcast)."""
        if self._key_buffer is None:
            return
        need = self.rows + len(source)
        if need > self._key_buffer.shape[0]:
            self._resize(max(need, 2 * self._key_buffer.shape[0]), self.capacity)
        at = self.rows
        for row, count in _runs(source):
            for buffer in (self._key_buffer, self._value_buffer):
                buffer[at: at + count, :, : self.length] = buffer[row: row + 1, :, : self.length]
            at += count
        self.rows = need
        self._set_views()

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.length = self.rows = 0
        self._key_buffer = self._value_buffer = None
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of positions to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or self._key_buffer is None:
            return
        self.length = max(self.length - abs(tokens_to_remove), 0)
        self._set_views()

    def _rebuild(self, rows: torch.Tensor | None, repeats: int = 1):
        """New buffers holding the used columns of ``rows`` (all rows when None), each row ``repeats`` times."""
        if self._key_buffer is None:
            return
        used_k, used_v = self.keys, self.values
        if rows is not None:
            used_k, used_v = used_k[rows], used_v[rows]
        batch = used_k.shape[0] * repeats
        keys, values = self._allocate(self._key_buffer, self._value_buffer, batch, self.capacity)
        self.rows = batch
        if repeats == 1:
            keys[:, :, : self.length] = used_k
            values[:, :, : self.length] = used_v
        else:  # broadcast into (B, M, ...) views: no repeated temporary
            shape = (used_k.shape[0], repeats) + tuple(keys.shape[1:])
            keys.view(shape)[:, :, :, : self.length] = used_k.unsqueeze(1)
            values.view((used_v.shape[0], repeats) + tuple(values.shape[1:]))[:, :, :, : self.length] = \
                used_v.unsqueeze(1)
        self._key_buffer, self._value_buffer = keys, values
        self._set_views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rebuild(None, repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rebuild(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rebuild(beam_idx.to(self.device))

    def offload(self):
        """Move the buffers (not only the views of them) to the CPU, as transformers' layers do their tensors."""
        self._move_buffers("cpu")

    def prefetch(self):
        """Move the buffers back to the layer's device ahead of their use (after `offload`)."""
        if self._key_buffer is not None and self._key_buffer.device != self.device:
            self._move_buffers(self.device)

    def _move_buffers(self, device):
        if self._key_buffer is None:
            if self.is_initialized and self.keys is not None:  # initialised, nothing written: the base class's way
                self.keys, self.values = self.keys.to(device), self.values.to(device)
            return
        self._key_buffer = self._key_buffer.to(device, non_blocking=True)
        self._value_buffer = self._value_buffer.to(device, non_blocking=True)
        self._set_views()

    def __deepcopy__(self, memo):
        twin = type(self).__new__(type(self))
        twin.__dict__.update({k: v for k, v in self.__dict__.items()
                              if k not in ("keys", "values", "_key_buffer", "_value_buffer")})
        twin.keys = twin.values = twin._key_buffer = twin._value_buffer = None
        if self._key_buffer is not None:
            twin._key_buffer, twin._value_buffer = self._allocate(self._key_buffer, self._value_buffer,
                                                                  self._key_buffer.shape[0], self.capacity)
            twin._key_buffer[: self.rows, :, : self.length] = self.keys
            twin._value_buffer[: self.rows, :, : self.length] = self.values
            twin._set_views()
        elif self.keys is not None:  # initialised, nothing written
            twin.keys, twin.values = self.keys.clone(), self.values.clone()
        memo[id(self)] = twin
        return twin


class PreallocatedCache(DynamicCache):
    """A `DynamicCache` whose full-attention layers are `PreallocatedLayer`s with room for ``reserve`` positions
    after the first update (the prompt). ``config``: the model's config (its text config is read). A decode
    builds one from its prefill's cache with `decode_cache`."""

    def __init__(self, config, reserve: int = 0):
        super().__init__(config=config)
        if self.layers:  # full-attention layers are DynamicLayers exactly; any other kind is kept as it is
            self.layers = [PreallocatedLayer(reserve=reserve) if type(layer) is DynamicLayer else layer
                           for layer in self.layers]
        else:  # a config without layer types: layers are added as the model calls update
            self.layer_class_to_replicate = lambda: PreallocatedLayer(reserve=reserve)

    @classmethod
    def from_cache(cls, source, index: torch.Tensor | None = None, repeats: int = 1, reserve: int = 0,
                   rows_room: int = 0, pool: list | None = None) -> "PreallocatedCache":
        """A preallocated copy of ``source``'s used rows and columns: its rows ``index`` (or every row ``repeats``
        times), with room for ``reserve`` more positions and ``rows_room`` rows in all (rows joining later).
        ``pool``: a finished cache's `buffers`, reused where they are large enough."""
        from transformers.cache_utils import Cache

        layers = []
        for i, layer in enumerate(source.layers):
            if type(layer) in (DynamicLayer, PreallocatedLayer) and layer.is_initialized \
                    and layer.keys is not None and layer.keys.numel():
                buffers = pool[i] if pool is not None and i < len(pool) else None
                layers.append(PreallocatedLayer.loaded(layer.keys, layer.values, index, repeats, reserve, rows_room,
                                                       buffers))
            else:  # another layer kind (none in the backbones latentprobe registers): transformers' own copy
                twin = copy.deepcopy(layer)
                if index is not None:
                    twin.batch_select_indices(index)
                elif repeats > 1:
                    twin.batch_repeat_interleave(repeats)
                layers.append(twin)
        cache = cls.__new__(cls)
        Cache.__init__(cache, layers=layers)
        return cache

    def buffers(self) -> list:
        """Each layer's (keys, values) buffers (None for other layer kinds): what `from_cache` may reuse once this
        cache is finished with (the decoder keeps its last CPU cache's, see `LatentDecoder.decode`)."""
        return [(layer._key_buffer, layer._value_buffer)
                if isinstance(layer, PreallocatedLayer) and layer._key_buffer is not None else None
                for layer in self.layers]


def _fits(buffers, keys, values, rows: int, capacity: int) -> bool:
    if buffers is None:
        return False
    kb, vb = buffers
    return all(b.shape[0] >= rows and b.shape[2] >= capacity and b.shape[1] == s.shape[1] and b.shape[3] == s.shape[3]
               and b.dtype == s.dtype and b.device == s.device and b.is_contiguous()
               for b, s in ((kb, keys), (vb, values)))


# Above this many bytes of keys and values per layer (at the end of the decode) a decode's cache is preallocated
# under kv_cache="auto". Measured on a 2-core EPYC, fp32 (`bench/`: decoder generate and long sections, the sweep of
# `bench_interventions.py`, the grid of `bench_patching.py`): at 1.3 MiB per layer (8 rows, 160 positions) copying
# the cache every step was 3-5% faster per run than writing in place (the copy leaves the keys and values in the
# CPU's caches for the attention right after it; a preallocated cache's attention reads them cold); at 2.7 MiB (a
# sweep of 8 edits over a 338-position prompt) in place was 2.6% faster, at 9 MiB (8 rows, 1,153 positions) 4%,
# and a 56-row patching grid's decode (19 MiB) 16%. Every difference below 5% was within the run-to-run noise.
AUTO_PREALLOCATE_BYTES = 2 * 2 ** 20


def decode_cache(source, *, index: torch.Tensor | None = None, repeats: int = 1, reserve: int = 0,
                 rows_room: int = 0, mode: str = "auto", consume: bool = False, pool: list | None = None):
    """The cache a decode runs on, from its prefill's cache ``source``: its rows ``index`` (or each row ``repeats``
    times), with room for ``reserve`` more positions and ``rows_room`` rows. ``mode``: "preallocated"
    (`PreallocatedCache`), "dynamic" (transformers' `DynamicCache`: a deep copy unless ``consume``), or "auto":
    preallocated when the keys and values of one layer would reach `AUTO_PREALLOCATE_BYTES` by the end of the
    decode. Under gradients it is always dynamic (in-place writes and autograd do not mix). ``pool``: a finished
    preallocated cache's `PreallocatedCache.buffers`, written into where large enough (on a CPU, fresh buffers of
    tens of MiB cost one page fault per 4 KiB at their first write: 0.1 s for a 56-row patching grid)."""
    mode = resolve_mode(source, mode, index=index, repeats=repeats, reserve=reserve, rows_room=rows_room)
    if mode == "dynamic":
        cache = source if consume else copy.deepcopy(source)
        if index is not None:
            cache.batch_select_indices(index)
        elif repeats > 1:
            cache.batch_repeat_interleave(repeats)
        return cache
    return PreallocatedCache.from_cache(source, index, repeats, reserve, rows_room, pool)


def resolve_mode(source, mode: str = "auto", *, index: torch.Tensor | None = None, repeats: int = 1,
                 reserve: int = 0, rows_room: int = 0) -> str:
    """"preallocated" or "dynamic": what `decode_cache` builds for these arguments."""
    if torch.is_grad_enabled():
        return "dynamic"
    if mode == "auto":
        big = _final_bytes(source, index, repeats, reserve, rows_room) >= AUTO_PREALLOCATE_BYTES
        return "preallocated" if big else "dynamic"
    return mode


def _final_bytes(source, index, repeats, reserve, rows_room) -> int:
    for layer in source.layers:
        keys = getattr(layer, "keys", None)
        if keys is not None and keys.numel():
            rows = max(len(index) if index is not None else keys.shape[0] * repeats, rows_room)
            per_position = 2 * keys.shape[1] * keys.shape[3] * keys.element_size()
            return rows * (keys.shape[2] + reserve) * per_position
    return 0


def append_rows(cache, source: list[int]) -> None:
    """Append to every layer of ``cache`` copies of its rows ``source`` (a decode forking rows mid-way); a
    `DynamicCache` layer is rebuilt by selection, a `PreallocatedLayer` copies only the new rows."""
    for layer in cache.layers:
        if isinstance(layer, PreallocatedLayer):
            layer.append_rows(source)
        elif layer.is_initialized and layer.keys is not None and layer.keys.numel():
            rows = list(range(layer.keys.shape[0])) + list(source)
            layer.batch_select_indices(torch.tensor(rows, dtype=torch.long, device=layer.keys.device))


def _runs(values: list[int]):
    """(value, count) for each run of equal consecutive values."""
    out: list[list[int]] = []
    for value in values:
        if out and out[-1][0] == value:
            out[-1][1] += 1
        else:
            out.append([value, 1])
    return [tuple(run) for run in out]
