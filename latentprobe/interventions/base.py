"""The base of every intervention, the shared helpers, and the kind registry.

An intervention is a small named object that edits one thing; its ``name`` appears in every result row. Each
family lives in its own module (`latent`, `input`, `text`); a kind becomes available to `make_interventions`
(and so to ``--kind`` on the command line) by decorating its class with ``@register_intervention("kind")``.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC
from typing import Any, Callable

from ..cli_types import MAX_NOISE_SCALE  # one bound for the command line and the classes
from ..errors import LatentProbeError


def _seed_for(*parts: Any) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "+".join(str(v) for v in value)
    return str(value)


class Intervention(ABC):
    """Base: a named edit of one target. Subclass a family base (`LatentIntervention`, `InputIntervention`,
    `TextIntervention`), set ``kind``, and override `params` so ``name`` says exactly what was done (it appears in
    every result row)."""

    target = "none"
    kind = "none"
    seed: int = 0
    needs_donor = False  # takes something from another instance (patch, swaps)
    needs_images = False  # edits or reads image tokens: refused on a text-only subject
    # "edit" for a real edit; "placebo" for the noise floor of its family (the clean input or latents run again
    # through exactly the edited runs' code path): every effect is read against its family's placebo.
    role = "edit"

    def check(self, max_steps: int, n_instances: int):
        """Refuse, before any model runs, what cannot work (here: a donor with a single instance)."""
        if self.needs_donor and n_instances < 2:
            raise LatentProbeError(f"{self.name} needs another instance to take from, but there is only one",
                                   "run on at least two instances")

    def params(self) -> dict[str, Any]:
        return {}

    @property
    def name(self) -> str:
        shown = ",".join(f"{k}={_fmt(v)}" for k, v in self.params().items() if v is not None)
        return f"{self.kind}({shown})" if shown else self.kind

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "target": self.target, "kind": self.kind, "role": self.role, "seed": self.seed,
                **self.params()}

    def __repr__(self) -> str:
        return self.name

    # A kind swept by --scale names the constructor argument each scale fills, and its default.
    scale_param: str | None = None
    scale_default: float | None = None

    @classmethod
    def from_args(cls, *, seed: int = 0, scales=None, **_) -> list["Intervention"]:
        """Instances from `make_interventions`' command-line style arguments: one per scale (into
        ``scale_param``, default ``scale_default``) for a swept kind, else one, with ``seed``."""
        if cls.scale_param is None:
            return [cls(seed=seed)]
        return [cls(**{cls.scale_param: s}, seed=seed) for s in (scales or [cls.scale_default])]



def checked_scale(what: str, value: float, low: float, high: float, hint: str) -> float:
    """``value`` as a float, refused unless finite and in [low, high] (a NaN would pass a plain ``< 0`` test)."""
    value = float(value)
    if not (math.isfinite(value) and low <= value <= high):
        raise LatentProbeError(f"{what} must be in [{low:g}, {high:g}], got {value}", hint)
    return value


# kind name -> class, per target, in registration order (the order shown by "choose from ..." messages)
KINDS_BY_TARGET: dict[str, dict[str, type]] = {"latent": {}, "input": {}, "text": {}}


def register_intervention(kind: str, *, target: str | None = None) -> Callable[[type], type]:
    """Class decorator: make ``kind`` a name `make_interventions` can build.

    The class's ``target`` (latent, input or text) says which table it joins, unless ``target`` is given; its
    ``from_args`` classmethod turns command-line style arguments into instances (override it for a sweep).

    >>> @register_intervention("halve-example")
    ... class Halve(Intervention):
    ...     target = "text"
    >>> KINDS_BY_TARGET["text"]["halve-example"] is Halve, Halve.kind
    (True, 'halve-example')
    >>> del KINDS_BY_TARGET["text"]["halve-example"]
    """

    def decorate(cls: type) -> type:
        table_name = target or cls.target
        if table_name not in KINDS_BY_TARGET:
            raise LatentProbeError(f"cannot register {kind!r} for unknown target {table_name!r}",
                                   f"use one of {', '.join(KINDS_BY_TARGET)}")
        table = KINDS_BY_TARGET[table_name]
        if kind in table and table[kind] is not cls:
            raise LatentProbeError(f"intervention kind {kind!r} is already registered to {table[kind].__name__}",
                                   "pick another kind name")
        cls.kind = kind
        table[kind] = cls
        return cls

    return decorate
