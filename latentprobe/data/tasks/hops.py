"""The ``hops`` task: k-hop lookups in a written permutation, the text organisms' multi-hop task.

A question writes a permutation f of ``n_symbols`` names as arrows in a fixed order of their sources
(``ant>cat bee>eel cat>ant ...``), names a start s and asks where ``hops`` arrows lead: the answer is f^hops(s),
one of the names (the options: every name, in order; chance 1 / n_symbols). A permutation, so that every name is
the target of exactly one arrow and no "most frequent target" heuristic beats chance. Every question of one
setting has the same words at the same places except the targets and the start, so a one-layer model can find
the arrow out of a name by its place: following one arrow is one attention read, one per latent step (or per
written word).

The splits are disjoint by construction: a question belongs to the held-out split when a hash of its text
falls in one residue class (``test_share``), so either split is generated without the other, any number of
instances, and the two never share a question whatever their sizes. Every random choice comes from ``seed``.

>>> test = hops_instances(2, seed=0, split="test")
>>> test[0].question
'ant>gnu bee>eel cat>fox dog>ant eel>bee fox>cat gnu>dog hen>hen . start at cat , follow 2 arrows ?'
>>> test[0].answer, test[0].attributes["hop_1"], test[0].options[:3]
('cat', 'fox', ['ant', 'bee', 'cat'])
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from ...errors import LatentProbeError
from ..instances import Instance

VERSION = 1
# Animal names, not letters: "a" would vanish under SQuAD answer normalisation (an article), and letters would
# read as option letters.
SYMBOLS = ("ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen", "yak", "owl", "pig", "ram", "rat", "bat", "cow",
           "elk")
TASK = "hops"
SPLITS = ("train", "test")
# One question in TEST_MODULUS is held out (a hash residue class): about 1/8 of the question space.
TEST_MODULUS = 8


def arrow(source: str, target: str) -> str:
    return f"{source}>{target}"


def question_text(mapping: dict[str, str], start: str, hops: int) -> str:
    """The arrows in ``mapping``'s order (its sources' order), the start, the number of arrows to follow."""
    arrows = " ".join(arrow(src, dst) for src, dst in mapping.items())
    return f"{arrows} . start at {start} , follow {hops} arrows ?"


def split_of(question: str) -> str:
    """``test`` for the held-out residue class of the question's SHA-256, else ``train``."""
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "little") % TEST_MODULUS == 0 else "train"


def hops_instances(n: int, seed: int = 0, split: str = "test", n_symbols: int = 8, hops: int = 2,
                   id_prefix: str | None = None) -> list[Instance]:
    """``n`` distinct questions of ``split`` (``train`` or ``test``), deterministic for (seed, split, n_symbols,
    hops): the first m of a call with n > m are the m of a call with m."""
    if split not in SPLITS:
        raise LatentProbeError(f"unknown split {split!r} for the hops task", "use train or test")
    if not isinstance(n, int) or n < 1:
        raise LatentProbeError(f"n must be a positive integer, got {n!r}", "pass e.g. n=80")
    if not 2 <= n_symbols <= len(SYMBOLS):
        raise LatentProbeError(f"n_symbols must be between 2 and {len(SYMBOLS)}, got {n_symbols}", "use e.g. 8")
    if not 1 <= hops <= 9:
        raise LatentProbeError(f"hops must be between 1 and 9, got {hops}", "use e.g. 2")
    names = list(SYMBOLS[:n_symbols])
    rng = np.random.default_rng([seed, SPLITS.index(split), n_symbols, hops])
    prefix = id_prefix or f"{TASK}-{split}"
    seen: set[str] = set()
    out: list[Instance] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise LatentProbeError(f"could not draw {n} distinct {split} questions with {n_symbols} symbols",
                                   "ask for fewer instances or use more symbols")
        targets = rng.permutation(n_symbols)
        mapping = {names[i]: names[int(t)] for i, t in enumerate(targets)}
        start = names[int(rng.integers(n_symbols))]
        question = question_text(mapping, start, hops)
        if question in seen or split_of(question) != split:
            continue
        seen.add(question)
        chain = [start]
        for _ in range(hops):
            chain.append(mapping[chain[-1]])
        attributes: dict[str, Any] = {"start": start, "answer": chain[-1], "hops": hops, "chain": chain,
                                      "n_symbols": n_symbols}
        for k in range(1, hops):
            attributes[f"hop_{k}"] = chain[k]
        out.append(Instance(id=f"{prefix}-{len(out):05d}", question=question, answer=chain[-1], options=names,
                            attributes=attributes, split=split, task=TASK))
    return out
