"""Building interventions by kind name (`make_interventions`) and donor mappings (`derangement`)."""

from __future__ import annotations

import random
from typing import Sequence

from ..errors import LatentProbeError
from . import controls as _controls, input as _input, latent as _latent, text as _text  # noqa: F401  (registers kinds)
from .base import KINDS_BY_TARGET, Intervention


def make_interventions(target: str, kinds: Sequence[str], *, steps: Sequence[int] | None = None,
                       scales: Sequence[float] | None = None, layer: int | None = None,
                       semantics: Sequence[str] = ("recompute",), seed: int = 0,
                       relative_to: str = "std", value: str | None = None) -> list[Intervention]:
    """Build interventions from command-line style arguments; sweeps expand over scales and semantics.

    Each kind's class (registered with `register_intervention`) builds its own instances in ``from_args``;
    latent kinds are built once per semantics. Interventions with the same name are kept once.

    >>> [iv.name for iv in make_interventions("latent", ["noise"], scales=[1, 3], steps=[0])]
    ['noise(scale=1,rel=std,steps=0,sem=recompute)', 'noise(scale=3,rel=std,steps=0,sem=recompute)']
    """
    if target not in KINDS_BY_TARGET:
        raise LatentProbeError(f"unknown target {target!r}", "use latent, input or text")
    if target != "latent" and (steps is not None or layer is not None):
        raise LatentProbeError(f"--steps and --layer edit latent steps; {target} interventions would ignore them",
                               "leave them out, or use --target latent")
    table = KINDS_BY_TARGET[target]
    out: list[Intervention] = []
    for kind in kinds:
        if kind not in table:
            other = [t for t, kinds_ in KINDS_BY_TARGET.items() if kind in kinds_]
            hint = f" (it is a --target {other[0]} kind)" if other else ""
            raise LatentProbeError(f"unknown {target} intervention kind {kind!r}{hint}",
                                   f"choose from {', '.join(table)}")
        cls = table[kind]
        if target == "latent":
            for sem in semantics:
                out += cls.from_args(steps=steps, layer=layer, semantics=sem, seed=seed, scales=scales,
                                     relative_to=relative_to, value=value)
        else:
            out += cls.from_args(seed=seed, scales=scales)
    # drop and shuffle have no semantics: keep one of each
    unique: dict[str, Intervention] = {}
    for iv in out:
        unique.setdefault(iv.name, iv)
    return list(unique.values())


def derangement(n: int, seed: int) -> list[int]:
    """A seeded permutation with no fixed point: each instance's donor is another instance."""
    if n < 2:
        raise LatentProbeError("a donor mapping needs at least two instances", "run on at least two instances")
    rng = random.Random(seed)
    while True:
        order = list(range(n))
        rng.shuffle(order)
        if all(i != o for i, o in enumerate(order)):
            return order
