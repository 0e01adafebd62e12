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
from . import SubjectSpec, download_checkpoint, load_checkpoint, register, unregister, _looks_like_hub_id
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
    # Beyond the three Qwen2.5-VL families (issue 23):
    backbone: str = "qwen2_5_vl"  # "qwen2_5_vl", or "text" for a decoder-only causal LM (Coconut, CODI)
    config_latent_steps: str | None = None  # config field holding K (ILVR's latent_size); None: the protocol's
    authors_fixed_ids: dict[str, int] = field(default_factory=dict)  # ids the authors' code hard-codes (ILVR)
    adds_special: bool = False  # tokens in ``adds_tokens`` are added as special tokens (CODI)
    # tokens whose ids the authors define as the last rows of the resized embedding, in order (CODI: pad, bot, eot)
    trailing_token_ids: tuple[str, ...] = ()

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
                "latent_layout": protocol["latent_layout"] if protocol else None,
                "backbone": self.backbone, "latent_steps_from_config": self.config_latent_steps,
                "authors_fixed_ids": self.authors_fixed_ids, "trailing_token_ids": list(self.trailing_token_ids),
                "source_files": protocol["source"] if protocol else None}


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
        if not folder:
            raise LatentProbeError(f"{spec.name} has no published checkpoint id latentprobe knows",
                                   "pass --checkpoint FOLDER (the authors' Qwen2.5-VL fine-tune, saved as safetensors)")
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
        _steps_from_config(subject, spec)
        return subject

    return build


def _text_builder(spec_name: str):
    """Build a text latent-CoT family (a decoder-only causal LM folder) as its authors run it."""

    def build(checkpoint: str | None = None, protocol: str | None = None, torch_dtype: Any = None,
              attn_implementation: str | None = None, **_: Any) -> Subject:
        from .codi_head import attach_codi_head
        from .text import load_text_checkpoint

        spec: FamilySpec = SUBJECTS_BY_NAME[spec_name]
        folder = checkpoint or spec.hub_id
        if not folder:
            raise LatentProbeError(f"{spec.name} has no published checkpoint latentprobe can load",
                                   f"pass --checkpoint FOLDER (a safetensors causal-LM folder; see `latentprobe "
                                   f"subjects --show {spec.name}`)")
        if _looks_like_hub_id(folder):
            folder = download_checkpoint(folder)
        subject = load_text_checkpoint(folder, protocol=protocol or spec.protocol_name, name=spec.name,
                                       prompt_style=spec.prompt_style, answer_parser=spec.answer_parser,
                                       torch_dtype=torch_dtype,
                                       attn_implementation=attn_implementation or _best_attention(),
                                       add_tokens=spec.adds_tokens, add_special=spec.adds_special,
                                       max_new_tokens=spec.max_new_tokens, description=spec.summary,
                                       authors_settings=dict(spec.authors_settings), answer_prefix=spec.answer_prefix,
                                       mediator=spec.mediator)
        subject.answer_lead = spec.answer_lead
        _check_trailing_ids(subject, spec, folder)
        proto = subject.protocol
        if proto is not None and proto.head_module and not attach_codi_head(subject, Path(folder)) \
                and spec.head == "required":
            raise LatentProbeError(f"{folder} has no {proto.head_module}.* weights, which {spec.name} feeds every "
                                   "latent through", f"save the {proto.head_module} tensors beside the model's "
                                   "(see `latentprobe subjects --show " + spec.name + "`)")
        return subject

    return build


def _steps_from_config(subject: Subject, spec: "FamilySpec") -> None:
    """ILVR reads K from ``config.latent_size`` (src/evaluate_deepseed.py): the subject's protocol runs that many."""
    if not spec.config_latent_steps or subject.protocol is None:
        return
    value = getattr(subject.model.config, spec.config_latent_steps, None)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LatentProbeError(f"config.{spec.config_latent_steps} = {value!r} is not a positive whole number",
                               f"fix the checkpoint's config.json ({spec.name} reads its latent count there)")
    if value != subject.protocol.num_steps:
        subject.protocol = subject.protocol.with_steps(value)
        subject._resolved = subject.protocol.resolve(subject.tokenizer)


