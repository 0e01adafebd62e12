"""The hook plumbing shared by exact patching (`patching`) and its gradient estimate (`attribution`): position
groups, hooks registered on grid layers and removed on exit, and the columns of a prompt group.

It sits below both so that neither imports the other's internals.
"""

from __future__ import annotations

import torch

from ..errors import LatentProbeError
from ..model.sites import layer_modules

PROMPT_GROUPS = ("image", "question", "prompt_last")
DECODE_GROUPS = ("latent", "answer")


class _LayerHooks:
    """Base of the hook sets below (and attribution's): ``_register`` hooks on grid layers, removed on exit."""

    handles: list

    def hook_layers(self, layers, make):
        """Hook every layer of ``layers`` with the function ``make(layer)`` returns."""
        modules = layer_modules(self.decoder.model, self.decoder.subject.num_layers)
        self.handles += [_register(*modules[layer], make(layer)) for layer in layers]

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []


class _Remover:
    def __init__(self, fn):
        self.fn = fn

    def remove(self):
        self.fn()


def _register(module, is_pre: bool, fn):
    """A hook calling ``fn(hidden)`` on the module's input (pre) or output; a returned tensor replaces it."""
    if is_pre:
        def pre_hook(mod, args, kwargs):
            if args:
                new = fn(args[0])
                return None if new is None else ((new,) + tuple(args[1:]), kwargs)
            new = fn(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(mod, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        new = fn(hidden)
        if new is None:
            return None
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

    return module.register_forward_hook(hook)


def group_positions(batch, row: int, group: str) -> torch.Tensor:
    """Column indices of one prompt row's positions in a prompt position group (in order)."""
    attention = batch.attention_mask[row].bool()
    image = batch.mm_token_type_ids[row].bool() & attention
    last = attention.shape[0] - 1
    if group == "image":
        return image.nonzero(as_tuple=True)[0]
    if group == "prompt_last":
        return torch.tensor([last], device=attention.device)
    if group == "question":
        text = attention & ~image
        text[last] = False
        return text.nonzero(as_tuple=True)[0]
    raise LatentProbeError(f"{group!r} is not a prompt position group", f"use one of {', '.join(PROMPT_GROUPS)}")
