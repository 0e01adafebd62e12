"""Save and load organisms: weights as safetensors, everything else (config, tokenizer, image processor,
training record) in one JSON file beside them. Loading never unpickles anything and needs no network."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import LatentProbeError
from ..fileio import atomic_write, atomic_write_json
from .recipes import OrganismRecipe, get_recipe

FORMAT_VERSION = 1
WEIGHTS_DIR = Path(__file__).parent / "weights"
_IMAGE_PROCESSOR_KEYS = ("min_pixels", "max_pixels", "patch_size", "merge_size", "temporal_patch_size",
                         "image_mean", "image_std")


def weights_dir() -> Path:
    """The folder holding the organisms shipped with the package."""
    return WEIGHTS_DIR


def shipped_organisms(folder: str | Path | None = None) -> list[str]:
    """Names of the organisms whose weights and JSON are present in ``folder`` (default: the package's)."""
    from .recipes import ORGANISMS

    folder = Path(folder) if folder is not None else WEIGHTS_DIR
    return [name for name in ORGANISMS
            if (folder / f"{name}.safetensors").exists() and (folder / f"{name}.json").exists()]


def save_organism(subject, recipe: OrganismRecipe, folder: str | Path, training: dict[str, Any] | None = None) -> Path:
    """Write ``<name>.safetensors`` and ``<name>.json`` into ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in subject.model.state_dict().items()}
    atomic_write(folder / f"{recipe.name}.safetensors",
                 lambda tmp: save_file(tensors, str(tmp), metadata={"organism": recipe.name,
                                                                    "format": str(FORMAT_VERSION)}))
    processor = subject.image_processor
    tokenizer = subject.tokenizer
    record = {
        "format": FORMAT_VERSION,
        "organism": recipe.name,
        "subject": recipe.subject_name,
        "summary": recipe.summary,
        "ground_truth": recipe.ground_truth,
        "protocol": recipe.protocol.describe() if recipe.protocol else None,
        "config": subject.model.config.to_dict(),
        "tokenizer": {"backend": json.loads(tokenizer.backend_tokenizer.to_str()),
                      "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token,
                      "chat_template": tokenizer.chat_template},
        "image_processor": {k: _plain(getattr(processor, k)) for k in _IMAGE_PROCESSOR_KEYS
                            if getattr(processor, k, None) is not None},
        "training": training or {},
    }
    atomic_write_json(folder / f"{recipe.name}.json", record)
    return folder


def update_metrics(folder: str | Path, name: str, **sections: Any) -> Path:
    """Merge ``sections`` (e.g. ``training=...``, ``ground_truth=...``) into ``folder/metrics.json`` under
    ``name``: the machine-readable record of what every shipped organism scored."""
    path = Path(folder) / "metrics.json"
    record = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    record.setdefault(name, {}).update(sections)
    atomic_write_json(path, record)
    return path


def read_metrics(folder: str | Path | None = None) -> dict[str, Any]:
    path = (Path(folder) if folder is not None else WEIGHTS_DIR) / "metrics.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [float(v) if isinstance(v, float) else v for v in value]
    return value


def read_record(name: str, folder: str | Path | None = None) -> dict[str, Any]:
    """The JSON record of a saved organism."""
    recipe = get_recipe(name)
    folder = Path(folder) if folder is not None else WEIGHTS_DIR
    path = folder / f"{recipe.name}.json"
    if not path.exists():
        raise LatentProbeError(f"no saved organism {recipe.name!r} in {folder}",
                               f"train it with latentprobe.organisms.train_organism({recipe.name!r}, out_dir=...)")
    return json.loads(path.read_text(encoding="utf-8"))


def load_organism(name: str, folder: str | Path | None = None, attn_implementation: str = "eager", **_: Any):
    """Rebuild a saved organism offline and return it as a `Subject` (weights read with safetensors only).

    >>> subject = load_organism("bottleneck")
    >>> subject.name, subject.protocol.answer_mask
    ('organism-bottleneck', 'answer_blind_to_image')
    """
    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from .architecture import build_subject

    recipe = get_recipe(name)
    folder = Path(folder) if folder is not None else WEIGHTS_DIR
    record = read_record(recipe.name, folder)
    if record.get("format") != FORMAT_VERSION:
        raise LatentProbeError(f"{folder / (recipe.name + '.json')} has format {record.get('format')}, "
                               f"this latentprobe reads format {FORMAT_VERSION}", "retrain or upgrade latentprobe")
    tok = record["tokenizer"]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(tok["backend"])),
                                        eos_token=tok["eos_token"], pad_token=tok["pad_token"], padding_side="left")
    tokenizer.chat_template = tok["chat_template"]
    config = Qwen2_5_VLConfig.from_dict(record["config"])
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng():  # the random init is overwritten; do not disturb the caller's generator
        model = Qwen2_5_VLForConditionalGeneration(config)
    state = load_file(str(folder / f"{recipe.name}.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise LatentProbeError(f"organism {recipe.name}: weights do not match the config "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})",
                               "the .safetensors and .json files are from different trainings; retrain")
    model.eval()
    processor = Qwen2VLImageProcessorPil(**record["image_processor"])
    return build_subject(recipe, model, tokenizer, processor, checkpoint=str((folder / recipe.name).resolve()))
