"""Stand-in checkpoints for the real model families, and scripted outputs to drive them end to end.

A stand-in is a tiny random Qwen2.5-VL checkpoint folder (built offline in about a second) that carries what a real
family checkpoint carries and latentprobe depends on: the family's token strings added to the tokenizer in the
authors' order (Mirage's are absent, as its inference adds them after loading), the ids the authors' training
stores in the config (``latent_start_id``, ``lvr_id``, ...), a Qwen2-VL chat template, a generation config listing
Qwen's two eos ids, and an embedding with spare rows past the tokenizer (as Qwen's 151936 rows past 151665 tokens).

A random model writes noise, so `ScriptedOutputs` makes a loaded subject write a given text: hooks on the
backbone and the LM head force the greedy choice at every step to the script's next token. The script is aligned
with what the row has really been fed (tokens forced by the decoder are skipped over), and inside a latent phase
of a model-ended protocol (Monet, Mirage) the head keeps choosing "continue" for ``latent_steps`` steps before the
script's end token. Hidden states are the model's own, so cache-vs-recompute checks stay real.

    >>> folder = build_standin("lvr", tmp / "lvr")                                  # doctest: +SKIP
    >>> subject = load_subject("lvr", checkpoint=str(folder))                       # doctest: +SKIP
    >>> with ScriptedOutputs(subject, SCRIPTS["lvr"]):                              # doctest: +SKIP
    ...     result = LatentDecoder(subject).run(subject.encode(builtin_instances(1)))
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from latentprobe.model.subjects import tiny

FAMILY_TOKENS = {
    "monet": ("<abs_vis_token_pad>", "<abs_vis_token>", "</abs_vis_token>", "<observation>", "</observation>"),
    "lvr": ("<|lvr_start|>", "<|lvr|>", "<|lvr_latent_end|>", "<|lvr_end|>"),
    "mirage": (),  # Mirage's src/test.py adds <|latent_pad|>, <|latent_start|>, <|latent_end|> after loading
    "capimagine": (),  # plain Qwen2.5-VL: <think_image> is ordinary text
    "qwen2.5-vl": (),
    # ILVR's src/main.py adds Mirage's three strings in one add_tokens call before training; its checkpoint holds them
    "ilvr": ("<|latent_pad|>", "<|latent_start|>", "<|latent_end|>"),
}
FAMILIES = ("monet", "lvr", "mirage", "capimagine", "qwen2.5-vl")  # the first families; ILVR is built on demand
SPARE_EMBEDDING_ROWS = 8

# What each family writes, as its authors' evaluation reads it. Every script answers "B", which is not the gold of
# the built-in instance 0, so a test can tell a parsed answer from a scored one.
SCRIPTS = {
    "monet": "<abs_vis_token></abs_vis_token>It is green. \\boxed{B}",
    "lvr": "<|lvr_start|><|lvr_latent_end|><|lvr_end|>\n<answer> B </answer>",
    "mirage": "<|latent_start|><|latent_end|>\\boxed{B}",
    "capimagine": "<think_image>green cell</think_image>\\boxed{B}",
    "qwen2.5-vl": "B",
    # ILVR opens a span itself (twice here: spans interleave with text); the decoder writes the K pads and the end
    "ilvr": "Look.<|latent_start|><|latent_end|> Then<|latent_start|><|latent_end|>Final answer: B",
}
SCRIPT_LATENT_STEPS = {"monet": 3, "mirage": 4}


def build_standin(family: str, folder: str | Path, seed: int = 0, config_ids_offset: int = 0,
                  lvr_head: bool = False, chat_template: bool = True) -> Path:
    """Write a stand-in checkpoint folder for ``family`` and return it.

    ``config_ids_offset`` shifts the ids stored in the config (a checkpoint whose config disagrees with its
    tokenizer); ``lvr_head`` adds LVR head weights (``lvr_head.*``) and sets ``config.lvr_head``;
    ``chat_template=False`` leaves the tokenizer without a template.
    """
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    from latentprobe.model.subjects.families import SUBJECTS_BY_NAME

    if family not in FAMILY_TOKENS:
        raise ValueError(f"no stand-in for {family!r}; choose one of {FAMILIES}")
    folder = Path(folder)
    spec = SUBJECTS_BY_NAME[family]
    tokenizer = tiny.build_tokenizer(extra_special_tokens=())
    for token in FAMILY_TOKENS[family]:  # one call per token, as the authors' training scripts do
        tokenizer.add_tokens(token, special_tokens=True)
    if not chat_template:
        tokenizer.chat_template = None
    config = tiny.build_config(tokenizer)
    config.text_config.vocab_size = len(tokenizer) + SPARE_EMBEDDING_ROWS
    # The ids the authors' training stores in the config: for Mirage, the ids its tokens get when added at load.
    would_be = {token: len(tokenizer) + k for k, token in enumerate(spec.adds_tokens)}
    for token, attribute in spec.config_token_ids.items():
        token_id = tokenizer.convert_tokens_to_ids(token) if token in tokenizer.get_vocab() else would_be[token]
        setattr(config, attribute, int(token_id) + config_ids_offset)
    if family == "lvr":
        config.lvr_head = lvr_head
    if family == "ilvr":
        config.latent_size = 8  # src/main.py: config.latent_size = args.latent_size (run_training.sh: 8)
    config._attn_implementation = "eager"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # well-separated greedy choices, as in tiny.build_model
    model.save_pretrained(folder, safe_serialization=True)
    if lvr_head:
        _add_lvr_head(folder, config.text_config.hidden_size, seed)
    tokenizer.save_pretrained(folder)
    tiny.build_image_processor().save_pretrained(folder)
    vocab = tokenizer.get_vocab()
    GenerationConfig(eos_token_id=[vocab["<|im_end|>"], vocab["<|endoftext|>"]],
                     pad_token_id=vocab["<|endoftext|>"]).save_pretrained(folder)
    return folder


def _add_lvr_head(folder: Path, dim: int, seed: int) -> None:
    """LVR's head (src/model/lvr_heads.py): LayerNorm ``ln_q`` then ``mlp`` = Linear, GELU, Linear."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    weights = load_file(str(path))
    generator = torch.Generator().manual_seed(seed)
    weights.update({
        "lvr_head.ln_q.weight": torch.ones(dim), "lvr_head.ln_q.bias": torch.zeros(dim),
        "lvr_head.mlp.0.weight": torch.randn(dim, dim, generator=generator) / dim ** 0.5,
        "lvr_head.mlp.0.bias": torch.zeros(dim),
        "lvr_head.mlp.2.weight": torch.randn(dim, dim, generator=generator) / dim ** 0.5,
        "lvr_head.mlp.2.bias": torch.zeros(dim)})
    save_file(weights, str(path), metadata={"format": "pt"})


