"""The real model families, one declarative entry each: protocol, prompt, answer format, decoding defaults.

Facts come from each model's public code (the repository and file of each fact are cited next to it below). Checkpoints load from a local folder
or a hub id (`--checkpoint`); the default hub id is the authors' published one.

    >>> from latentprobe.model.subjects import SUBJECTS, load_subject
    >>> SUBJECTS["monet"].describe()["answer_parser"]
    'boxed'
    >>> load_subject("lvr", checkpoint="/models/LVR-7B")   # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...errors import LatentProbeError
from ..image_pipeline import LVR_PIPELINE, MIRAGE_PIPELINE, MONET_PIPELINE, PROCESSOR_DEFAULT, ImagePipeline
from ..protocol import get_protocol
from ..subject import PromptStyle, Subject
from . import SubjectSpec, download_checkpoint, load_checkpoint, register, _looks_like_hub_id
from .lvr_head import attach_feedback_head  # noqa: F401  (LVR's head, src/model/lvr_heads.py)

QWEN_DEFAULT_SYSTEM = None  # the chat template's own "You are a helpful assistant."
LETTER_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
MONET_SYSTEM = ("You are a helpful multimodal assistant. You are required to answer the question based on the image "
                "provided. Put your final answer in \\boxed{}.")
# VLMEvalKit's multiple-choice prompt (ImageMCQDataset.build_prompt), which Monet is evaluated with.
VLMEVALKIT_MCQ_FOOTER = "\nPlease select the correct answer from the options above. \n"
MIRAGE_BOXED_SUFFIX = "\n The final answer MUST BE put in \\boxed{}."
# Mirage's VSP spatial-planning prompt (its data/vsp_spatial_planning test_direct.jsonl, run by src/test.py): the
# map is inline at "Here is the map:".
MIRAGE_VSP_PLANNING = (
    "\nAs a professional maze solver, your task is to analyze a grid-based map and devise an action plan that "
    "enables a player to reach the goal from the starting point without falling into any holes, using the fewest "
    "possible moves.\n\n## Game Setup\n- The game presents a fully observable grid-based map.\n- The player starts "
    "at a specified grid square, with the goal located elsewhere on the map.\n- Each grid square is either safe or "
    "contains a hole.\n- Your goal is to guide the player to the goal while avoiding holes.\n\n\n## Moving Rules\n"
    "- The action plan involves a series of moves: 'L' (left), 'R' (right), 'U' (up), or 'D' (down).\n- Each move "
    "transfers the player to the adjacent square in that direction, provided it is a safe square. The player cannot "
    "move more than one square at a time.\n- Moving off the edge of the map has no effect. The player will remain "
    "at the same square.\n- DO NOT MOVE INTO A HOLE! Falling into a hole results in defeat.\n- Locating at the grid "
    "containing the goal results in victory.\n\nHere is the map: <image>\n\nPlease provide your action plan.\n "
    "The final answer MUST BE put in \\boxed{}.")
CAPIMAGINE_MARKERS = ("<think_image>", "</think_image>")
DECODING_CHOICES = ("greedy", "authors")
# The sampling fields of an "authors" preset that DecodeConfig carries; anything else in a preset is reported.
_DECODE_FIELDS = ("do_sample", "temperature", "top_p", "top_k", "max_new_tokens")


@dataclass(frozen=True)
class FamilySpec(SubjectSpec):
    """A published model family: everything `latentprobe subjects --show NAME` prints.

    ``authors_settings`` is how the authors decode (sampling and image pixel budget, with its source);
    ``--decoding authors`` runs it, greedy is the analysis default. ``config_token_ids`` maps each protocol token to
    the config field where the authors' training stored its id (checked by `latentprobe check`).
    ``adds_tokens`` lists tokens the authors' inference adds to the tokenizer after loading (in their order), when
    the checkpoint's tokenizer lacks them. ``benchmark_options`` are the loader settings of the authors'
    evaluation (Mirage: VSP levels 3-6). ``head`` says whether the checkpoint carries a feedback head: "none",
    "optional" (LVR: present exactly when ``config.lvr_head`` is set).
    """

    hub_id: str = ""
    protocol_name: str | None = None
    prompt_style: PromptStyle = field(default_factory=PromptStyle)
    answer_parser: str = "letter"
    mediator: str | None = "latent"
    max_new_tokens: int = 1024
    text_mediator_markers: tuple[str, str] | None = None
    authors_settings: dict[str, Any] = field(default_factory=dict)
    config_token_ids: dict[str, str] = field(default_factory=dict)
    adds_tokens: tuple[str, ...] = ()
    benchmark_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    head: str = "none"
    answer_prefix: str | None = None  # text just before the answer (latentprobe.model.answer_slot); None: the default rule
    answer_lead: str = ""  # text between the answer prefix and the answer (LVR writes "<answer> B"): candidate ids
    image_pipeline: ImagePipeline = PROCESSOR_DEFAULT  # how the authors' code resizes images before the processor
    notes: str = ""

    def describe(self) -> dict[str, Any]:
        protocol = get_protocol(self.protocol_name).describe() if self.protocol_name else None
        return {"name": self.name, "summary": self.summary, "default_checkpoint": self.hub_id,
                "protocol": protocol, "prompt_style": self.prompt_style.describe(),
                "answer_parser": self.answer_parser, "mediator": self.mediator,
                "text_mediator_markers": self.text_mediator_markers, "max_new_tokens": self.max_new_tokens,
                "decoding": "greedy by default; --decoding authors runs authors_settings",
                "authors_settings": self.authors_settings, "config_token_ids": self.config_token_ids,
                "adds_tokens_at_load": list(self.adds_tokens), "benchmark_options": self.benchmark_options,
                "feedback_head": self.head, "notes": self.notes, "image_pipeline": self.image_pipeline.describe(),
                "answer_slot": _answer_slot_rule(self),
                "latent_layout": protocol["latent_layout"] if protocol else None}


def decoding_preset(subject: Subject, preset: str = "greedy") -> tuple[dict[str, Any], dict[str, Any]]:
    """DecodeConfig keyword arguments for a named preset, and the preset's settings the decoder cannot apply.

    "greedy" is the analysis default (argmax at every text step); "authors" is the family's own sampling
    (``subject.authors_settings``). Settings DecodeConfig lacks (Monet's repetition penalty 1.01) come back in
    the second dict so the caller can say they were not applied.

    >>> from types import SimpleNamespace
    >>> decoding_preset(SimpleNamespace(authors_settings={"do_sample": True, "temperature": 0.7}), "authors")
    ({'do_sample': True, 'temperature': 0.7}, {})
    """
    if preset not in DECODING_CHOICES:
        raise LatentProbeError(f"unknown decoding preset {preset!r}", f"use one of {', '.join(DECODING_CHOICES)}")
    if preset == "greedy":
        return {"do_sample": False}, {}
    settings = dict(getattr(subject, "authors_settings", None) or {})
    if not settings:
        raise LatentProbeError(f"subject {getattr(subject, 'name', '?')} has no authors' decoding settings",
                               "use --decoding greedy, or --sample with --temperature/--top-p/--top-k")
    applied = {k: settings[k] for k in _DECODE_FIELDS if k in settings}
    ignored = {k: v for k, v in settings.items()
               if k not in _DECODE_FIELDS and k not in ("min_pixels", "max_pixels", "source", "latent_steps")}
    return applied, ignored


def benchmark_options(subject_name: str, benchmark: str) -> dict[str, Any]:
    """The loader settings of a family's own evaluation for one benchmark ({} when none)."""
    spec = SUBJECTS_BY_NAME.get(subject_name)
    if spec is None:
        return {}
    from ...data.benchmarks import canonical_name

    return dict(spec.benchmark_options.get(canonical_name(benchmark), {}))


def _builder(spec_name: str):
    def build(checkpoint: str | None = None, protocol: str | None = None, torch_dtype: Any = None,
              attn_implementation: str | None = None, **_: Any) -> Subject:
        # The number of latent steps is a decoding setting (DecodeConfig.latent_steps / --latent-steps).
        spec: FamilySpec = SUBJECTS_BY_NAME[spec_name]
        folder = checkpoint or spec.hub_id
        if _looks_like_hub_id(folder):
            folder = download_checkpoint(folder)
        proto_name = protocol or spec.protocol_name
        pixels = (spec.authors_settings.get("min_pixels"), spec.authors_settings.get("max_pixels"))
        subject = load_checkpoint(folder, protocol=proto_name, name=spec.name, prompt_style=spec.prompt_style,
                                  answer_parser=spec.answer_parser, torch_dtype=torch_dtype,
                                  attn_implementation=attn_implementation or _best_attention(),
                                  mediator=spec.mediator, max_new_tokens=spec.max_new_tokens,
                                  text_mediator_markers=spec.text_mediator_markers, description=spec.summary,
                                  authors_settings=dict(spec.authors_settings), add_tokens=spec.adds_tokens,
                                  image_pixels=pixels if all(pixels) else None,
                                  answer_prefix=spec.answer_prefix)
        subject.answer_lead = spec.answer_lead
        subject.image_pipeline = spec.image_pipeline
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


MONET_AUTHORS = {"do_sample": True, "temperature": 0.1, "top_p": 0.8, "top_k": 50, "repetition_penalty": 1.01,
                 "min_pixels": 256 * 28 * 28, "max_pixels": 8192 * 28 * 28, "max_new_tokens": 4096,
                 "source": "NOVAglow646/Monet inference/load_and_gen_vllm.py"}
LVR_AUTHORS = {"do_sample": False, "max_new_tokens": 512, "latent_steps": 4,
               "source": "VincentLeebang/lvr evaluation/evaluation.py (generate's greedy default; 4/8/16 steps)"}
MIRAGE_AUTHORS = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 1024,
                  "source": "UMass-Embodied-AGI/Mirage src/test.py"}

