"""A key/value cache written in place into preallocated buffers (the decoder's default under ``no_grad``).

transformers' `DynamicCache` appends each step's keys and values with ``torch.cat``: every step copies the whole
cache of every layer, so a step's cost grows with the output's length (and, in a batched sweep or patching grid,
with the number of rows times the prompt's length). `PreallocatedCache` keeps, per layer, one buffer of
``(batch, kv_heads, capacity, head_dim)`` for the keys and one for the values, allocated at the first update for
the prompt plus ``reserve`` more positions, writes each step's keys and values into the next columns, and hands
the attention a **view** of the columns written so far. The attention therefore sees exactly the tensors (same
shapes, same values) that a `DynamicCache` would give it: the outputs are the same bit for bit
(`tests/test_kv_cache.py` compares whole decodes, sweeps, controls and teacher-forced answer slots with both).

What differs from `DynamicCache`:

* capacity: the buffers are sized once; a write past the end reallocates them at twice the size (amortised O(1)
  per step), so a wrong ``reserve`` costs one copy, never a wrong answer;
* ``crop``, ``batch_repeat_interleave``, ``batch_select_indices`` and ``copy.deepcopy`` copy only the columns in use
  (a deep copy keeps the capacity, so a decode from a copied prefill writes in place too);
* it is for inference only: writing into a buffer that an earlier step's attention saved for backward would
  break autograd, so `new_cache` falls back to a `DynamicCache` when gradients are enabled (the organisms'
  training unroll and attribution patching build their own `DynamicCache`).

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

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

class PreallocatedLayer(DynamicLayer):
    """One layer's keys and values in preallocated buffers; ``keys``/``values`` are views of the used columns."""

    def __init__(self, reserve: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.reserve = max(int(reserve), 0)
        self.length = 0
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

    def _set_views(self):
        self.keys = self._key_buffer[:, :, : self.length]
        self.values = self._value_buffer[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        need = self.length + new
        if self._key_buffer is None:
            self._key_buffer, self._value_buffer = self._allocate(key_states, value_states, key_states.shape[0],
                                                                  need + self.reserve)
        elif need > self.capacity:  # outgrown: double (a wrong reserve costs one copy, never a wrong answer)
            keys, values = self._allocate(self._key_buffer, self._value_buffer, self._key_buffer.shape[0],
                                          max(need, 2 * self.capacity))
            keys[:, :, : self.length] = self._key_buffer[:, :, : self.length]
            values[:, :, : self.length] = self._value_buffer[:, :, : self.length]
            self._key_buffer, self._value_buffer = keys, values
        self._key_buffer[:, :, self.length: need] = key_states
        self._value_buffer[:, :, self.length: need] = value_states
        self.length = need
        self._set_views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.length = 0
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

    def offload(self):  # pragma: no cover - offloading is a CUDA feature latentprobe does not use
        raise NotImplementedError("PreallocatedCache does not offload; use a DynamicCache with offloading=True")

    def __deepcopy__(self, memo):
        copy = type(self).__new__(type(self))
        copy.__dict__.update({k: v for k, v in self.__dict__.items()
                              if k not in ("keys", "values", "_key_buffer", "_value_buffer")})
        copy.keys = copy.values = copy._key_buffer = copy._value_buffer = None
        if self._key_buffer is not None:
            copy._key_buffer, copy._value_buffer = self._allocate(self._key_buffer, self._value_buffer,
                                                                  self._key_buffer.shape[0], self.capacity)
            copy._key_buffer[:, :, : self.length] = self.keys
            copy._value_buffer[:, :, : self.length] = self.values
            copy._set_views()
        elif self.keys is not None:  # initialised, nothing written
            copy.keys, copy.values = self.keys.clone(), self.values.clone()
        memo[id(self)] = copy
        return copy


class PreallocatedCache(DynamicCache):
    """A `DynamicCache` whose full-attention layers are `PreallocatedLayer`s with room for ``reserve`` positions
    after the first update (the prompt). ``config``: the model's config (its text config is read)."""

    def __init__(self, config, reserve: int = 0):
        super().__init__(config=config)
        if self.layers:  # full-attention layers are DynamicLayers exactly; any other kind is kept as it is
            self.layers = [PreallocatedLayer(reserve=reserve) if type(layer) is DynamicLayer else layer
                           for layer in self.layers]
        else:  # a config without layer types: layers are added as the model calls update
            self.layer_class_to_replicate = lambda: PreallocatedLayer(reserve=reserve)


def new_cache(model, reserve: int | None = None):
    """The cache a decode starts from: a `PreallocatedCache` with room for ``reserve`` positions after the prompt,
    or transformers' `DynamicCache` when ``reserve`` is None or gradients are enabled (in-place writes and
    autograd do not mix)."""
    config = model.config.get_text_config()
    if reserve is None or torch.is_grad_enabled():
        return DynamicCache(config=config)
    return PreallocatedCache(config, reserve=reserve)
