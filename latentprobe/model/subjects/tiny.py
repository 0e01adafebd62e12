"""A tiny Qwen2.5-VL built offline in about a second: the test subject and the organisms' skeleton.

Everything a real checkpoint folder has is built here from nothing: a byte-level BPE tokenizer trained on a
small corpus with Qwen's special tokens and every built-in protocol's latent tokens, the Qwen2-VL chat template,
an image processor, and a random-weight `Qwen2_5_VLForConditionalGeneration` (text hidden 64, 2 layers; vision
depth 2, hidden 32, patch 14, merge 2). `save_checkpoint` writes it as a Hugging Face folder, so the code path
that loads users' checkpoints is the one the tests exercise.
"""

from __future__ import annotations

from pathlib import Path

import torch

QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>")
# Markers around text-space imagination (the capimagine organism writes <imagine>...</imagine> before answering).
TEXT_MEDIATOR_TOKENS = ("<imagine>", "</imagine>")
VL_PROTOCOLS = ("monet", "lvr", "mirage", "ilvr")

# The Qwen2-VL chat template (as shipped with Qwen2.5-VL-7B-Instruct): a default system turn, images as
# <|vision_start|><|image_pad|><|vision_end|> placeholders that the encoder expands to one pad per merged patch.
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' and not (skip_default_system | default(false)) %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{% set image_count.value = image_count.value + 1 %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "You are a helpful assistant. You are a helpful multimodal assistant.",
    "What colour is the top-left cell after flipping the image horizontally? vertically rotate move",
    "Answer with the option's letter from the given choices directly. Options: A. red B. green C. blue D. yellow",
    "Put your final answer in \\boxed{}. The answer is \\boxed{A}. <answer>yes</answer> no",
    "Does the path reach the goal safely? start goal hole left right up down L R U D",
    "What is the sum of the two digits? Is the left digit larger than the right digit? 0 1 2 3 4 5 6 7 8 9 10",
    "top-left top-right bottom-left bottom-right square circle triangle colour shape count how many",
    "The image shows a red square and a blue circle. Imagine the image after the transformation.",
    "Which object is closer? Is the object on the left or right side of the image?",
]


def build_tokenizer(extra_special_tokens: tuple[str, ...] | None = None, vocab_size: int = 400):
    """Train a byte-level BPE tokenizer offline with Qwen's and the protocols' special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ..protocol import PROTOCOLS

    if extra_special_tokens is None:
        # The vision-language protocols' tokens only (ILVR's are Mirage's): the vocabulary, and so every tiny and
        # organism checkpoint built from it, stays the same when text-model protocols are registered.
        extra_special_tokens = tuple(tok for name in VL_PROTOCOLS for tok in PROTOCOLS[name].token_strings
                                     ) + TEXT_MEDIATOR_TOKENS
    specials = list(dict.fromkeys(QWEN_SPECIAL_TOKENS + tuple(extra_special_tokens)))
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        padding_side="left")
    tokenizer.chat_template = QWEN_VL_CHAT_TEMPLATE
    return tokenizer


def build_image_processor(min_pixels: int = 56 * 56, max_pixels: int = 112 * 112):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)


def build_config(tokenizer, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, vision_depth: int = 2,
                 vision_hidden: int = 32):
    from transformers import Qwen2_5_VLConfig

    head_dim = hidden_size // num_heads
    # mrope_section splits head_dim/2 rotary frequencies between temporal, height and width positions.
    half = head_dim // 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]
    vocab = tokenizer.get_vocab()
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=max(1, num_heads // 2),
            max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                           "mrope_section": mrope},
            tie_word_embeddings=False, pad_token_id=vocab["<|endoftext|>"], eos_token_id=vocab["<|im_end|>"],
            bos_token_id=None,
        ),
        vision_config=dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=vision_hidden * 2,
                           num_heads=2, out_hidden_size=hidden_size, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=56, fullatt_block_indexes=[vision_depth - 1]),
        image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config.pad_token_id = vocab["<|endoftext|>"]
    config.eos_token_id = vocab["<|im_end|>"]
    return config


def build_model(tokenizer, seed: int = 0, attn_implementation: str = "eager", **config_kwargs):
    """A random-weight tiny Qwen2.5-VL in float32, deterministic for ``seed``."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = build_config(tokenizer, **config_kwargs)
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    # Random init gives near-uniform logits; scale up the LM head so greedy choices are well separated
    # (ties between near-equal logits would make exact-token tests depend on float summation order).
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model.eval()


def save_checkpoint(folder: str | Path, seed: int = 0, **config_kwargs) -> Path:
    """Write a complete tiny checkpoint folder (weights as safetensors, tokenizer, processor config)."""
    folder = Path(folder)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=seed, **config_kwargs)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    build_image_processor().save_pretrained(folder)
    return folder
