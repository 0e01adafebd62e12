"""Runners that apply edits inside the model's forward: layer edit hooks, whole-column pinning, nnsight.

Each is a context manager around `LatentDecoder.decode`/`run`: `LayerEditHooks` applies bound latent edits at a
layer's output, `PinLatentStates` sets the latent positions' states at every layer to another run's, and
`NNsightRunner` runs every forward through nnsight so your function can read and edit any module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Sequence

import torch

from ..model.decoding import LATENT, LatentDecoder
from .latent import BoundEdit


class _LatentOutputHooks(ABC):
    """Forward hooks on chosen layers that rewrite the output at latent positions of the decoding steps.

    Subclasses implement `edit_rows(layer, ctx, hidden)`, returning an edited copy of ``hidden`` or None for no
    change. Hooks are prepended, so an edit runs before any recorder hook and recorded states are the edited
    ones. Layer 0 (the fed-back vector) is never hooked: the decoder edits it itself."""

    def __init__(self, decoder: LatentDecoder, layers):
        from ..model.recording import layer_modules

        self.decoder = decoder
        self.handles = []
        modules = layer_modules(decoder.model, decoder.subject.num_layers)
        for layer in sorted(layers):
            module, is_pre = modules[layer]
            if not is_pre:
                self.handles.append(module.register_forward_hook(self._make_hook(layer), prepend=True))

    @abstractmethod
    def edit_rows(self, layer: int, ctx, hidden: torch.Tensor) -> torch.Tensor | None:
        """The edited copy of ``hidden`` at this layer and decoding step, or None to leave it unchanged."""

    def _make_hook(self, layer: int):
        def hook(module, inputs, output):
            ctx = self.decoder.context
            if ctx is None or ctx.is_prefill:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            edited = self.edit_rows(layer, ctx, hidden)
            if edited is None:
                return None
            return (edited,) + tuple(output[1:]) if isinstance(output, tuple) else edited

        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


class LayerEditHooks(_LatentOutputHooks):
    """Forward hooks applying bound edits at a chosen layer's output, at latent positions only.

    Used as a context manager around `LatentDecoder.decode` with the same per-row edits list."""

    def __init__(self, decoder: LatentDecoder, row_edits: Sequence[BoundEdit | None]):
        self.row_edits = list(row_edits)
        layers = {e.layer for e in self.row_edits if isinstance(e, BoundEdit) and e.layer is not None}
        super().__init__(decoder, layers)

    def edit_rows(self, layer, ctx, hidden):
        edited = None
        for r in ctx.rows(LATENT).tolist():
            edit = self.row_edits[r] if r < len(self.row_edits) else None
            if not isinstance(edit, BoundEdit) or edit.layer != layer:
                continue
            step = ctx.latent_index[r:r + 1]
            if edited is None:
                edited = hidden.clone()
            edited[r, -1] = edit.apply(hidden[r, -1:].clone(), step)[0]
        return edited


class PinLatentStates(_LatentOutputHooks):
    """Forward hooks that set the latent positions' states at EVERY layer to another run's (the full mediator).

    ``states[r]`` maps layer L (1..N, ``hidden_states`` numbering) to an (S, D) tensor of row r's states at
    latent steps 0..S-1 (None leaves the row alone). Together with `PinLatents` (layer 0, the fed-back
    vectors) this makes the latent positions' whole residual columns, and so their keys and values at every
    layer, those of the source run: the answer can then see the input only through the other positions
    (image, prompt). Pinning only the fed-back vector (`PinLatents` alone) leaves the latent positions free to
    read the current input through attention in upper layers, a route counted as "direct" under that
    definition. Used as a context manager around `LatentDecoder.decode`, like `LayerEditHooks`.
    """

    def __init__(self, decoder: LatentDecoder, states: Sequence[dict[int, torch.Tensor] | None]):
        self.states = list(states)
        super().__init__(decoder, range(1, decoder.subject.num_layers + 1))  # layer 0 is pinned by PinLatents

    def edit_rows(self, layer, ctx, hidden):
        edited = None
        for r in ctx.rows(LATENT).tolist():
            given = self.states[r] if r < len(self.states) else None
            if not given or layer not in given:
                continue
            step = int(ctx.latent_index[r])
            if step >= given[layer].shape[0]:
                continue
            if edited is None:
                edited = hidden.clone()
            edited[r, -1] = given[layer][step].to(edited)
        return edited


class NNsightRunner:
    """Run every forward of the decoder through nnsight, so ``fn(model, context)`` can read and edit any
    module inside latentprobe's decoding loop (e.g. layer L's output at latent step k only).

    ``model`` in ``fn`` is an ``nnsight.NNsight`` wrapping the subject's backbone (``subject.model.model``),
    so its layers are at ``model.language_model.layers[i]``; ``context`` is the decoder's `StepContext`.

        >>> def steer(model, ctx):                                             # doctest: +SKIP
        ...     rows = ((ctx.kinds == LATENT) & (ctx.latent_index == 1)).nonzero().flatten().tolist()
        ...     if rows:
        ...         model.language_model.layers[0].output[rows, -1] = 0.0
        >>> with NNsightRunner(decoder, steer):                                # doctest: +SKIP
        ...     result = decoder.run(batch)
    """

    def __init__(self, decoder: LatentDecoder, fn: Callable[[Any, Any], None]):
        from nnsight import NNsight

        self.decoder = decoder
        self.fn = fn
        self.wrapped = NNsight(decoder.inner_model)

    def hidden(self, site):
        """Inside ``fn``: the live hidden state at ``site``'s layer (a `Site`, its string or a layer number, in
        the one hidden_states numbering), e.g. ``runner.hidden("latent[2].layer[1]")[rows, -1] = 0.0`` with
        ``rows = site_rows(ctx, site)``."""
        from ..model.sites import nnsight_hidden

        return nnsight_hidden(self.wrapped, self.decoder.model, site, self.decoder.subject.num_layers)

    def _forward(self, **kwargs):
        with self.wrapped.trace(**kwargs):
            self.fn(self.wrapped, self.decoder.context)
            output = self.wrapped.output.save()
        return output

    def __enter__(self):
        self._previous = self.decoder.forward_fn
        self.decoder.forward_fn = self._forward
        return self

    def __exit__(self, *exc):
        self.decoder.forward_fn = self._previous