def _check_trailing_ids(subject: Subject, spec: "FamilySpec", folder) -> None:
    """CODI's pad, bot and eot are the last rows of the resized embedding (src/model.py): the tokens named for them
    must land there, or every latent would be fed between the wrong markers."""
    if not spec.trailing_token_ids:
        return
    rows = subject.model.get_input_embeddings().weight.shape[0]
    vocab = subject.tokenizer.get_vocab()
    expected = {token: rows - len(spec.trailing_token_ids) + k for k, token in enumerate(spec.trailing_token_ids)}
    wrong = [f"{token} = {vocab.get(token)} (authors' id {expected[token]})" for token in spec.trailing_token_ids
             if vocab.get(token) != expected[token]]
    if wrong:
        raise LatentProbeError(f"{folder}: {', '.join(wrong)}: the tokenizer is not the base model's one "
                               f"({len(vocab)} tokens for {rows} embedding rows)",
                               f"save the base model's tokenizer, without {spec.name}'s tokens, in the folder")


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
# ---------------------------------------------------------------------------------------- beyond three models
# ILVR (XD111ds/ILVR): Mirage's token strings, its own protocol. src/main.py adds <|latent_pad|>, <|latent_start|>,
# <|latent_end|> in one add_tokens call and stores their ids and latent_size in the config; src/evaluate_deepseed.py
# runs model.generate (greedy at temperature 0, eval.sh: 4096 new tokens) with LatentTemplateLogitsProcessor
# (src/utils_deepseed.py): outside a latent span <|latent_pad|> and <|latent_end|> are banned; inside, pad is forced
# until K = config.latent_size pads follow the start, then <|latent_end|>. The vendored generate loop
# (transformers/src/transformers/generation/utils.py, _sample) embeds the model-chosen start token, then feeds the
# last hidden state (post-norm, modeling_qwen2_5_vl.py returns it as outputs.hidden_states) at each pad position,
# resetting its counters at every start token, so latent spans interleave with text.
ILVR_AUTHORS = {"do_sample": False, "max_new_tokens": 4096, "latent_steps": 8,
                "source": "XD111ds/ILVR eval.sh (TEMPERATURE=0.0, MAX_NEW_TOKENS=4096), src/evaluate_deepseed.py"}
# Coconut (facebookresearch/coconut): run.py adds <|start-latent|>, <|end-latent|>, <|latent|> with add_tokens;
# dataset.py get_question_latent_dataset builds question + "\n", start, latent x k, end with k = max_latent_stage x
# c_thought (6 for ProsQA and GSM8k in args/*_eval.yaml); coconut.py feeds each latent position the last hidden state
# (hidden_states[-1], after GPT-2's ln_f) of the position before it, then decodes greedily (argmax) until eos;
# run.py reads the answer as text.split("#")[-1] and gives 64 new tokens for GSM8k, 128 otherwise.
COCONUT_AUTHORS = {"do_sample": False, "max_new_tokens": 128, "latent_steps": 6,
                   "source": "facebookresearch/coconut coconut.py generate (argmax); run.py (64 tokens for GSM8k)"}
# CODI (zhenyi4/codi): src/model.py gives pad, bot, eot the ids vocab_size, +1, +2 past the base vocabulary and a
# projection prj (Dropout, Linear, GELU, Linear, LayerNorm); test.py appends bot to the question
# (remove_eos=True in scripts/test_gpt2.sh), projects the bot state and every latent output before feeding it for
# inf_latent_iterations = 6 steps, feeds eot, then decodes greedily with the last vocabulary id (eot) cut from the
# logits, 256 new tokens, and reads the last number of the output (extract_answer_number).
CODI_AUTHORS = {"do_sample": False, "max_new_tokens": 256, "latent_steps": 6,
                "source": "zhenyi4/codi test.py (greedy, max_new_tokens 256), scripts/test_gpt2.sh "
                          "(inf_latent_iterations 6, use_prj, prj_dim 768)"}
TEXT_COT_STYLE = dict(plain=True, force_latent_start=True, option_format="", options_header="")

