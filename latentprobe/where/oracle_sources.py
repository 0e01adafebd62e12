"""Oracle sources for the ``oracle`` and ``oracle-other`` controls: what a subject's latent slots are trained to hold.

* ``answer-region`` (`AnswerRegionTokens`; LVR-style): the image-token states of the region the answer needs (the
  vision tower's merged features, as the language model receives them at the image positions), which LVR
  regresses its latents onto. The region is the instance's ground truth (`latentprobe.where.grounding.truth_boxes`:
  the answer's source cell for the transform task, the end cell for the path task, V*'s ``bbox``). With K latent
  slots and n region tokens (row-major): the tokens themselves when n = K (the organisms' training targets:
  a 2x2-token cell and 4 slots), else K tokens at evenly spaced ranks of the n.
* ``helper-image`` (`HelperImageCells`; Mirage-style): the instance's helper image (``aux_images``), its merged
  features pooled over a sqrt(K) x sqrt(K) grid of cells (row-major), as Mirage's organism is aligned to; for a
  K that is not a square, over K contiguous row-major chunks of its tokens.

An instance without a region or a helper image gets no target: its row is recorded ``applied = false`` with the
reason. `make_oracle_source` picks a source by name (``auto``: helper-image for Mirage's protocol, answer-region
otherwise).
"""

from __future__ import annotations

from abc import abstractmethod

import math

import numpy as np
import torch

from ..errors import LatentProbeError
from ..interventions.controls import OracleSource
from .grounding import region_mask, truth_boxes

ORACLE_SOURCES = ("auto", "answer-region", "helper-image")


@torch.no_grad()
def merged_image_features(subject, image) -> tuple[torch.Tensor, int, int]:
    """One image's merged vision features (tokens, D) on CPU in float32, and its token grid (rows, cols)."""
    processed = subject.image_processor(images=[image], return_tensors="pt")
    grid = processed["image_grid_thw"]
    model = subject.model
    pixels = processed["pixel_values"].to(device=subject.device, dtype=model.dtype)
    out = model.model.get_image_features(pixels, grid.to(subject.device))
    features = out.pooler_output if hasattr(out, "pooler_output") else out
    features = features[0] if isinstance(features, (list, tuple)) else features
    merge = getattr(subject.image_processor, "merge_size", 2)
    return features.float().cpu(), int(grid[0, 1]) // merge, int(grid[0, 2]) // merge


def _evenly_spaced(n: int, k: int) -> list[int]:
    if n == k:
        return list(range(n))
    return [int(round(x)) for x in np.linspace(0, n - 1, k)]


class _Cached(OracleSource):
    def __init__(self):
        self._cache: dict[tuple[str, int], torch.Tensor | str] = {}

    def targets(self, subject, instance, images, n_steps):
        key = (instance.id, int(n_steps))
        if key not in self._cache:
            self._cache[key] = self._compute(subject, instance, images, int(n_steps))
        return self._cache[key]

    @abstractmethod
    def _compute(self, subject, instance, images, n_steps):
        """The targets of one instance (a tensor), or the reason it has none (a string)."""


class AnswerRegionTokens(_Cached):
    """The answer region's image-token states (LVR's reconstruction target)."""

    name = "answer-region"

    def _compute(self, subject, instance, images, n_steps):
        if not images:
            return "it has no image"
        boxes = truth_boxes(instance)
        if not boxes:
            return "it names no answer region (no transform cell, path end cell or bbox)"
        features, rows, cols = merged_image_features(subject, images[0])
        tokens = np.flatnonzero(region_mask(boxes, rows, cols).reshape(-1))
        return features[[int(tokens[i]) for i in _evenly_spaced(len(tokens), n_steps)]]


class HelperImageCells(_Cached):
    """A helper image's merged features pooled per cell (Mirage's alignment target)."""

    name = "helper-image"

    def _compute(self, subject, instance, images, n_steps):
        if not instance.aux_images:
            return "it has no helper image (aux_images)"
        from ..data.instances import load_images

        helper = load_images(instance, which="aux_images")[0]
        features, rows, cols = merged_image_features(subject, helper)
        side = math.isqrt(n_steps)
        if side * side == n_steps and rows % side == 0 and cols % side == 0:
            grid = features.reshape(rows, cols, -1)
            ch, cw = rows // side, cols // side
            pooled = [grid[i * ch:(i + 1) * ch, j * cw:(j + 1) * cw].reshape(-1, grid.shape[-1]).mean(0)
                      for i in range(side) for j in range(side)]
        else:
            pooled = [chunk.mean(0) for chunk in torch.tensor_split(features, n_steps)]
        return torch.stack(pooled)


def make_oracle_source(name: str, subject) -> OracleSource:
    """The named source (``auto``: helper-image for Mirage's protocol, else answer-region)."""
    if name not in ORACLE_SOURCES:
        raise LatentProbeError(f"unknown oracle source {name!r}", f"choose from {', '.join(ORACLE_SOURCES)}")
    if name == "auto":
        protocol = getattr(subject, "protocol", None)
        name = "helper-image" if protocol is not None and protocol.name == "mirage" else "answer-region"
    return HelperImageCells() if name == "helper-image" else AnswerRegionTokens()


def attach_oracle_sources(interventions, subject) -> None:
    """Give every oracle intervention built by name (``source=None``) the source its name asks for."""
    for iv in interventions:
        if getattr(iv, "wants_row_targets", False) and getattr(iv, "source", None) is None:
            iv.source = make_oracle_source(iv.source_name, subject)
            iv.source_name = iv.source.name
