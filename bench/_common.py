"""Shared pieces of the latentprobe benchmarks: model sizes, subject building, interleaved timing, results.

Nothing here is imported by the package or the tests. Speed is always reported as a ratio of variants timed
side by side in one process (repetitions interleaved in rotating order, medians taken), never as an absolute
target: absolute times on a shared CPU mean little, ratios measured together mean something.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from latentprobe.data import Instance  # noqa: E402
from latentprobe.model.subject import PromptStyle, Subject  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Text and vision shapes per named size. "7b" is Qwen2.5-VL-7B-Instruct's config.json (transformers'
# Qwen2_5_VLConfig() defaults are the 72B text model with a 3584-wide vision tower, so they are not used here).
SIZES: dict[str, dict] = {
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vision_depth=2, vision_hidden=32,
                 vision_heads=2, vision_intermediate=64, vocab=None, rope_theta=10000.0, window=56),
    # the default: a "realistic-ish" model that still runs on two CPU cores in seconds per decode
    "small": dict(hidden=512, layers=6, heads=8, kv_heads=2, intermediate=1536, vision_depth=4, vision_hidden=64,
                  vision_heads=2, vision_intermediate=128, vocab=16384, rope_theta=10000.0, window=112),
    "7b": dict(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vision_depth=32, vision_hidden=1280,
               vision_heads=16, vision_intermediate=3420, vocab=152064, rope_theta=1000000.0, window=112),
}
SIZE_FLAGS = ("hidden", "layers", "heads", "kv_heads", "intermediate", "vision_depth", "vision_hidden", "vocab")


def add_budget(parser: argparse.ArgumentParser, cpu_seconds: float) -> None:
    parser.add_argument("--budget", type=float, default=None,
                        help=f"seconds of timed repetitions per section (default {cpu_seconds:g} on CPU, none on GPU)")


def parse_checked(parser: argparse.ArgumentParser, cpu_seconds: float):
    """Parse, refuse a 7b model on CPU, and resolve the timing budget: (args, on_cpu, budget seconds or None)."""
    args = parser.parse_args()
    if args.size == "7b" and args.device == "cpu":
        parser.error("--size 7b is for GPU runs (--device cuda --dtype bfloat16)")
    on_cpu = str(args.device) == "cpu"
    budget = args.budget if args.budget is not None else (cpu_seconds if on_cpu else None)
    return args, on_cpu, budget


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small",
                        help="model shape; 7b is Qwen2.5-VL-7B-shaped (GPU only)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--attn", default="sdpa", choices=["eager", "sdpa"], help="attention implementation")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per variant (interleaved)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock", choices=["wall", "cpu"], default=None,
                        help="what to time: wall time, or this process's CPU time (default: cpu on a CPU device "
                             "with one thread, which leaves out the time other jobs hold a shared core; else wall)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads; default 1 on CPU (on a shared machine, OpenMP threads that spin "
                             "waiting for a busy core make multi-threaded small matmuls 10-100x slower and the "
                             "timings meaningless); 0 = torch's default")
    parser.add_argument("--out", default=None,
                        help="results JSON path (default bench/results/<script>-<device>-<size>.json)")
    for flag in SIZE_FLAGS:
        parser.add_argument(f"--{flag.replace('_', '-')}", type=int, default=None, help=f"override the size's {flag}")
    return parser


def resolve_shape(args) -> dict:
    shape = dict(SIZES[args.size])
    for flag in SIZE_FLAGS:
        value = getattr(args, flag)
        if value is not None:
            shape[flag] = value
    return shape


def resolve_dtype(args) -> torch.dtype:
    name = args.dtype or ("bfloat16" if str(args.device).startswith("cuda") else "float32")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def build_config(tokenizer, shape: dict):
    """A Qwen2.5-VL config of the given shape around the tiny subject's tokenizer (as `subjects.tiny`)."""
    from transformers import Qwen2_5_VLConfig

    vocab = tokenizer.get_vocab()
    vocab_size = max(len(vocab), shape["vocab"] or 0)
    head_dim = shape["hidden"] // shape["heads"]
    half = head_dim // 2
    mrope = [16, 24, 24] if head_dim == 128 else [half - 2 * (half // 3), half // 3, half // 3]
    depth = shape["vision_depth"]
    full = [i for i in (7, 15, 23, 31) if i < depth] if depth >= 8 else [depth - 1]
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
            num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
            num_key_value_heads=shape["kv_heads"], max_position_embeddings=32768, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": shape["rope_theta"], "mrope_section": mrope},
            tie_word_embeddings=False, pad_token_id=vocab["<|endoftext|>"], eos_token_id=vocab["<|im_end|>"],
            bos_token_id=None),
        vision_config=dict(depth=depth, hidden_size=shape["vision_hidden"],
                           intermediate_size=shape["vision_intermediate"], num_heads=shape["vision_heads"],
                           out_hidden_size=shape["hidden"], patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=shape["window"], fullatt_block_indexes=full),
        image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"],
        tie_word_embeddings=False)
    config.pad_token_id = vocab["<|endoftext|>"]
    config.eos_token_id = vocab["<|im_end|>"]
    return config