FAMILIES += [
    FamilySpec(name="ilvr", summary="ILVR-7B: interleaved latent visual reasoning, K = 8 latents per span",
               build=_builder("ilvr"), needs_checkpoint=True, hub_id="", protocol_name="ilvr",
               prompt_style=PromptStyle(system_prompt=QWEN_DEFAULT_SYSTEM, raw_text_attribute="text_input"),
               answer_parser="final_answer", answer_prefix="Final answer:", answer_lead=" ", max_new_tokens=4096,
               authors_settings=ILVR_AUTHORS,
               config_token_ids={"<|latent_pad|>": "latent_token_id", "<|latent_start|>": "latent_start_id",
                                 "<|latent_end|>": "latent_end_id"},
               config_latent_steps="latent_size",
               authors_fixed_ids={"<|latent_pad|>": 151665, "<|latent_start|>": 151666, "<|latent_end|>": 151667},
               notes="Same token strings as Mirage, another protocol: the model opens each latent span itself, "
                     "exactly K = config.latent_size (8) latents follow, <|latent_end|> is forced, and outside a "
                     "span pad and end are never chosen (LatentTemplateLogitsProcessor). The prompt is the data's "
                     "text_input after the images, with Qwen's default system prompt; answers are read as "
                     "extract_final_answer does (\"final answer: X\", then \"answer: X\"). Its vendored generate "
                     "hard-codes ids 151665-151667 while the logits processor reads them from the tokenizer: "
                     "`check` warns when a checkpoint's ids differ. No checkpoint is named in the repository."),
    FamilySpec(name="coconut", summary="Coconut (GPT-2): 6 continuous thoughts between <|start-latent|> and "
                                       "<|end-latent|>", build=_text_builder("coconut"), needs_checkpoint=True,
               hub_id="", protocol_name="coconut",
               prompt_style=PromptStyle(suffix="\n", **TEXT_COT_STYLE),
               answer_parser="after_hash", answer_prefix="###", answer_lead=" ", max_new_tokens=128,
               authors_settings=COCONUT_AUTHORS,
               adds_tokens=("<|start-latent|>", "<|end-latent|>", "<|latent|>"),
               benchmark_options={}, backbone="text",
               notes="A decoder-only causal LM (GPT-2 in the paper, Llama 3 tested). The authors publish no "
                     "weights and save checkpoints as pickled state dicts: save the base_causallm as a "
                     "safetensors folder first. The question plus a newline is followed by the start token, "
                     "6 latents (ProsQA: 6 x 1; GSM8k: 3 stages x 2) and the end token, all in the prompt."),
    FamilySpec(name="codi", summary="CODI (GPT-2): 6 latents through a projection head, between bot and eot ids",
               build=_text_builder("codi"), needs_checkpoint=True, hub_id="", protocol_name="codi",
               prompt_style=PromptStyle(strip_question=True, question_replace=(("  ", " "),), **TEXT_COT_STYLE),
               answer_parser="last_number", answer_prefix="The answer is:", answer_lead=" ", max_new_tokens=256,
               authors_settings=CODI_AUTHORS, adds_tokens=("[PAD]", "<|codi_bot|>", "<|codi_eot|>"),
               adds_special=True, trailing_token_ids=("[PAD]", "<|codi_bot|>", "<|codi_eot|>"), head="required",
               backbone="text",
               notes="CODI's bot and eot have no strings: latentprobe names them <|codi_bot|> and <|codi_eot|> and "
                     "adds them (after [PAD]) so that they get the authors' ids, the last three embedding rows. "
                     "The released weights (zen-E/CODI-gpt2, zen-E/CODI-llama3.2-1b-Instruct) are the CODI "
                     "module's state dict with LoRA adapters: merge them into the base model and save it as a "
                     "safetensors folder with the prj.* tensors. The authors' batched decode passes no attention "
                     "mask after the prompt (left padding is attended); latentprobe masks padding, which equals "
                     "their batch-1 run."),
]
SUBJECTS_BY_NAME = {spec.name: spec for spec in FAMILIES}


def register_family(name: str, summary: str, **fields: Any) -> FamilySpec:
    """Declare a family in one call (the README's "add a family" recipe): a `FamilySpec` whose builder follows its
    ``backbone`` ("qwen2_5_vl" or "text"), registered so that every command finds it by ``name``.

    >>> spec = register_family("doc-pause", "a doc example", protocol_name="coconut", backbone="text")
    >>> SUBJECTS_BY_NAME["doc-pause"].describe()["backbone"]
    'text'
    >>> _ = SUBJECTS_BY_NAME.pop("doc-pause"), unregister("doc-pause")
    """
    backbone = fields.get("backbone", "qwen2_5_vl")
    if backbone not in ("qwen2_5_vl", "text"):
        raise LatentProbeError(f"family {name}: unknown backbone {backbone!r}", "use 'qwen2_5_vl' or 'text'")
    build = _text_builder(name) if backbone == "text" else _builder(name)
    spec = FamilySpec(name=name, summary=summary, build=build, needs_checkpoint=True, **fields)
    register(spec)
    SUBJECTS_BY_NAME[name] = spec
    return spec
for _spec in FAMILIES:
    register(_spec)
