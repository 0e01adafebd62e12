"""Subjects: a loaded model with everything needed to ask it a question and read its answer.

A `Subject` bundles the model, tokenizer, image processor, the latent protocol (None for models that do not
reason in latent space), how prompts are built (system prompt, suffix, whether the prompt itself opens latent
mode) and how answers are parsed. `encode` turns instances into a left-padded model batch with everything the
decoder needs for explicit multimodal positions.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data.instances import Instance, load_images
from ..errors import InstanceError, LatentProbeError
from .protocol import LatentProtocol, ResolvedProtocol


IMAGE_PLACEHOLDER = "<image>"  # in a question template: where the image goes (Mirage's "Here is the map: <image>")


@dataclass
class PromptStyle:
    """How a model family's own evaluation code phrases a question.

    The user turn is the images (in order) then the question text (``image_position="before"``), or the text then
    the images (``"after"``: the organisms' layout), unless the text holds ``<image>`` placeholders, which put the
    images inline there. The question text is, first match wins:
    ``task_templates[instance.task]`` (``{question}`` and ``{options}`` filled in), the instance's own text in
    ``attributes[raw_text_attribute]`` (a benchmark's text, options included) plus ``suffix``, or
    ``question_prefix`` + question + options + ``suffix``.
    """

    system_prompt: str | None = None  # None: the chat template's default; "" : no system turn
    suffix: str = ""  # appended after the question and options
    option_format: str = "\n{letter}. {text}"
    options_header: str = "\nOptions:"
    options_footer: str = ""  # after the options, only when there are options (VLMEvalKit's "Please select ...")
    force_latent_start: bool = False  # the prompt ends with the protocol's start token
    assistant_prefix: str = ""  # text the assistant turn begins with (before any forced start token)
    question_prefix: str = ""  # before the question (VLMEvalKit: "Question: ")
    raw_text_attribute: str | None = None  # an instance attribute holding the benchmark's own full text
    task_templates: dict[str, str] = field(default_factory=dict)  # instance.task -> the family's own prompt
    # None: the template's generation prompt ("<|im_start|>assistant\n"); else the prompt is rendered without it
    # and this string appended (Mirage's test.py appends "<|im_start|>assistant", no newline)
    generation_prompt: str | None = None
    image_position: str = "before"  # images before the question text (Qwen's layout) or "after" it (organisms)
    # Text latent-CoT evaluations (Coconut, CODI) feed the question itself, no chat turn: ``plain`` renders the
    # question text (+ suffix) alone and tokenises it with the tokenizer's own special tokens (a Llama BOS).
    plain: bool = False
    strip_question: bool = False  # CODI's test.py strips the question ...
    question_replace: tuple[tuple[str, str], ...] = ()  # ... and replaces "  " with " " (in this order)

    def __post_init__(self):
        if self.image_position not in ("before", "after"):
            raise LatentProbeError(f"image_position must be 'before' or 'after', got {self.image_position!r}",
                                   "put the images before the question text (Qwen's layout) or after it")

    def describe(self) -> dict[str, Any]:
        return dict(self.__dict__)


def answer_first_token(tokenizer, lead: str, text: str) -> int | None:
    """The first token of ``text`` written after ``lead`` (the slot's token): a BPE that merges the lead into the
    answer (Qwen's " B") gives the merged token; one that does not gives the answer's own first token.

    Remembered per tokenizer (and its vocabulary size, which grows when tokens are added): a patching grid or a
    sweep reads the same few options' tokens for every row it scores."""
    try:
        memo = _FIRST_TOKENS.setdefault(tokenizer, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced or hashed: not remembered
        return _first_token(tokenizer, lead, text)
    key = (lead, text, len(tokenizer) if hasattr(tokenizer, "__len__") else None)
    if key not in memo:
        memo[key] = _first_token(tokenizer, lead, text)
    return memo[key]


_FIRST_TOKENS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _first_token(tokenizer, lead: str, text: str) -> int | None:
    tokens = tokenizer.encode(lead + text, add_special_tokens=False)
    lead_tokens = tokenizer.encode(lead, add_special_tokens=False) if lead else []
    if lead_tokens and tokens[: len(lead_tokens)] == lead_tokens:
        tokens = tokens[len(lead_tokens):]
    return tokens[0] if tokens else None


def _user_content(text: str, n_images: int, image_position: str = "before") -> list[dict[str, str]]:
    """Images then the text (or the text then the images, ``image_position="after"``); or, when the text holds
    ``<image>`` placeholders, each image at its own."""
    pieces = text.split(IMAGE_PLACEHOLDER)
    if len(pieces) == 1:
        images = [{"type": "image"} for _ in range(n_images)]
        text_part = [{"type": "text", "text": text}]
        return text_part + images if image_position == "after" else images + text_part
    if len(pieces) - 1 != n_images:
        raise InstanceError(f"the prompt has {len(pieces) - 1} {IMAGE_PLACEHOLDER} placeholder(s) but the instance "
                            f"has {n_images} image(s)", "give the template one placeholder per image")
    content: list[dict[str, str]] = []
    for k, piece in enumerate(pieces):
        if k:
            content.append({"type": "image"})
        if piece:
            content.append({"type": "text", "text": piece})
    return content


def validate_markers(markers: Any, where: str = "mediator markers") -> tuple[str, str]:
    """Two non-empty, distinct strings (open, close) around a text mediator; anything else is an error."""
    if isinstance(markers, str):
        markers = markers.split(",")
    try:
        open_marker, close_marker = (str(m) for m in markers)
    except (TypeError, ValueError):
        raise LatentProbeError(f"{where}: expected two strings OPEN,CLOSE, got {markers!r}",
                               "pass e.g. --mediator-markers '<think_image>,</think_image>'") from None
    if not open_marker.strip() or not close_marker.strip():
        raise LatentProbeError(f"{where}: markers must not be empty, got {(open_marker, close_marker)!r}",
                               "pass two non-empty strings, e.g. '<think_image>,</think_image>'")
    if open_marker == close_marker:
        raise LatentProbeError(f"{where}: the open and close markers are both {open_marker!r}",
                               "the close marker must differ from the open one, e.g. '<think_image>,</think_image>'")
    return open_marker, close_marker


@dataclass
class PromptBatch:
    """A left-padded batch ready for prefill, plus the bookkeeping the decoder and recorder need."""

    instance_ids: list[str]
    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    mm_token_type_ids: torch.Tensor  # (B, L): 0 text, 1 image
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    prompts: list[str]
    merge_size: int = 2
    image_counts: list[int] = field(default_factory=list)  # images of each row, in order

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    def repeat(self, repeats: int) -> "PromptBatch":
        """Each row repeated ``repeats`` times in place (row b -> rows b*M .. b*M+M-1), images included."""
        rep = lambda t: None if t is None else t.repeat_interleave(repeats, dim=0)
        grid = pixels = None
        if self.image_grid_thw is not None:
            # images belong to rows in order; pixel rows to images by their patch counts
            patches = self.image_grid_thw.prod(-1).tolist()
            pixel_chunks = list(torch.split(self.pixel_values, patches))
            grid_chunks = list(self.image_grid_thw)
            row_images, start = [], 0
            for count in self.image_counts:
                row_images.append(range(start, start + count))
                start += count
            order = [k for images in row_images for _ in range(repeats) for k in images]
            grid = torch.stack([grid_chunks[k] for k in order])
            pixels = torch.cat([pixel_chunks[k] for k in order])
        return PromptBatch([iid for iid in self.instance_ids for _ in range(repeats)], rep(self.input_ids),
                           rep(self.attention_mask), rep(self.mm_token_type_ids), pixels, grid,
                           [p for p in self.prompts for _ in range(repeats)], self.merge_size,
                           [c for c in self.image_counts for _ in range(repeats)])

    def to(self, device) -> "PromptBatch":
        move = lambda t: None if t is None else t.to(device)
        return PromptBatch(self.instance_ids, move(self.input_ids), move(self.attention_mask),
                           move(self.mm_token_type_ids), move(self.pixel_values), move(self.image_grid_thw),
                           self.prompts, self.merge_size, self.image_counts)


@dataclass
class Subject:
    """A model under study. Build one with `latentprobe.model.subjects.load_subject`."""

    name: str
    model: Any
    tokenizer: Any
    image_processor: Any
    protocol: LatentProtocol | None
    prompt_style: PromptStyle = field(default_factory=PromptStyle)
    answer_parser: str = "letter"
    mediator: str | None = "latent"  # "latent", "text" (CapImagine) or None (no imagination)
    checkpoint: str = ""
    max_new_tokens: int = 32
    description: str = ""
    text_mediator_markers: tuple[str, str] | None = None  # (open, close) strings around imagination text
    authors_settings: dict[str, Any] = field(default_factory=dict)  # the family's own decoding and image budget
    added_tokens: list[str] = field(default_factory=list)  # tokens added to the tokenizer at load (Mirage)
    answer_prefix: str | None = None  # text written just before the answer (latentprobe.model.answer_slot); None: default
    answer_lead: str = ""  # text written between the answer prefix and the answer (LVR: "<answer> B": a space)
    image_pipeline: Any = None  # model.image_pipeline.ImagePipeline: the authors' resize before the processor
    _resolved: ResolvedProtocol | None = field(default=None, init=False, repr=False)
    _fingerprint: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.text_mediator_markers is not None:
            self.text_mediator_markers = validate_markers(self.text_mediator_markers, f"subject {self.name}")
        if self.protocol is not None:
            self._resolved = self.protocol.resolve(self.tokenizer)
        self._check_vision_tokens()

    # -- facts -----------------------------------------------------------------------------------------
    @property
    def resolved_protocol(self) -> ResolvedProtocol | None:
        return self._resolved

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def eos_token_ids(self) -> list[int]:
        """``<|im_end|>``, the tokenizer's eos and the checkpoint's ``generation_config`` eos ids (Qwen2.5-VL lists
        ``<|endoftext|>`` there too), as ``generate`` stops on them."""
        ids = {self.tokenizer.get_vocab()["<|im_end|>"]} if "<|im_end|>" in self.tokenizer.get_vocab() else set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        generation = getattr(self.model, "generation_config", None)
        configured = getattr(generation, "eos_token_id", None) if generation is not None else None
        if configured is not None:
            ids.update([configured] if isinstance(configured, int) else list(configured))
        return sorted(i for i in ids if isinstance(i, int) and i >= 0)

    @property
    def answer_slot_prefix(self) -> str | None:
        """The text after which the answer slot sits (see `latentprobe.model.answer_slot`)."""
        from .decoding import answer_slot_prefix

        return answer_slot_prefix(self)

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.eos_token_ids[0]

    @property
    def num_layers(self) -> int:
        return self.model.config.get_text_config().num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.model.config.get_text_config().hidden_size

    @property
    def text_only(self) -> bool:
        """A decoder-only language model (no images, 1-D positions); see `latentprobe.model.backbones`."""
        from .backbones import is_multimodal

        return not is_multimodal(self.model)

    def fingerprint(self) -> str:
        """A hash of the weights (sampled for speed on large models) and the config."""
        if self._fingerprint is None:
            digest = hashlib.sha256(json.dumps(self.model.config.to_dict(), sort_keys=True, default=str).encode())
            for name, tensor in sorted(self.model.state_dict().items()):
                flat = tensor.detach().reshape(-1)
                step = max(1, flat.numel() // 4096)
                digest.update(name.encode())
                digest.update(flat[::step].float().cpu().numpy().tobytes())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def __repr__(self) -> str:
        """One line: name, protocol, size and device (`describe()` has every detail; the dataclass repr printed
        the whole model, about 150 lines)."""
        protocol = self.protocol.name if self.protocol is not None else "none"
        try:
            device = str(next(self.model.parameters()).device)
        except (AttributeError, StopIteration, TypeError):
            device = "?"
        return (f"Subject({self.name!r}, protocol={protocol}, mediator={self.mediator}, "
                f"layers={self.num_layers}, checkpoint={self.checkpoint!r}, device={device})")

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name, "checkpoint": self.checkpoint, "description": self.description,
            "protocol": self.protocol.describe() if self.protocol else None,
            "prompt_style": self.prompt_style.describe(), "answer_parser": self.answer_parser,
            "mediator": self.mediator, "max_new_tokens": self.max_new_tokens,
            "text_mediator_markers": list(self.text_mediator_markers) if self.text_mediator_markers else None,
            "authors_settings": self.authors_settings or None, "added_tokens": list(self.added_tokens),
            "answer_prefix": self.answer_slot_prefix,
            "image_pipeline": self.image_pipeline.describe() if self.image_pipeline is not None else
            {"resize": "processor", "source": "Qwen2.5-VL's processor defaults"},
            "layers": self.num_layers, "hidden_size": self.hidden_size,
            "backbone": self.model.config.model_type, "text_only": self.text_only,
        }

    def _check_vision_tokens(self):
        if self.text_only:
            return
        config = self.model.config
        vocab = self.tokenizer.get_vocab()
        for attr, token in (("image_token_id", "<|image_pad|>"), ("vision_start_token_id", "<|vision_start|>")):
            if token not in vocab:
                raise LatentProbeError(f"subject {self.name}: tokenizer has no {token} token",
                                       "this does not look like a Qwen2.5-VL checkpoint")
            if getattr(config, attr, None) is None:
                setattr(config, attr, vocab[token])  # without it the first forward fails (tokens: 0, features: N)

    # -- answers -------------------------------------------------------------------------------------------
    def answer_region(self, raw_text: str) -> str:
        """The part of the output that holds the answer: after the text mediator's close marker if there is
        one, with special tokens removed."""
        import re

        if self.text_mediator_markers and self.text_mediator_markers[1] in raw_text:
            raw_text = raw_text.split(self.text_mediator_markers[1], 1)[1]
        specials = [t for t in self.tokenizer.all_special_tokens if t]
        for token in sorted(specials, key=len, reverse=True):
            raw_text = raw_text.replace(token, "")
        return re.sub(r"<\|[^|>]*\|>", "", raw_text).strip()

    def mediator_span(self, raw_text: str) -> str | None:
        """The imagination text between the mediator markers (None if the output has none)."""
        if not self.text_mediator_markers:
            return None
        open_marker, close_marker = self.text_mediator_markers
        if open_marker not in raw_text:
            return None
        span = raw_text.split(open_marker, 1)[1]
        return span.split(close_marker, 1)[0].strip()

    def answer_candidate_ids(self, instance: Instance) -> list[int] | None:
        """First token id of each answer candidate (option letters for letter answers, else option texts);
        None when the instance has no options or two candidates share a first token."""
        if not instance.options:
            return None
        from .answers import LETTER_PARSERS

        strings = instance.option_letters if self.answer_parser in LETTER_PARSERS else instance.options
        ids = [answer_first_token(self.tokenizer, self.answer_lead, text) for text in strings]
        if None in ids:
            return None
        return ids if len(set(ids)) == len(ids) else None

    def answer_probabilities(self, instance: Instance, logits: torch.Tensor | None) -> list[float] | None:
        """Probabilities of the candidates at the answer slot, renormalised over the candidates."""
        ids = self.answer_candidate_ids(instance)
        if ids is None or logits is None:
            return None
        return torch.softmax(logits[ids].float(), dim=-1).tolist()

    def gold_index(self, instance: Instance) -> int | None:
        letter = instance.gold_letter
        return None if letter is None else instance.option_letters.index(letter)

    # -- prompts -----------------------------------------------------------------------------------------
    def options_text(self, instance: Instance) -> str:
        style = self.prompt_style
        if not instance.options:
            return ""
        listed = "".join(style.option_format.format(letter=letter, text=option)
                         for letter, option in zip(instance.option_letters, instance.options))
        return style.options_header + listed + style.options_footer

    def question_text(self, instance: Instance) -> str:
        """The user turn's text as the family's evaluation writes it (see `PromptStyle`)."""
        style = self.prompt_style
        if style.strip_question or style.question_replace:
            import dataclasses

            question = instance.question.strip() if style.strip_question else instance.question
            for old, new in style.question_replace:
                question = question.replace(old, new)
            instance = dataclasses.replace(instance, question=question)
        template = style.task_templates.get(instance.task or "")
        if template is not None:
            # literal replacement, not str.format: templates hold LaTeX braces ("\\boxed{}")
            return template.replace("{question}", instance.question).replace("{options}", self.options_text(instance))
        raw = instance.attributes.get(style.raw_text_attribute) if style.raw_text_attribute else None
        if raw:
            return str(raw) + style.suffix
        return style.question_prefix + instance.question + self.options_text(instance) + style.suffix

    def prompt_text(self, instance: Instance, n_images: int | None = None, question: str | None = None) -> str:
        """The chat-formatted prompt with one placeholder per image (before expansion to patch tokens).

        ``question`` replaces the instance's question only (a question swap): options, suffix and template stay
        this instance's; a benchmark's raw text, which holds the original question, is then not used."""
        import dataclasses

        style = self.prompt_style
        n_images = len(instance.images) if n_images is None else n_images
        if question is not None:
            attributes = {k: v for k, v in instance.attributes.items() if k != style.raw_text_attribute}
            instance = dataclasses.replace(instance, question=question, attributes=attributes)
        text = self.question_text(instance)
        if style.plain:  # the question itself, as text latent-CoT evaluations feed it
            return self._with_forced_start(text + style.assistant_prefix)
        content = _user_content(text, n_images, style.image_position)
        messages = []
        if style.system_prompt:
            messages.append({"role": "system", "content": style.system_prompt})
        messages.append({"role": "user", "content": content})
        kwargs = {"skip_default_system": style.system_prompt == ""}
        add_generation = style.generation_prompt is None
        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation,
                                                      **kwargs)
        else:  # a bare tokenizer: fall back to the Qwen layout
            from .subjects.tiny import QWEN_VL_CHAT_TEMPLATE
            from jinja2 import Template
            text = Template(QWEN_VL_CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=add_generation,
                                                          **kwargs)
        if not add_generation:
            text += style.generation_prompt
        return self._with_forced_start(text + style.assistant_prefix)

    def _with_forced_start(self, text: str) -> str:
        if self.prompt_style.force_latent_start:
            if self.protocol is None:
                raise LatentProbeError(f"subject {self.name}: force_latent_start needs a latent protocol",
                                       "give the subject a protocol or unset force_latent_start")
            text += self.protocol.start_token
        return text

    def encode(self, instances: list[Instance], images: list[list[Any]] | None = None,
               prompts: list[str] | None = None) -> PromptBatch:
        """Tokenise a batch: expand each image placeholder to its merged-patch count, left-pad, mark image tokens.

        ``images`` overrides the instances' own images (input interventions pass edited ones);
        ``prompts`` overrides the prompt text (question interventions).
        """
        if self.text_only:
            given = images if images is not None else [inst.images for inst in instances]
            with_images = [inst.id for inst, row in zip(instances, given) if row]
            if with_images:
                raise LatentProbeError(f"subject {self.name} is a text-only model and instance {with_images[0]} has "
                                       "images", "use text instances (e.g. --data builtin-text, prosqa:FOLDER, "
                                       "gsm8k-aug:FILE) with a text subject")
            images = [[] for _ in instances]
        if images is None:
            images = [load_images(inst) for inst in instances]
        merge = getattr(self.image_processor, "merge_size", 2)
        if self.image_pipeline is not None:  # the family's own resize before the processor (LVR, Monet)
            images = [[self.image_pipeline.prepare(img) for img in row] for row in images]
        all_images = [img for row in images for img in row]
        pixel_values = grid = None
        if all_images:
            processed = self.image_processor(images=all_images, return_tensors="pt")
            pixel_values, grid = processed["pixel_values"], processed["image_grid_thw"]
        image_pad = "<|image_pad|>"
        rows, texts, cursor = [], [], 0
        for i, inst in enumerate(instances):
            text = prompts[i] if prompts is not None else self.prompt_text(inst, n_images=len(images[i]))
            n_placeholders = text.count(image_pad)
            if n_placeholders != len(images[i]):
                raise InstanceError(f"instance {inst.id}: prompt has {n_placeholders} image placeholders "
                                    f"but {len(images[i])} images", "check the prompt builder")
            pieces = text.split(image_pad)
            expanded = pieces[0]
            for k, piece in enumerate(pieces[1:]):
                n_tokens = int(grid[cursor + k].prod()) // (merge * merge)
                expanded += image_pad * n_tokens + piece
            cursor += len(images[i])
            texts.append(text)
            rows.append(self.tokenizer(expanded, add_special_tokens=self.prompt_style.plain)["input_ids"])
        max_len = max(len(r) for r in rows)
        pad = self.pad_token_id
        input_ids = torch.full((len(rows), max_len), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), max_len), dtype=torch.long)
        for i, ids in enumerate(rows):
            input_ids[i, max_len - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention[i, max_len - len(ids):] = 1
        image_token_id = getattr(self.model.config, "image_token_id", None)
        mm_types = (((input_ids == image_token_id) & attention.bool()).long() if image_token_id is not None
                    else torch.zeros_like(input_ids))
        return PromptBatch([inst.id for inst in instances], input_ids, attention, mm_types, pixel_values, grid, texts,
                           merge, [len(row) for row in images])
