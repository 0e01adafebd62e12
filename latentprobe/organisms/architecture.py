"""The organisms' architecture (a tiny Qwen2.5-VL with position encodings a tiny model can use) and how an organism
becomes a `Subject`. Their prompt layout (question first, image last) is data: ``PromptStyle(image_position="after")``
in `latentprobe.organisms.recipes`.

Two departures from the stock tiny subject, both because a two-layer model has to *find* a grid cell:

* Image after the question. Every image token then sits at the same distance from the assistant turn (and its
  latent steps) whatever the question's length, so one learned attention query can address a fixed cell by
  relative position. With the image first, that distance moves with the question's length.
* Rotary frequencies a 4x4 token grid can resolve. Qwen2.5-VL gives the image's height and width positions the
  lowest rotary frequencies; with head_dim 16 and theta 10000 neighbouring rows differ by ~0.01 rad, so cells are
  indistinguishable. The organisms use theta 4 and give height and width most of the frequency slots
  (0.3-0.7 rad per token).
"""

from __future__ import annotations

import torch

from ..model.subject import Subject
from .recipes import IMAGE_SIZE, OrganismRecipe


def mrope_section(head_dim: int) -> list[int]:
    """Rotary frequency slots for (time, height, width): a quarter to time, the rest split between height and width."""
    half = head_dim // 2
    t = max(1, half // 4)
    h = (half - t) // 2
    return [t, h, half - t - h]


def build_model(recipe: OrganismRecipe, tokenizer, seed: int = 0, attn_implementation: str = "eager"):
    """A seeded random Qwen2.5-VL of the recipe's shape (float32)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from ..model.subjects import tiny

    config = tiny.build_config(tokenizer, hidden_size=recipe.hidden_size, num_layers=recipe.num_layers,
                               num_heads=recipe.num_heads)
    head_dim = recipe.hidden_size // recipe.num_heads
    config.text_config.rope_parameters = {"rope_type": "default", "rope_theta": recipe.rope_theta,
                                          "mrope_section": mrope_section(head_dim)}
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    return model.eval()


def build_subject(recipe: OrganismRecipe, model, tokenizer, image_processor, checkpoint: str = "") -> Subject:
    """The Subject an organism is studied as (the same object whether freshly trained or loaded)."""

    subject = Subject(
        name=recipe.subject_name, model=model, tokenizer=tokenizer, image_processor=image_processor,
        protocol=recipe.protocol, prompt_style=recipe.prompt_style, answer_parser="letter", mediator=recipe.mediator,
        checkpoint=checkpoint, max_new_tokens=recipe.max_new_tokens,
        description=f"organism {recipe.name}: {recipe.summary}. Ground truth: {recipe.ground_truth}",
        text_mediator_markers=recipe.text_mediator_markers)
    # What it was trained on: other sizes or tasks give chance answers (see latentprobe.model.conditions).
    subject.input_conditions = {"task": recipe.task, "image_size": IMAGE_SIZE,
                                "why": "the size it was trained at: each grid cell is 2x2 merged image tokens"}
    return subject


def fresh_subject(recipe: OrganismRecipe, seed: int = 0) -> Subject:
    """An untrained organism: the tiny tokenizer and a seeded random model of the recipe's shape."""
    from ..model.subjects import tiny

    tokenizer = tiny.build_tokenizer()
    model = build_model(recipe, tokenizer, seed=seed)
    return build_subject(recipe, model, tokenizer, tiny.build_image_processor(), checkpoint="untrained")
