"""Subjects by name: the built-in `tiny` test subject, the trained organisms, the real model families,
and any local Hugging Face checkpoint folder loaded with a named protocol.

    >>> from latentprobe.model.subjects import load_subject, SUBJECTS
    >>> subject = load_subject("tiny")          # random weights, built offline
    >>> subject.protocol.name
    'lvr'
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ...errors import LatentProbeError
from ..protocol import get_protocol
from ..subject import PromptStyle, Subject


@dataclass(frozen=True)
class SubjectSpec:
    """A named subject: how to build or load it, in one line of the `latentprobe subjects` table."""

    name: str
    summary: str
    build: Callable[..., Subject]
    needs_checkpoint: bool = False
    protocol_name: str | None = None
    # (limit, split) -> (instances, source label): the data the subject runs on when none is given (an organism's
    # own held-out split); None means the built-in images
    default_data: Callable[..., tuple[list, str]] | None = None

    def default_instances(self, limit: int | None = None, split: str = "test") -> tuple[list, str]:
        """(instances, source label) this subject runs on when no data is given."""
        if self.default_data is not None:
            return self.default_data(limit=limit, split=split)
        from ...data.loading import load_instances

        # a text-only family (Coconut, CODI) reads the built-in text set, every other subject the built-in images
        return load_instances("builtin-text" if getattr(self, "backbone", None) == "text" else None, limit=limit)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "summary": self.summary, "protocol": self.protocol_name,
                "needs_checkpoint": self.needs_checkpoint}


def _build_tiny(checkpoint: str | None = None, protocol: str | None = "lvr", seed: int = 0, **_) -> Subject:
    from . import tiny

    if checkpoint:
        return load_checkpoint(checkpoint, protocol=protocol, name="tiny")
    tokenizer = tiny.build_tokenizer()
    model = tiny.build_model(tokenizer, seed=seed)
    proto = get_protocol(protocol) if protocol else None
    return Subject(name="tiny", model=model, tokenizer=tokenizer, image_processor=tiny.build_image_processor(),
                   protocol=proto, prompt_style=PromptStyle(force_latent_start=proto is not None),
                   answer_parser="letter", checkpoint=f"tiny-random(seed={seed})", max_new_tokens=12,
                   description="random-weight tiny Qwen2.5-VL (hidden 64, 2 layers) for tests; answers are noise")


SUBJECTS: dict[str, SubjectSpec] = {
    "tiny": SubjectSpec("tiny", "random-weight tiny Qwen2.5-VL with every protocol's latent tokens (tests)", _build_tiny,
                        protocol_name="lvr"),
}


def did_you_mean(name: str) -> str:
    """" (did you mean organism-lvr?)" for the registered subject closest to a mistyped ``name``, else ""."""
    import difflib

    _register_builtin_families()
    close = difflib.get_close_matches(str(name), list(SUBJECTS), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def register(spec: SubjectSpec) -> None:
    """Add a subject to the registry; a name can be taken once (an organism must not shadow a real family)."""
    if spec.name in SUBJECTS and SUBJECTS[spec.name] is not spec:
        raise LatentProbeError(f"a subject named {spec.name!r} is already registered",
                               "give the new subject another name (organisms are named organism-<name>)")
    SUBJECTS[spec.name] = spec


def unregister(name: str) -> None:
    """Remove a subject from the registry (tests and notebooks that declare a family for a while)."""
    SUBJECTS.pop(name, None)


def load_subject(name_or_path: str, protocol: str | None = None, device: str | None = None,
                 dtype: str | None = None, mediator_markers: Any = None, **kwargs: Any) -> Subject:
    """Load a subject by registered name, or a local checkpoint folder (with ``protocol`` naming its family).

    ``mediator_markers`` ("OPEN,CLOSE" or a pair) replaces a text-mediator subject's imagination markers."""
    _register_builtin_families()
    markers = None
    if mediator_markers is not None:
        from ..subject import validate_markers

        markers = validate_markers(mediator_markers, "--mediator-markers")
    if name_or_path in SUBJECTS:
        spec = SUBJECTS[name_or_path]
        if protocol is not None:
            kwargs["protocol"] = protocol
        subject = spec.build(**kwargs)
    elif _looks_like_hub_id(name_or_path):
        subject = load_checkpoint(download_checkpoint(name_or_path), protocol=protocol, **kwargs)
    elif _looks_like_path(name_or_path):
        if is_text_subject(name_or_path):  # a decoder-only causal LM folder (GPT-2, Llama, Qwen2, Qwen3)
            from .text import load_text_checkpoint

            subject = load_text_checkpoint(name_or_path, protocol=protocol, **kwargs)
        else:
            subject = load_checkpoint(name_or_path, protocol=protocol, **kwargs)
    else:
        raise LatentProbeError(f"unknown subject {name_or_path!r}{did_you_mean(name_or_path)}",
                               f"choose one of {', '.join(sorted(SUBJECTS))}, a checkpoint folder or a hub id")
    if markers is not None:
        if subject.mediator != "text":
            raise LatentProbeError(f"--mediator-markers: subject {subject.name} has no text mediator",
                                   "mediator markers apply to text-imagination subjects such as capimagine")
        subject.text_mediator_markers = markers
    if device is not None and str(device).startswith("cuda") and dtype is None:
        dtype = "bfloat16"  # on a GPU, bf16 unless asked otherwise
    if device == "auto":  # spread a model larger than one GPU over all of them
        return subject
    if device is not None or dtype is not None:
        subject.model.to(device=device, dtype=_dtype(dtype))
    return subject


