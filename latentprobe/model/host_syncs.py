"""Count the places where Python code reads a tensor's values back to the host (a device synchronisation on a GPU).

On a GPU every such read (``.item()``, ``.tolist()``, ``int(t)``, ``bool(t)``, ``nonzero``, indexing with a boolean
mask, ``.cpu()``) waits for every queued kernel to finish, so a decode step that reads the device once per row stalls
the launch queue once per row. `HostSyncCounter` counts those reads with a `TorchFunctionMode`, so they can be
counted on a CPU too (where they cost nothing): the count is the same on either device.

    >>> import torch
    >>> with HostSyncCounter() as syncs:
    ...     x = torch.arange(4)
    ...     _ = x[x > 1].tolist()
    >>> syncs.count, dict(syncs.by_name)
    (2, {'__getitem__[bool]': 1, 'tolist': 1})

``paused()`` stops counting (e.g. inside the model's own forward, whose reads are the model library's, not the
decoder's); `pause_inside(module)` does that for every call of a module via forward hooks.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode

# Tensor methods and torch functions whose result needs the values on the host.
SYNCING = frozenset({"item", "tolist", "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive",
                     "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "equal", "allclose"})


def _is_bool_tensor(index) -> bool:
    if isinstance(index, torch.Tensor):
        return index.dtype == torch.bool
    if isinstance(index, tuple):
        return any(_is_bool_tensor(i) for i in index)
    return False


class HostSyncCounter(TorchFunctionMode):
    """A torch function mode counting host reads of tensor values (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.by_name: Counter = Counter()
        self._paused = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._paused:
            name = getattr(func, "__name__", "")
            if name in SYNCING:
                self._add(name)
            elif name in ("__getitem__", "__setitem__") and len(args) > 1 and _is_bool_tensor(args[1]):
                self._add(f"{name}[bool]")  # a boolean mask index runs a nonzero to size its result
        return func(*args, **kwargs)

    def _add(self, name: str):
        self.count += 1
        self.by_name[name] += 1

    @contextmanager
    def paused(self):
        self._paused += 1
        try:
            yield self
        finally:
            self._paused -= 1

    @contextmanager
    def pause_inside(self, module: torch.nn.Module):
        """Do not count the reads made inside ``module``'s forward (hooks; removed on exit)."""

        def before(*_args, **_kwargs):
            self._paused += 1

        def after(*_args, **_kwargs):
            self._paused -= 1

        handles = [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