def read_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


class ScriptedOutputs:
    """Make a loaded subject's greedy choices write ``script`` (then eos), hooked on backbone and LM head.

    Per row, the hooks log what the backbone is fed (a token id, recognised by its embedding, or a latent vector)
    since the last fresh prefill. The LM head's output for a row then gets a large bonus on the script's next token:
    the script is walked along the fed tokens (a fed token that the script does not hold next, e.g. an end token
    the decoder forced, is matched further on or skipped). Inside a latent phase of a protocol ended by the model
    the head chooses the protocol's pad token until ``latent_steps`` latent vectors were fed, then the script's
    next token (its end token). Rows are told apart by their final-norm hidden state, which the LM head receives.
    """

    def __init__(self, subject, script: str | list[str], latent_steps: int = 0, bonus: float = 1e4):
        tokenizer = subject.tokenizer
        scripts = [script] if isinstance(script, str) else list(script)
        eos = subject.eos_token_ids[0]
        # one script for every row, or one per row (rows of a batch, or the M copies of decode(repeats=M))
        self.scripts = [tokenizer.encode(text, add_special_tokens=False) + [eos] for text in scripts]
        self.subject = subject
        self.latent_steps = latent_steps
        self.bonus = bonus
        proto = subject.resolved_protocol
        self.start_id = proto.start_id if proto is not None else None
        self.continue_id = (proto.pad_id if proto is not None and proto.pad_id is not None else None)
        self.model_ends_latent = proto is not None and proto.stop_rule == "end_token"
        self.history: list[list[int]] = []
        self.last_hidden: torch.Tensor | None = None
        self._handles = []

    @property
    def script(self) -> list[int]:
        return self.scripts[0]

    # -- hooks -----------------------------------------------------------------------------------------------
    def __enter__(self):
        from latentprobe.model.backbones import backbone_module

        inner, head = backbone_module(self.subject.model), self.subject.model.lm_head
        self._handles = [inner.register_forward_pre_hook(self._before_backbone, with_kwargs=True),
                         inner.register_forward_hook(self._after_backbone, with_kwargs=True),
                         head.register_forward_hook(self._after_head)]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _before_backbone(self, module, args, kwargs):
        input_ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        cache = kwargs.get("past_key_values")
        self._tracking = kwargs.get("use_cache", True) is not False
        if not self._tracking:  # a no-cache recompute (replay): not a decoding step
            return
        fresh = cache is None or cache.get_seq_length() == 0
        if input_ids is not None and embeds is None:
            if fresh:  # a prefill: new rows; a prompt ending with the start token is already in latent mode
                self.history = [[int(row[-1])] if int(row[-1]) == self.start_id else [] for row in input_ids]
            else:  # tokens appended as ids (a teacher-forced continuation)
                for row, ids in zip(self.history, input_ids.tolist()):
                    row.extend(ids)
            return
        if embeds is not None and embeds.shape[1] == 1 and self.history:
            if embeds.shape[0] > len(self.history) and embeds.shape[0] % len(self.history) == 0:
                copies = embeds.shape[0] // len(self.history)  # decode(repeats=M): row b -> rows b*M .. b*M+M-1
                self.history = [list(row) for row in self.history for _ in range(copies)]
            table = self.subject.model.get_input_embeddings().weight
            for row, vector in zip(self.history, embeds[:, 0]):
                match = (table == vector.to(table.dtype)).all(dim=-1).nonzero()
                row.append(int(match[0]) if len(match) else -1)

    def _after_backbone(self, module, args, kwargs, output):
        if getattr(self, "_tracking", False):
            hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
            self.last_hidden = hidden[:, -1].detach()

    def _after_head(self, module, args, output):
        hidden = args[0]
        if self.last_hidden is None or hidden.dim() != 2 or not self.history:
            return output
        if hidden.shape[0] > len(self.history) and hidden.shape[0] % len(self.history) == 0:
            copies = hidden.shape[0] // len(self.history)  # the first choice of decode(repeats=M)
            self.history = [list(row) for row in self.history for _ in range(copies)]
            self.last_hidden = self.last_hidden.repeat_interleave(copies, dim=0)
        output = output.clone()
        taken: set[int] = set()
        for i, vector in enumerate(hidden):
            # identical rows (copies of one prompt) come in ascending order: give each the first one not taken
            rows = [int(r) for r in (self.last_hidden == vector).all(dim=-1).nonzero().flatten() if int(r) not in taken]
            if rows and rows[0] < len(self.history):
                taken.add(rows[0])
                output[i, self._next(rows[0])] = output[i].max() + self.bonus
        return output

    # -- the script ----------------------------------------------------------------------------------------
    def _next(self, row: int) -> int:
        fed = self.history[row]
        script = self.scripts[row % len(self.scripts)] if len(self.scripts) > 1 else self.scripts[0]
        position = 0
        for token in fed:
            if token < 0:
                continue
            if position < len(script) and script[position] == token:
                position += 1
            elif token in script[position:]:
                position = script.index(token, position) + 1
        position = min(position, len(script) - 1)
        latent_run = 0
        while latent_run < len(fed) and fed[-1 - latent_run] < 0:
            latent_run += 1
        in_latent = (self.model_ends_latent and len(fed) > latent_run and fed[-1 - latent_run] == self.start_id)
        if in_latent and latent_run < self.latent_steps and self.continue_id is not None:
            return self.continue_id
        return script[position]


def scripted(subject, family: str) -> ScriptedOutputs:
    """The family's own answer format (``SCRIPTS``) on a loaded stand-in subject."""
    return ScriptedOutputs(subject, SCRIPTS[family], latent_steps=SCRIPT_LATENT_STEPS.get(family, 0))
