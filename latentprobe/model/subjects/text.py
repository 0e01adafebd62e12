"""Text-only subjects: decoder-only causal LMs (GPT-2, Llama, Qwen2, Qwen3) with a latent protocol.

Latent chain-of-thought in text models (Coconut, CODI) runs through the same decoder, sites and analyses as the
vision-language families: the backbone registry (`latentprobe.model.backbones`) says where blocks, norm and
embeddings are, and positions are plain 1-D. This module loads such a checkpoint folder and builds tiny random
ones offline for tests:

    >>> from latentprobe.model.subjects.text import build_text_tokenizer, build_text_model
    >>> tokenizer = build_text_tokenizer(("<|start-latent|>", "<|end-latent|>", "<|latent|>"))
    >>> build_text_model("gpt2", tokenizer).config.model_type
    'gpt2'
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ...errors import LatentProbeError
from ..backbones import TEXT_MODEL_TYPES, BACKBONES

TEXT_EOS = "<|endoftext|>"
TEXT_KINDS = ("gpt2", "qwen2", "llama", "qwen3")

_TEXT_CORPUS = [
    "Every wumpus is a yumpus. Every yumpus is a zumpus. Alex is a wumpus. Is Alex a zumpus or a rempus?",
    "Alex is a zumpus. Sally is a rempus. Every rempus is a gorpus. Is Sally a gorpus or a wumpus?",
    "a = 3. b = a + 2. c = b + 1. What is c? The answer is: 6 ### 6",
    "Tom has 4 apples and buys 3 more. How many apples does Tom have? <<4+3=7>> The answer is: 7",
    "x = 5. y = x + 4. z = y + 2. What is z? 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "The final answer is 12. Final answer: yes no A B C D",
]


def build_text_tokenizer(added_tokens: tuple[str, ...] = (), vocab_size: int = 400, special: bool = False):
    """A GPT-2-style byte-level BPE tokenizer trained offline: ``<|endoftext|>`` is bos, eos and unk, there is no
    pad token and no chat template (as GPT-2's). ``added_tokens`` are added afterwards, one call each, in order
    (as Coconut's run.py adds its three), as special tokens when ``special``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[TEXT_EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(_TEXT_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=TEXT_EOS, eos_token=TEXT_EOS,
                                        unk_token=TEXT_EOS, padding_side="left")
    for token in added_tokens:
        tokenizer.add_tokens(token, special_tokens=special)
    return tokenizer


def build_text_config(kind: str, vocab_size: int, eos_id: int, hidden_size: int = 64, num_layers: int = 2,
                      num_heads: int = 4):
    """A tiny config of one text backbone kind (random weights are built from it)."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config, Qwen3Config

    if kind == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers, n_head=num_heads,
                          n_positions=1024, bos_token_id=eos_id, eos_token_id=eos_id)
    classes = {"qwen2": Qwen2Config, "llama": LlamaConfig, "qwen3": Qwen3Config}
    if kind not in classes:
        raise LatentProbeError(f"unknown text backbone kind {kind!r}", f"use one of {', '.join(TEXT_KINDS)}")
    return classes[kind](vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=max(1, num_heads // 2), max_position_embeddings=1024,
                         bos_token_id=eos_id, eos_token_id=eos_id, tie_word_embeddings=False)


def build_text_model(kind: str, tokenizer, seed: int = 0, extra_rows: int = 0, **config_kwargs):
    """A random-weight tiny causal LM of ``kind`` in float32 (eager attention), deterministic for ``seed``."""
    from transformers import AutoModelForCausalLM

    config = build_text_config(kind, len(tokenizer) + extra_rows, tokenizer.convert_tokens_to_ids(TEXT_EOS),
                               **config_kwargs)
    config._attn_implementation = "eager"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # well-separated greedy choices, as in tiny.build_model
        model.get_output_embeddings().weight.mul_(8.0)
    return model.eval()


def read_model_type(folder: Path) -> str | None:
    """``model_type`` from a folder's config.json (None when unreadable: the loader then says why)."""
    try:
        return json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def load_text_checkpoint(folder: str, protocol: str | None = None, name: str | None = None,
                         prompt_style=None, answer_parser: str = "exact", attn_implementation: str | None = None,
                         torch_dtype: Any = None, add_tokens: tuple[str, ...] = (), add_special: bool = False,
                         **kwargs: Any):
    """Load a decoder-only causal LM folder (safetensors) as a text `Subject`.

    ``add_tokens`` are added to the tokenizer in order where it lacks them (CODI's ids are positions past the
    vocabulary; its family names them and adds them here); the ones added are in ``subject.added_tokens``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..protocol import get_protocol
    from ..subject import PromptStyle, Subject

    path = Path(folder)
    if not (path / "config.json").exists():
        raise LatentProbeError(f"{folder} has no config.json", "point at the folder holding config.json and weights")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (ValueError, OSError, KeyError) as exc:
        raise LatentProbeError(f"{folder}: transformers cannot read its config.json ({str(exc).splitlines()[0][:200]})",
                               "latentprobe never runs a checkpoint's own code (trust_remote_code=False)") from None
    if config.model_type not in TEXT_MODEL_TYPES and not (config.model_type in BACKBONES
                                                         and not BACKBONES[config.model_type].multimodal):
        raise LatentProbeError(f"{folder} holds a {config.model_type!r} model, not a supported text backbone",
                               f"text subjects are {', '.join(TEXT_MODEL_TYPES)} (or one registered with "
                               "latentprobe.model.backbones.register_backbone)")
    if not any(path.glob("*.safetensors")):
        raise LatentProbeError(f"{folder} has no .safetensors weights",
                               "convert the weights to safetensors; latentprobe never unpickles .bin files")
    _check_weights_are(path, config)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left", trust_remote_code=False)
    added = [token for token in add_tokens if token not in tokenizer.get_vocab()]
    for token in added:  # one call per token, in the authors' order, so the ids are the ones they got
        tokenizer.add_tokens(token, special_tokens=add_special)
    model = AutoModelForCausalLM.from_pretrained(
        path, use_safetensors=True, trust_remote_code=False, attn_implementation=attn_implementation or "eager",
        dtype=torch_dtype if torch_dtype is not None else torch.float32).eval()
    rows = model.get_input_embeddings().weight.shape[0]
    if added and max(tokenizer.convert_tokens_to_ids(added)) >= rows:
        raise LatentProbeError(f"{folder}: the tokenizer lacks {', '.join(added)} and the model has no embedding rows "
                               "for them", "this is not a checkpoint trained with these tokens; check the folder")
    proto = get_protocol(protocol) if protocol else None
    subject = Subject(name=name or path.name, model=model, tokenizer=tokenizer, image_processor=None,
                      protocol=proto, prompt_style=prompt_style or PromptStyle(plain=True),
                      answer_parser=answer_parser, checkpoint=str(path.resolve()), **kwargs)
    subject.added_tokens = added
    return subject


def _check_weights_are(path: Path, config) -> None:
    """The safetensors hold this architecture's input embedding at the config's shape: a config.json that names
    another model than its weights is refused before anything is built (a bare config would build a full-size
    random model)."""
    from safetensors import safe_open

    key = BACKBONES[config.model_type].embedding_key
    text = config.get_text_config()
    expected = (text.vocab_size, text.hidden_size)
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            names = set(handle.keys())
            found = key if key in names else key.split(".", 1)[1] if key.split(".", 1)[1] in names else None
            if found is not None:
                shape = tuple(handle.get_slice(found).get_shape())
                if shape[1] != expected[1] or shape[0] < expected[0]:
                    break
                return
    raise LatentProbeError(f"{path}: config.json says {config.model_type!r} (embedding {expected[0]} x {expected[1]}) but "
                           f"the weights are not that model's (no {key} of that shape)",
                           "point at a folder whose config.json and weights come from the same checkpoint")
