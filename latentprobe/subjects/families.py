"""The real model families, one declarative entry each: protocol, prompt, answer format, decoding defaults.

Facts come from each model's public code (see REFERENCE.md section 1). Checkpoints load from a local folder
or a hub id (`--checkpoint`); the default hub id is the authors' published one.

    >>> from latentprobe.subjects import SUBJECTS, load_subject
    >>> SUBJECTS["monet"].describe()["answer_parser"]      # doctest: +SKIP
    'boxed'
    >>> load_subject("lvr", checkpoint="/models/LVR-7B")   # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import LatentProbeError
from ..protocol import get_protocol
from ..subject import PromptStyle, Subject
from . import SubjectSpec, download_checkpoint, load_checkpoint, register, _looks_like_hub_id
from .lvr_head import attach_feedback_head  # noqa: F401  (LVR's head, src/model/lvr_heads.py)

QWEN_DEFAULT_SYSTEM = None  # the chat template's own "You are a helpful assistant."
LETTER_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
MONET_SYSTEM = ("You are a helpful multimodal assistant. You are required to answer the question based on the image "
                "provided. Put your final answer in \\boxed{}.")


@dataclass(frozen=True)
class FamilySpec(SubjectSpec):
    """A published model family: everything `latentprobe subjects --show NAME` prints."""

    hub_id: str = ""
    protocol_name: str | None = None
    prompt_style: PromptStyle = field(default_factory=PromptStyle)
    answer_parser: str = "letter"
    mediator: str | None = "latent"
    max_new_tokens: int = 1024
    text_mediator_markers: tuple[str, str] | None = None
    answer_prefix: str | None = None  # text just before the answer (latentprobe.answer_slot); None: the default rule
    notes: str = ""

    def describe(self) -> dict[str, Any]:
        protocol = get_protocol(self.protocol_name).describe() if self.protocol_name else None
        return {"name": self.name, "summary": self.summary, "default_checkpoint": self.hub_id,
                "protocol": protocol, "prompt_style": self.prompt_style.describe(),
                "answer_parser": self.answer_parser, "mediator": self.mediator,
                "text_mediator_markers": self.text_mediator_markers, "max_new_tokens": self.max_new_tokens,
                "decoding": "greedy unless --sample", "notes": self.notes,
                "answer_slot": _answer_slot_rule(self),
                "latent_layout": protocol["latent_layout"] if protocol else None}


def _builder(spec_name: str):
    def build(checkpoint: str | None = None, protocol: str | None = None, torch_dtype: Any = None,
              attn_implementation: str | None = None, **_: Any) -> Subject:
        # The number of latent steps is a decoding setting (DecodeConfig.latent_steps / --latent-steps).
        spec: FamilySpec = SUBJECTS_BY_NAME[spec_name]
        folder = checkpoint or spec.hub_id
        if _looks_like_hub_id(folder):
            folder = download_checkpoint(folder)
        proto_name = protocol or spec.protocol_name
        subject = load_checkpoint(folder, protocol=proto_name, name=spec.name, prompt_style=spec.prompt_style,
                                  answer_parser=spec.answer_parser, torch_dtype=torch_dtype,
                                  attn_implementation=attn_implementation or _best_attention(),
                                  mediator=spec.mediator, max_new_tokens=spec.max_new_tokens,
                                  text_mediator_markers=spec.text_mediator_markers, description=spec.summary,
                                  answer_prefix=spec.answer_prefix)
        if subject.protocol is not None and subject.protocol.head_module:
            attach_feedback_head(subject, Path(folder))
        return subject

    return build


def _answer_slot_rule(spec: "FamilySpec") -> str:
    if spec.answer_prefix:
        return f"right after the last {spec.answer_prefix!r} in the output (appended when absent)"
    if spec.text_mediator_markers:
        return f"right after the close marker {spec.text_mediator_markers[1]!r} (appended when absent)"
    if spec.protocol_name:
        return "right after the latent end token"
    return "the first generated position"


def _best_attention() -> str:
    """sdpa on GPU (fast); eager on CPU so attention weights are available and tiny tests are exact."""
    return "sdpa" if torch.cuda.is_available() else "eager"


FAMILIES = [
    FamilySpec(name="monet", summary="Monet-7B: latent visual tokens, model-emitted end or quota 10",
               build=_builder("monet"), needs_checkpoint=True, hub_id="NOVAglow646/Monet-7B", protocol_name="monet",
               prompt_style=PromptStyle(system_prompt=MONET_SYSTEM), answer_parser="boxed", answer_prefix="\\boxed{",
               notes="Monet keeps its sampled ids at latent steps (stripped from the answer); users report it often "
                     "never enters latent mode: the index records whether, where and how long each row did."),
    FamilySpec(name="lvr", summary="LVR-7B: fixed-K latent visual reasoning (4; 8 and 16 with --latent-steps)",
               build=_builder("lvr"), needs_checkpoint=True, hub_id="VincentLeebang/LVR-7B", protocol_name="lvr",
               prompt_style=PromptStyle(system_prompt="You are a helpful assistant.", suffix=LETTER_SUFFIX),
               answer_parser="letter", max_new_tokens=64, answer_prefix="<answer>",
               notes="An LVRHead in the checkpoint (lvr_head.*) maps the hidden state before feedback; the 7B "
                     "stage-1 model has none."),
    FamilySpec(name="mirage", summary="Mirage: latent tokens until <|latent_end|>, cap 8 (trained with 4)",
               build=_builder("mirage"), needs_checkpoint=True, hub_id="UMass-Embodied-AGI/Mirage",
               protocol_name="mirage", prompt_style=PromptStyle(system_prompt=""), answer_parser="boxed",
               answer_prefix="\\boxed{",
               notes="No system message."),
    FamilySpec(name="capimagine", summary="CapImagine-7B: imagines in text, then answers (text mediator)",
               build=_builder("capimagine"), needs_checkpoint=True, hub_id="Michael4933/CapImagine-7B",
               protocol_name=None, prompt_style=PromptStyle(), answer_parser="boxed", mediator="text",
               text_mediator_markers=("<think>", "</think>"),
               notes="Plain Qwen2.5-VL decoding. The imagination span is the text between the markers; the markers "
                     "are our reading of its outputs, override them in a subject of your own if yours differ."),
    FamilySpec(name="qwen2.5-vl", summary="Qwen2.5-VL-7B-Instruct: the no-imagination baseline",
               build=_builder("qwen2.5-vl"), needs_checkpoint=True, hub_id="Qwen/Qwen2.5-VL-7B-Instruct",
               protocol_name=None, prompt_style=PromptStyle(suffix=LETTER_SUFFIX), answer_parser="letter",
               mediator=None, max_new_tokens=64),
]
SUBJECTS_BY_NAME = {spec.name: spec for spec in FAMILIES}
for _spec in FAMILIES:
    register(_spec)