def build_model(tokenizer, shape: dict, device, dtype, seed: int, attn: str):
    """Random weights built directly on ``device`` in ``dtype`` (a 7B model is never materialised on the CPU)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = build_config(tokenizer, shape)
    config._attn_implementation = attn
    previous = torch.get_default_dtype()
    torch.manual_seed(seed)
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():  # as the tiny subject: separate greedy choices (random init gives near-flat logits)
        model.lm_head.weight.mul_(8.0)
    return model.eval()


@dataclass
class BenchSubject(Subject):
    """A Subject whose stop ids can be replaced by one no argmax can produce, so every row decodes exactly
    ``max_new_tokens`` positions and variants compare equal amounts of work."""

    eos_override: tuple | None = None

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_override is not None:
            return list(self.eos_override)
        return Subject.eos_token_ids.fget(self)


def set_threads(args):
    threads = args.threads
    if threads is None:
        threads = 1 if str(args.device) == "cpu" else 0
    if threads > 0:
        torch.set_num_threads(threads)


def quiet_transformers():
    from transformers.utils import logging

    logging.set_verbosity_error()
    import warnings

    warnings.filterwarnings("ignore")


def build_subject(args, protocol=None, force_start=True, max_pixels=448 * 448, never_stop=True):
    """Tokenizer, image processor and model for ``args`` wrapped as a subject (protocol: a LatentProtocol)."""
    from latentprobe.model.subjects import tiny

    set_threads(args)
    shape = resolve_shape(args)
    tokenizer = tiny.build_tokenizer()
    model = build_model(tokenizer, shape, args.device, resolve_dtype(args), args.seed, args.attn)
    vocab_size = model.config.text_config.vocab_size
    subject = BenchSubject(
        name=f"bench-{args.size}", model=model, tokenizer=tokenizer,
        image_processor=tiny.build_image_processor(min_pixels=56 * 56, max_pixels=max_pixels), protocol=protocol,
        prompt_style=PromptStyle(force_latent_start=force_start and protocol is not None), max_new_tokens=16,
        eos_override=(vocab_size,) if never_stop else None)  # id V: outside the logits, never chosen
    return subject, shape


def with_protocol(subject: BenchSubject, protocol, force_start: bool = True) -> BenchSubject:
    """The same model and tokenizer under another protocol (None: a plain model that never enters latent mode)."""
    return BenchSubject(name=subject.name, model=subject.model, tokenizer=subject.tokenizer,
                        image_processor=subject.image_processor, protocol=protocol,
                        prompt_style=PromptStyle(force_latent_start=force_start and protocol is not None),
                        max_new_tokens=subject.max_new_tokens, eos_override=subject.eos_override)


def random_images(sizes, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)) for h, w in sizes]


def instances_with_images(image_sizes: list[list[tuple[int, int]]], seed=0):
    """One instance per row with in-memory random images; questions of different lengths (left padding)."""
    words = "What colour is the square in the top-left cell after flipping the image horizontally".split()
    instances, images = [], []
    for i, sizes in enumerate(image_sizes):
        question = " ".join(words[: 4 + (3 * i) % (len(words) - 4)]) + "?"
        instances.append(Instance(id=f"b{i}", question=question, answer="red",
                                  options=["red", "green", "blue", "yellow"]))
        images.append(random_images(sizes, seed=seed + i))
    return instances, images


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(variants: dict[str, Callable[[], object]], reps: int, device, warmup: int = 1,
                     budget_s: float | None = None, clock: str = "wall") -> dict[str, list[float]]:
    """Time each variant ``reps`` times, interleaved in rotating order so drift (other jobs on the machine,
    thermal state) hits every variant alike; stops early, with at least 3 reps, past ``budget_s`` of wall time.

    ``clock="cpu"`` measures this process's CPU time instead of wall time: on a shared CPU the time other
    processes hold the cores is then not counted (meaningful only on the CPU device with one thread).

    A variant may time parts of itself: if it returns a dict {part: seconds} (measured with `timer(clock)` and
    `sync`), each part is recorded as "name/part" next to the whole call's time."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    timer = time.process_time if clock == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    for rep in range(reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            sync(device)
            t0 = timer()
            parts = variants[name]()
            sync(device)
            times[name].append(timer() - t0)
            if isinstance(parts, dict):
                for part, seconds in parts.items():
                    times.setdefault(f"{name}/{part}", []).append(seconds)
        if budget_s is not None and rep >= 2 and time.perf_counter() - start > budget_s:
            break
    return times


def timer(clock: str):
    return time.process_time if clock == "cpu" else time.perf_counter


def resolve_clock(args) -> str:
    if args.clock:
        return args.clock
    return "cpu" if str(args.device) == "cpu" and torch.get_num_threads() == 1 else "wall"


def median(values):
    return statistics.median(values)


def paired_spread(numer: list[float], denom: list[float]) -> float:
    """Half the interquartile range of the per-repetition ratios numer[i] / denom[i] (variants of one repetition
    ran back to back): a noise estimate to read next to the ratio of medians."""
    ratios = sorted(n / d for n, d in zip(numer, denom))
    if len(ratios) < 4:
        return (ratios[-1] - ratios[0]) / 2
    q = statistics.quantiles(ratios, n=4)
    return (q[2] - q[0]) / 2


def machine_info(device) -> dict:
    import transformers

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "cpu": _cpu_model()}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        info["gpu"] = torch.cuda.get_device_name(index)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def print_table(title: str, rows: list[dict], columns: list[str]):
    print(f"\n{title}")
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def write_results(script: str, args, shape: dict, payload: dict) -> Path:
    device_name = str(args.device).replace(":", "")
    path = Path(args.out) if args.out else RESULTS_DIR / f"{script}-{device_name}-{args.size}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"script": script, "size": args.size, "clock": resolve_clock(args), "shape": shape,
              "device": str(args.device),
              "dtype": str(resolve_dtype(args)).replace("torch.", ""), "attn": args.attn,
              "machine": machine_info(args.device), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "argv": sys.argv[1:], **payload}
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"\nwrote {path}")
    return path
