"""Instances: one question each, read from JSONL (image paths relative to the file).

JSONL schema, one object per line::

    {"id": "q1", "image": "imgs/q1.png",            # or "images": [...]; may be absent
     "question": "What colour is the square?",
     "options": ["red", "green", "blue"],          # optional; letters A, B, C... are implied
     "answer": "red",                               # gold answer (an option text or its letter)
     "attributes": {"colour": "red", "count": 3},  # optional ground truth for probes
     "aux_images": ["imgs/q1_aux.png"],             # optional: the image the model should imagine
     "split": "test", "task": "shapes"}             # optional
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..errors import InstanceError, LatentProbeError

REQUIRED_FIELDS = ("id", "question", "answer")


@dataclass
class Instance:
    """One question about zero or more images, with its gold answer and known attributes."""

    id: str
    question: str
    answer: str
    images: list[str] = field(default_factory=list)
    options: list[str] | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    aux_images: list[str] = field(default_factory=list)
    split: str | None = None
    task: str | None = None

    @property
    def option_letters(self) -> list[str]:
        return [chr(ord("A") + i) for i in range(len(self.options or []))]

    @property
    def gold_letter(self) -> str | None:
        """The gold answer as an option letter, when the instance has options."""
        if not self.options:
            return None
        if self.answer in self.options:
            return self.option_letters[self.options.index(self.answer)]
        if len(self.answer) == 1 and self.answer.upper() in self.option_letters:
            return self.answer.upper()
        return None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, [], {})}


def check_options(instance: Instance, where: str = "") -> Instance:
    """Refuse a multiple-choice instance whose gold answer is none of its options (it would be scored wrong on
    every run and counted into accuracy and the chance level), or whose options repeat (two letters, one answer).

    >>> check_options(Instance(id="q", question="?", answer="red", options=["red", "blue"])).gold_letter
    'A'
    """
    if not instance.options:
        return instance
    where = where or f"instance {instance.id!r}"
    seen: dict[str, int] = {}
    for i, option in enumerate(instance.options):
        key = " ".join(option.split()).casefold()
        if key in seen:
            raise LatentProbeError(f"{where}: options {chr(65 + seen[key])} and {chr(65 + i)} are the same "
                                   f"({option!r}), so an answer cannot be told apart",
                                   "make the options distinct (or drop the row)")
        seen[key] = i
    if instance.gold_letter is None:
        raise LatentProbeError(f"{where}: the answer {instance.answer!r} is not among the options "
                               f"{instance.options!r} (nor one of their letters {', '.join(instance.option_letters)})",
                               "write the answer as one option's exact text or its letter (or drop the row)")
    return instance


def instance_from_dict(row: dict[str, Any], base_dir: Path | None = None, where: str = "") -> Instance:
    """Validate one JSONL object and resolve its image paths against ``base_dir``."""
    if not isinstance(row, dict):
        raise LatentProbeError(f"{where}: expected a JSON object, got {type(row).__name__}",
                               "write one JSON object per line")
    missing = [name for name in REQUIRED_FIELDS if row.get(name) in (None, "")]
    if missing:
        raise LatentProbeError(f"{where}: missing required field(s) {', '.join(missing)}",
                               f"every row needs {', '.join(REQUIRED_FIELDS)} (see latentprobe.data docs)")
    images = _path_list(row.get("images", row.get("image", [])), "images", where)
    aux = _path_list(row.get("aux_images", row.get("aux_image", [])), "aux_images", where)
    for name in ("id", "question", "answer"):
        if not isinstance(row[name], (str, int, float)) or isinstance(row[name], bool):
            raise LatentProbeError(f"{where}: {name!r} must be a string, got {type(row[name]).__name__}",
                                   f"write {name} as a JSON string")
    attributes = row.get("attributes") or {}
    if not isinstance(attributes, dict):
        raise LatentProbeError(f"{where}: 'attributes' must be a JSON object, got {type(attributes).__name__}",
                               'write e.g. "attributes": {"colour": "red"}')
    for name in ("split", "task"):
        if row.get(name) is not None and not isinstance(row[name], str):
            raise LatentProbeError(f"{where}: {name!r} must be a string, got {type(row[name]).__name__}",
                                   f"write {name} as a JSON string")

    def resolve(p: str) -> str:
        path = Path(p)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        return str(path)

    options = row.get("options")
    if options is not None and (not isinstance(options, list) or not all(isinstance(o, str) for o in options)):
        raise LatentProbeError(f"{where}: 'options' must be a list of strings", "fix the row's options")
    return check_options(Instance(
        id=str(row["id"]),
        question=str(row["question"]),
        answer=str(row["answer"]),
        images=[resolve(p) for p in images],
        options=options,
        attributes=dict(attributes),
        aux_images=[resolve(p) for p in aux],
        split=row.get("split"),
        task=row.get("task"),
    ), where)


def _path_list(value, name: str, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise LatentProbeError(f"{where}: {name!r} must be a path or a list of paths, got {json.dumps(value)[:60]}",
                           f'write e.g. "{name}": ["imgs/q1.png"]')


def load_jsonl(path: str | Path, limit: int | None = None, split: str | None = None) -> list[Instance]:
    """Read instances from a JSONL file; image paths are relative to the file's folder."""
    path = Path(path)
    if not path.exists():
        from ..fileio import why_missing

        raise LatentProbeError(f"data file {path} {why_missing(path)}",
                               "pass --data with a JSONL file or a benchmark folder")
    instances: list[Instance] = []
    seen: set[str] = set()
    raw = path.read_bytes()
    if b"\x00" in raw[:65536]:
        raise LatentProbeError(f"data file {path} is binary, not JSONL text", "pass a UTF-8 JSONL file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_no = raw[:exc.start].count(b"\n") + 1
        raise LatentProbeError(f"{path}:{line_no}: not UTF-8 text ({exc.reason})",
                               "save the data file as UTF-8 JSONL") from None
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LatentProbeError(f"{where}: not valid JSON ({exc.msg})", "fix or remove that line") from exc
        instance = instance_from_dict(row, path.parent, where)
        if instance.id in seen:
            raise LatentProbeError(f"{where}: duplicate id {instance.id!r}", "give every instance a unique id")
        seen.add(instance.id)
        if split is None or instance.split == split:
            instances.append(instance)
        if limit is not None and len(instances) >= limit:
            break
    if not instances:
        raise LatentProbeError(f"data file {path} holds no instances" + (f" in split {split!r}" if split else ""),
                               "check the file (and --split) or use the built-in data by omitting --data")
    return instances


def write_jsonl(instances: Iterable[Instance], path: str | Path) -> Path:
    """Write instances as JSONL, image paths made relative to the file's folder where possible."""
    from ..fileio import atomic_write_text

    path = Path(path)
    lines = []
    for inst in instances:
        row = inst.to_json()
        for key in ("images", "aux_images"):
            if key in row:
                row[key] = [_relative(p, path.parent) for p in row[key]]
        lines.append(json.dumps(row, sort_keys=True))
    return atomic_write_text(path, "\n".join(lines) + "\n")


def _relative(p: str, base: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(base.resolve()))
    except ValueError:
        return p


def load_images(instance: Instance, which: str = "images"):
    """Open an instance's images as RGB PIL images; a missing or broken file is an InstanceError."""
    from PIL import Image

    opened = []
    for p in getattr(instance, which):
        try:
            with Image.open(p) as img:
                opened.append(to_rgb(img, p))
        except InstanceError as exc:
            raise InstanceError(f"instance {instance.id}: {exc.problem}", exc.fix) from None
        except FileNotFoundError as exc:
            raise InstanceError(f"instance {instance.id}: image {p} not found", "fix the path in the data file") from exc
        except Image.DecompressionBombError as exc:
            raise InstanceError(f"instance {instance.id}: image {p} is too large to decode safely ({exc})",
                                "downscale the image (PIL's MAX_IMAGE_PIXELS guards against decompression bombs)"
                                ) from None
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for broken files
            raise InstanceError(f"instance {instance.id}: image {p} cannot be decoded ({type(exc).__name__}: {exc})",
                                "replace the file with a valid PNG/JPEG") from None
    return opened


def to_rgb(img, where: str = "image"):
    """An 8-bit RGB copy of a PIL image, scaling 16-bit grey levels instead of clipping them.

    PIL's own ``convert("RGB")`` clips a 16-bit grey image (mode ``I;16`` or ``I``) at 255, so every pixel
    brighter than 255/65535 of full scale comes out white. Here 16-bit values v map to round(v / 257), which
    sends 0 -> 0 and 65535 -> 255 exactly. Floating-point images have no agreed range and are refused.
    """
    import numpy as np
    from PIL import Image

    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        pixels = np.asarray(img, dtype=np.float64)
        if mode == "I" and pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
            raise InstanceError(f"image {where} holds 32-bit integer pixels outside 0..65535",
                                "save it as an 8- or 16-bit PNG")
        grey = np.clip(np.rint(pixels / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "F":
        raise InstanceError(f"image {where} holds floating-point pixels with no agreed range",
                            "save it as an 8- or 16-bit PNG")
    return img.convert("RGB")


def dataset_fingerprint(instances: list[Instance]) -> str:
    """A hash of the instances' content (text and image bytes), for the trace manifest."""
    digest = hashlib.sha256()
    for inst in instances:
        digest.update(json.dumps(inst.to_json(), sort_keys=True).encode())
        for p in inst.images:
            try:
                digest.update(Path(p).read_bytes())
            except OSError:
                digest.update(b"<unreadable>")
    return digest.hexdigest()[:16]


BUILTIN_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40)}


def cache_dir() -> Path:
    import os

    root = os.environ.get("LATENTPROBE_CACHE") or Path.home() / ".cache" / "latentprobe"
    return Path(root)


def builtin_text_instances(n: int = 8, seed: int = 0, hops: int = 2) -> list[Instance]:
    """A small synthetic text set for text-only subjects: chained additions ("a = 3. b = a + 2. What is b?").

    Each question defines ``hops`` + 1 variables, each the previous one plus a small number, and asks for the
    last; the gold is the number, with two options (the gold and the value one hop earlier) so that the answer
    slot has candidates. The chain and the values are ``attributes``.

    >>> inst = builtin_text_instances(1)[0]
    >>> inst.question, inst.answer, inst.options
    ('a = 8. b = a + 3. c = b + 3. What is c?', '14', ['14', '11'])
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    names = "abcdefgh"
    if not 1 <= hops < len(names):
        raise LatentProbeError(f"hops must be between 1 and {len(names) - 1}, got {hops}", "use e.g. hops=2")
    instances = []
    for i in range(n):
        values = [int(rng.integers(1, 10))]
        parts = [f"{names[0]} = {values[0]}."]
        steps = []
        for k in range(1, hops + 1):
            add = int(rng.integers(1, 5))
            values.append(values[-1] + add)
            parts.append(f"{names[k]} = {names[k - 1]} + {add}.")
            steps.append(f"{names[k]} = {values[-2]} + {add} = {values[-1]}")
        gold, previous = str(values[-1]), str(values[-2])
        instances.append(Instance(
            id=f"builtin-text-{i:03d}", question=" ".join(parts) + f" What is {names[hops]}?", answer=gold,
            options=[gold, previous], attributes={"values": values, "steps": steps, "hops": hops},
            task="builtin-chain", split="test"))
    return instances


# What latentprobe itself writes into the cache (`cache_entries` lists only these, so clearing never touches
# anything else a user keeps in a LATENTPROBE_CACHE folder).
CACHE_PREFIXES = ("organism-data", "builtin-v")


def cache_entries() -> list[Path]:
    """The entries of `cache_dir` that latentprobe wrote: generated organism data and built-in images."""
    root = cache_dir()
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(CACHE_PREFIXES))


def builtin_instances(n: int = 8, seed: int = 0, image_size: int = 56) -> list[Instance]:
    """A small synthetic image set so every command runs with no data: one coloured square per image.

    Images are drawn deterministically into the latentprobe cache folder the first time they are asked for.

    >>> [inst.answer for inst in builtin_instances(4)]
    ['yellow', 'red', 'blue', 'blue']
    """
    import numpy as np
    from PIL import Image

    from ..fileio import atomic_write

    folder = cache_dir() / f"builtin-v1-s{seed}-{image_size}"
    rng = np.random.default_rng(seed)
    names = list(BUILTIN_COLOURS)
    instances = []
    for i in range(n):
        colour = names[int(rng.integers(len(names)))]
        background = names[int(rng.integers(len(names)))]
        while background == colour:
            background = names[int(rng.integers(len(names)))]
        size = int(rng.integers(image_size // 4, image_size // 2 + 1))
        x0, y0 = (int(v) for v in rng.integers(0, image_size - size, size=2))
        path = folder / f"shape_{i:03d}.png"
        if not path.exists():
            canvas = np.zeros((image_size, image_size, 3), dtype=np.uint8)
            canvas[:] = np.array(BUILTIN_COLOURS[background]) // 3
            canvas[y0:y0 + size, x0:x0 + size] = BUILTIN_COLOURS[colour]
            atomic_write(path, lambda tmp, c=canvas: Image.fromarray(c).save(tmp, format="PNG"))
        quadrant = ("top" if y0 + size / 2 < image_size / 2 else "bottom") + "-" + (
            "left" if x0 + size / 2 < image_size / 2 else "right")
        instances.append(Instance(
            id=f"builtin-{i:03d}", question="What colour is the square?", answer=colour, images=[str(path)],
            options=list(names), attributes={"colour": colour, "background": background, "quadrant": quadrant,
                                             "size": size}, task="builtin-colour", split="test"))
    return instances
