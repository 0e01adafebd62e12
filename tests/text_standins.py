"""Stand-in checkpoints for the text latent-CoT families (Coconut, CODI) and a scripted-output helper for them.

A stand-in is a tiny random GPT-2 (or Qwen2) folder saved the way the family's checkpoint reaches latentprobe: the
base model's tokenizer, without the family's tokens (both families add them when they load: Coconut's run.py
``add_tokens`` start, end, latent; CODI's ``[PAD]`` then its bot/eot ids at the end of the resized vocabulary),
safetensors weights with an embedding row for each of them, and CODI's ``prj.*`` projection tensors beside the
model's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from latentprobe.model.subjects.text import build_text_model, build_text_tokenizer

TEXT_FAMILY_TOKENS = {
    "coconut": ("<|start-latent|>", "<|end-latent|>", "<|latent|>"),
    "codi": ("[PAD]", "<|codi_bot|>", "<|codi_eot|>"),
}
TEXT_FAMILIES = tuple(TEXT_FAMILY_TOKENS)
TEXT_SCRIPTS = {"coconut": "### 7", "codi": "The answer is: 7"}


def build_text_standin(family: str, folder: str | Path, kind: str = "gpt2", seed: int = 0,
                       with_head: bool = True) -> Path:
    """Write a text family's stand-in folder and return it."""
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    tokenizer = build_text_tokenizer()
    model = build_text_model(kind, tokenizer, seed=seed, extra_rows=len(TEXT_FAMILY_TOKENS[family]))
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    if family == "codi" and with_head:
        from latentprobe.model.subjects.codi_head import build_codi_head

        dim = model.config.get_text_config().hidden_size
        with torch.random.fork_rng():
            torch.manual_seed(seed + 1)
            head = build_codi_head(dim, 2 * dim)
        path = folder / "model.safetensors"
        weights = load_file(str(path))
        weights.update({f"prj.{key}": value.contiguous() for key, value in head.state_dict().items()})
        save_file(weights, str(path), metadata={"format": "pt"})
    return folder
