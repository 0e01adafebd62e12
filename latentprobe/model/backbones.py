"""Backbones: where each supported architecture keeps its blocks, final norm and embeddings, and how it is called.

The decoder, the Recorder, patching and the site mapping never name a module path or a position layout: they ask
this registry. A backbone is one entry keyed by ``config.model_type``:

==================  ===============================  ==========================  =========================
model_type          blocks, final norm               backbone (returns final-    positions
                                                     norm hidden states)
==================  ===============================  ==========================  =========================
qwen2_5_vl          model.language_model.layers/norm model.model                 3-D mRoPE (get_rope_index)
gpt2                transformer.h, transformer.ln_f  model.transformer           1-D
llama, qwen2, qwen3 model.layers, model.norm         model.model                 1-D
==================  ===============================  ==========================  =========================

The decoder keeps positions as a (3, B, L) tensor for every backbone (three equal rows for text-only prompts);
a text backbone is called through `TextBackboneCall`, which passes the first row as ordinary 1-D ``position_ids``
and refuses image inputs. Registering another decoder-only causal LM is one call::

    >>> from latentprobe.model.backbones import register_backbone, BACKBONES
    >>> register_backbone("mistral", parts=lambda m: (m.model.layers, m.model.norm),
    ...                   module=lambda m: m.model)                          # doctest: +SKIP
    >>> sorted(k for k in BACKBONES if k in ("gpt2", "qwen2"))
    ['gpt2', 'qwen2']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import LatentProbeError


@dataclass(frozen=True)
class Backbone:
    """One architecture: ``parts(model)`` gives (blocks, final norm), ``module(model)`` the backbone whose forward
    returns the final-norm hidden state of every position; ``multimodal`` backbones take images and mRoPE."""

    model_type: str
    parts: Callable[[torch.nn.Module], tuple[torch.nn.ModuleList, torch.nn.Module]]
    module: Callable[[torch.nn.Module], torch.nn.Module]
    multimodal: bool = False
    attention: str = "self_attn"  # each block's self-attention submodule (attention knockout hooks it)
    embedding_key: str = "model.embed_tokens.weight"  # the input embedding in a saved checkpoint (load checks it)


BACKBONES: dict[str, Backbone] = {}


def register_backbone(model_type: str, parts: Callable | None = None, *, module: Callable | None = None,
                      multimodal: bool = False, attention: str = "self_attn",
                      embedding_key: str = "model.embed_tokens.weight"):
    """Register an architecture (``config.model_type``). Call it with ``parts`` and ``module``, or use it as a
    decorator on ``parts`` (the older form, for a backbone reached at ``model.model``)."""

    def add(function: Callable) -> Callable:
        BACKBONES[model_type] = Backbone(model_type, function, module or (lambda model: model.model), multimodal,
                                         attention, embedding_key)
        return function

    if parts is not None:
        add(parts)
        return BACKBONES[model_type]
    return add


def _qwen2_5_vl_parts(model):
    text_model = model.model.language_model
    return text_model.layers, text_model.norm


register_backbone("qwen2_5_vl", _qwen2_5_vl_parts, module=lambda model: model.model, multimodal=True,
                  embedding_key="model.language_model.embed_tokens.weight")
register_backbone("gpt2", lambda model: (model.transformer.h, model.transformer.ln_f),
                  module=lambda model: model.transformer, attention="attn", embedding_key="transformer.wte.weight")
for _llama_like in ("llama", "qwen2", "qwen3"):
    register_backbone(_llama_like, lambda model: (model.model.layers, model.model.norm),
                      module=lambda model: model.model)
TEXT_MODEL_TYPES = ("gpt2", "llama", "qwen2", "qwen3")


def backbone_of(model) -> Backbone:
    """The registry entry for ``model`` (by ``config.model_type``); an unknown type is a clear error."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in BACKBONES:
        raise LatentProbeError(f"no backbone mapping for model_type {model_type!r}",
                               "register one with latentprobe.model.backbones.register_backbone "
                               f"(known: {', '.join(sorted(BACKBONES))})")
    return BACKBONES[model_type]


def attention_module(model, block: torch.nn.Module) -> torch.nn.Module | None:
    """``block``'s self-attention submodule (None when the block has none under the registered name)."""
    return getattr(block, backbone_of(model).attention, None)


def is_multimodal(model) -> bool:
    return backbone_of(model).multimodal


def backbone_module(model) -> torch.nn.Module:
    """The module whose forward returns final-norm hidden states (hook it to see every decoding step)."""
    return backbone_of(model).module(model)


class TextBackboneCall(torch.nn.Module):
    """A text backbone called with the multimodal decoder's keyword arguments.

    The decoder passes (3, B, L) positions and image keywords for every backbone; a text-only model takes the
    first position row as 1-D ``position_ids`` and gets no image keywords (an image here is an error, said in
    one line). Given ids and embeddings together (the replay path), the embeddings are what runs, as for
    Qwen2.5-VL. The backbone is a child module, so nnsight and hooks see its blocks at ``backbone.*``.
    """

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, input_ids=None, inputs_embeds=None, position_ids=None, pixel_values=None,
                image_grid_thw=None, mm_token_type_ids=None, **kwargs: Any):
        if pixel_values is not None or image_grid_thw is not None:
            raise LatentProbeError("images were given to a text-only model",
                                   "use text instances (no images) with a text subject")
        if inputs_embeds is not None:
            input_ids = None
        if position_ids is not None and position_ids.dim() == 3:
            position_ids = position_ids[0]
        from .compat import cache_keywords  # the backbone's own name for the cache (5.25: `cache`)

        return self.backbone(input_ids=input_ids, inputs_embeds=inputs_embeds, position_ids=position_ids,
                             **cache_keywords(self.backbone, kwargs))


def backbone_call(model) -> torch.nn.Module:
    """What the decoder calls for one forward: the backbone itself (multimodal) or its `TextBackboneCall`.
    The wrapper is cached on nothing: it holds no weights of its own, so building one per decoder is free."""
    entry = backbone_of(model)
    module = entry.module(model)
    return module if entry.multimodal else TextBackboneCall(module)


def text_config(model):
    """The language model's config (``text_config`` for Qwen2.5-VL, the config itself for text models)."""
    return model.config.get_text_config()


def require_images(subject, what: str) -> None:
    """Refuse an image-only analysis on a text-only subject, in one line, before anything runs."""
    if not is_multimodal(subject.model):
        raise LatentProbeError(f"{what} needs images, and subject {subject.name} is a text-only model "
                               f"({subject.model.config.model_type})",
                               "on a text subject use latent edits, question-swap, patch, the answer->latent knockout, "
                               "lens, similarity or probe")