def load_checkpoint(folder: str, protocol: str | None = None, name: str | None = None,
                    prompt_style: PromptStyle | None = None, answer_parser: str = "letter",
                    attn_implementation: str | None = None, torch_dtype: Any = None,
                    add_tokens: tuple[str, ...] = (), image_pixels: tuple[int, int] | None = None,
                    **kwargs: Any) -> Subject:
    """Load a Qwen2.5-VL checkpoint folder with safetensors weights and wrap it as a Subject.

    ``add_tokens``: tokens to add to the tokenizer, in order, where it lacks them (as Mirage's inference does
    after loading); the ones added are listed in ``subject.added_tokens``. ``image_pixels``: the (min, max) pixel
    budget of the image processor (Monet's 256-8192 x 28 x 28), overriding the checkpoint's."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    path = Path(folder)
    if not path.exists():
        from ...fileio import why_missing

        raise LatentProbeError(f"checkpoint folder {folder} {why_missing(path)}",
                               "pass an existing folder, or a subject name from `latentprobe subjects`")
    if not (path / "config.json").exists():
        raise LatentProbeError(f"{folder} has no config.json", "point at the folder holding config.json and weights")
    import json as _json

    try:
        _json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise LatentProbeError(f"{path / 'config.json'} is not valid JSON ({exc})",
                               "restore the checkpoint's config.json") from None
    try:
        # Never run code shipped with a checkpoint (and never prompt for it): Qwen2.5-VL is built into transformers.
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (ValueError, OSError, KeyError) as exc:
        raise LatentProbeError(f"{folder}: transformers cannot read its config.json ({str(exc).splitlines()[0][:200]})",
                               "latentprobe loads Qwen2.5-VL checkpoints only, and never runs a checkpoint's own "
                               "code (trust_remote_code=False)") from None
    if getattr(config, "model_type", None) not in ("qwen2_5_vl",):
        raise LatentProbeError(f"{folder} holds a {config.model_type!r} model, not Qwen2.5-VL",
                               "latentprobe's subjects are Qwen2.5-VL fine-tunes; check the folder")
    if not any(path.glob("*.safetensors")):
        raise LatentProbeError(f"{folder} has no .safetensors weights",
                               "convert the weights to safetensors; latentprobe never unpickles .bin files")
    tokenizer = _load_tokenizer(path)
    added = [token for token in add_tokens if token not in tokenizer.get_vocab()]
    for token in added:  # one call per token, in the authors' order, so the ids are the ones they got
        tokenizer.add_tokens(token, special_tokens=True)
    extra = {"device_map": "auto"} if kwargs.pop("device_map", None) == "auto" else {}
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, use_safetensors=True, trust_remote_code=False, attn_implementation=attn_implementation or "eager",
        dtype=torch_dtype if torch_dtype is not None else torch.float32, **extra).eval()
    if added and max(tokenizer.convert_tokens_to_ids(added)) >= model.get_input_embeddings().weight.shape[0]:
        raise LatentProbeError(f"{folder}: the tokenizer lacks {', '.join(added)} and the model has no embedding rows "
                               "for them", "this is not a checkpoint trained with these tokens; check the folder")
    image_processor = _load_image_processor(path, image_pixels)
    proto = get_protocol(protocol) if protocol else None
    subject = Subject(name=name or path.name, model=model, tokenizer=tokenizer, image_processor=image_processor,
                      protocol=proto, prompt_style=prompt_style or PromptStyle(force_latent_start=False),
                      answer_parser=answer_parser, checkpoint=str(path.resolve()), **kwargs)
    subject.added_tokens = added
    return subject


def _load_image_processor(path: Path, image_pixels: tuple[int, int] | None = None):
    # The video processor needs torchvision, which has no CPU build here; the PIL image processor does not.
    import json

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    cfg_file = path / "preprocessor_config.json"
    if cfg_file.exists():
        cfg = json.loads(cfg_file.read_text())
        size = cfg.get("size") or {}
        kwargs = {k: cfg[k] for k in ("patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std")
                  if k in cfg}
        min_pixels = cfg.get("min_pixels", size.get("shortest_edge"))
        max_pixels = cfg.get("max_pixels", size.get("longest_edge"))
        if min_pixels:
            kwargs["min_pixels"] = min_pixels
        if max_pixels:
            kwargs["max_pixels"] = max_pixels
    else:
        kwargs = {}
    if image_pixels is not None:
        kwargs["min_pixels"], kwargs["max_pixels"] = image_pixels
    return Qwen2VLImageProcessorPil(**kwargs)


def is_text_subject(name_or_path: str | None) -> bool:
    """Whether a subject name (a text family such as coconut or codi) or checkpoint folder (a registered text
    backbone's model_type) is a text-only model, known without loading it: its default data is the text set."""
    if not name_or_path:
        return False
    _register_builtin_families()
    spec = SUBJECTS.get(name_or_path)
    if spec is not None:
        return getattr(spec, "backbone", "qwen2_5_vl") == "text"
    if Path(name_or_path).is_dir():
        from ..backbones import BACKBONES
        from .text import read_model_type

        model_type = read_model_type(Path(name_or_path))
        return model_type in BACKBONES and not BACKBONES[model_type].multimodal
    return False


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.startswith(".") or Path(value).exists()


def _looks_like_hub_id(value: str) -> bool:
    import re

    return not Path(value).exists() and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", value) is not None


def download_checkpoint(repo_id: str) -> str:
    """Fetch a hub checkpoint's safetensors weights, configs and tokenizer (never pickled weights)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise LatentProbeError(f"{repo_id!r} is a hub id and the hub is offline (HF_HUB_OFFLINE=1)",
                               "download the checkpoint elsewhere and pass its local folder (--subject PATH)")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"])
    except Exception as exc:  # network, auth, missing repo: all end the same way for the user
        raise LatentProbeError(f"could not download {repo_id!r} from the hub ({type(exc).__name__}: {exc})",
                               "check the id and your network, or pass a local checkpoint folder") from exc


def _dtype(name):
    import torch

    return {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# Modules that register subjects when first needed. The real families live beside this registry; the organisms sit
# a stage above the model (they train with the runs' machinery), so they are named here, not imported: the model
# layer never imports upward, and the organisms add themselves the way a plugin would.
SUBJECT_PROVIDERS = ("latentprobe.model.subjects.families", "latentprobe.organisms.subjects")


def _register_builtin_families():
    """Model families and organisms register themselves on first use (their modules import heavier code)."""
    from importlib import import_module

    for module in SUBJECT_PROVIDERS:
        try:
            import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    # Your own families: LATENTPROBE_FAMILIES names importable modules (comma-separated) that declare them
    # (`families.register_family`), so every command finds them by name.
    for module in filter(None, (m.strip() for m in os.environ.get("LATENTPROBE_FAMILIES", "").split(","))):
        try:
            import_module(module)
        except ImportError as exc:
            raise LatentProbeError(f"LATENTPROBE_FAMILIES names {module!r}, which cannot be imported ({exc})",
                                   "put the module on PYTHONPATH, or fix the name") from None


def _load_tokenizer(path: Path):
    """The checkpoint's tokenizer, never running its own code; a tokenizer transformers cannot build without that
    code (or without a tokenizer.json) is one line naming the file and the fix, not a traceback."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, padding_side="left", trust_remote_code=False)
    except Exception as exc:  # ValueError, OSError, ImportError... transformers' error types vary by version
        config = path / "tokenizer_config.json"
        named = ""
        try:
            import json as _json

            settings = _json.loads(config.read_text(encoding="utf-8")) if config.exists() else {}
            if isinstance(settings, dict) and (settings.get("auto_map") or settings.get("tokenizer_class")):
                named = (f" (it names {'remote code in auto_map' if settings.get('auto_map') else 'the class'} "
                         f"{settings.get('tokenizer_class') or settings.get('auto_map')})")
        except (OSError, ValueError):
            pass
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise LatentProbeError(f"{config}{named}: transformers cannot build this tokenizer without running the "
                               f"checkpoint's own code or converting a slow tokenizer ({type(exc).__name__}: {first})",
                               "add the model's tokenizer.json (the fast tokenizer file) to the folder, or set "
                               "tokenizer_class to Qwen2Tokenizer in tokenizer_config.json; latentprobe never runs "
                               "a checkpoint's code") from None