FAMILIES = [
    FamilySpec(name="monet", summary="Monet-7B: latent visual tokens, model-emitted end or quota 10",
               build=_builder("monet"), needs_checkpoint=True, hub_id="NOVAglow646/Monet-7B", protocol_name="monet",
               prompt_style=PromptStyle(system_prompt=MONET_SYSTEM, question_prefix="Question: ",
                                        options_footer=VLMEVALKIT_MCQ_FOOTER),
               answer_parser="boxed", answer_prefix="\\boxed{", max_new_tokens=4096, authors_settings=MONET_AUTHORS,
               image_pipeline=MONET_PIPELINE,
               config_token_ids={"<abs_vis_token_pad>": "latent_token_id", "<abs_vis_token>": "latent_start_id",
                                 "</abs_vis_token>": "latent_end_id"},
               notes="Evaluated with VLMEvalKit's prompts and this system prompt (README). Monet keeps its sampled "
                     "ids at latent steps (stripped from the answer); users report it often never enters latent "
                     "mode: the index records whether, where and how long each row did. Its image pixel budget "
                     "(256-8192 x 28 x 28) is applied at load."),
    FamilySpec(name="lvr", summary="LVR-7B: fixed-K latent visual reasoning (4; 8 and 16 with --latent-steps)",
               build=_builder("lvr"), needs_checkpoint=True, hub_id="vincentleebang/LVR-7B", protocol_name="lvr",
               prompt_style=PromptStyle(system_prompt=QWEN_DEFAULT_SYSTEM, suffix=LETTER_SUFFIX,
                                        raw_text_attribute="raw_text", options_footer="\n"),
               answer_parser="answer_tag_letter", answer_prefix="<answer>", answer_lead=" ", max_new_tokens=512,
               authors_settings=LVR_AUTHORS, image_pipeline=LVR_PIPELINE,
               config_token_ids={"<|lvr_start|>": "lvr_start_id", "<|lvr|>": "lvr_id",
                                 "<|lvr_latent_end|>": "lvr_latent_end_id", "<|lvr_end|>": "lvr_end_id"},
               head="optional",
               notes="Prompt as LVR's evaluation builds it: V*'s raw text field (options and its own instruction "
                     "included) plus the letter instruction; MMVP-style 'Options:' lists otherwise. Answers are "
                     "read as its evaluation does: the first character inside <answer>. An LVRHead in the "
                     "checkpoint (lvr_head.*, config.lvr_head) maps the hidden state before feedback; the 7B "
                     "stage-1 model has none."),
    FamilySpec(name="mirage", summary="Mirage (VSP spatial planning): latent tokens until <|latent_end|>, cap 8",
               build=_builder("mirage"), needs_checkpoint=True, hub_id="Miiche/vsp_spatial_planning_direct_sft",
               protocol_name="mirage",
               prompt_style=PromptStyle(system_prompt=QWEN_DEFAULT_SYSTEM, suffix=MIRAGE_BOXED_SUFFIX,
                                        task_templates={"spatial_planning": MIRAGE_VSP_PLANNING},
                                        generation_prompt="<|im_start|>assistant"),
               answer_parser="boxed", answer_prefix="\\boxed{", max_new_tokens=1024, authors_settings=MIRAGE_AUTHORS,
               image_pipeline=MIRAGE_PIPELINE,
               config_token_ids={"<|latent_pad|>": "latent_token_id", "<|latent_start|>": "latent_start_id",
                                 "<|latent_end|>": "latent_end_id"},
               adds_tokens=("<|latent_pad|>", "<|latent_start|>", "<|latent_end|>"),
               benchmark_options={"vsp": {"levels": (3, 4, 5, 6), "plan_rule": "end"}},
               notes="The released checkpoint is trained for VSP spatial planning only (its README). Qwen's default "
                     "system prompt; the VSP prompt puts the map inline at 'Here is the map:' and the assistant "
                     "turn opens without a newline, as src/test.py does; its plan in \\boxed{} is scored by "
                     "simulating it on the map (Mirage's rule: the walk must end on the goal), on VSP levels 3-6."),
    FamilySpec(name="capimagine", summary="CapImagine-7B: imagines in text, then answers (text mediator)",
               build=_builder("capimagine"), needs_checkpoint=True, hub_id="Michael4933/CapImagine-7B",
               protocol_name=None, prompt_style=PromptStyle(), answer_parser="boxed", mediator="text",
               text_mediator_markers=CAPIMAGINE_MARKERS,
               notes="Plain Qwen2.5-VL decoding. The imagination span is the text between the markers. No primary "
                     "source confirms them: secondary notes on the paper give <think_image>...</think_image>; "
                     "override with --mediator-markers OPEN,CLOSE. Rows whose output has no markers are "
                     "recorded as such."),
    FamilySpec(name="qwen2.5-vl", summary="Qwen2.5-VL-7B-Instruct: the no-imagination baseline",
               build=_builder("qwen2.5-vl"), needs_checkpoint=True, hub_id="Qwen/Qwen2.5-VL-7B-Instruct",
               protocol_name=None, prompt_style=PromptStyle(suffix=LETTER_SUFFIX), answer_parser="letter",
               mediator=None, max_new_tokens=64),
]
SUBJECTS_BY_NAME = {spec.name: spec for spec in FAMILIES}
for _spec in FAMILIES:
    register(_spec)
