"""Grounding maps: where in the image each latent step "looks", scored against the region the answer needs.

For latent step k at layer L, the map is the cosine similarity between the latent state ``latent[k].layer[L]``
and every image-token state ``image.layer[L']`` of the same instance (L' = L by default; ``image_layer`` fixes
one image layer for all L, e.g. 0 = the vision tower's merged features as the language model receives them).
The image tokens form the grid ``image_grid_thw`` gives after the 2x2 merge (rows = h / 2, cols = w / 2, in
row-major order), so each map is a (rows, cols) picture laid over the image.

Ground truth, when the instance has it (`truth_region`):

* the mental-transformation task (the organisms' task): the original-image cell whose colour answers the
  question (the cell the transform carries onto the queried position);
* the path task: the cell where the walk ends;
* V*: the annotated target bounding box(es) ``bbox`` = [x, y, w, h] in image pixels.

A token belongs to the region when its centre lies inside it (at least the token under the region's centre).

Two measures: ``cosine``, and ``centred`` (the instance's mean image-token state subtracted from both sides
first: cosine similarity in transformers is inflated by a shared direction, Ethayarajh 2019). As a
baseline that needs no latent phase, the last prompt token (``latent_step`` = -1, ``prompt_last.layer[L]``) is
mapped the same way: it is where a model without latents (the direct organism) decides its answer.

Scores per map (Zhang et al. 2018's pointing game; the "energy" variant of Wang et al. 2020, Score-CAM):

* ``hit``: the most similar image token lies inside the region;
* ``mass_inside``: the share of the min-max normalised map (similarity minus its minimum over the image) that
  falls inside the region;
* ``chance_hit`` / ``chance_mass``: the same two scores for regions of the same size (the region's bounding
  rectangle in tokens) placed at random over the grid: every placement when there are at most ``n_random``,
  else ``n_random`` placements drawn with ``seed``. A map that ignores the image scores chance on average.

`grounding_summary` aggregates per (subject, layer, latent step): hit rate with an exact (Clopper-Pearson) 95%
interval and a one-sided exact binomial test against the mean chance hit rate, mean mass inside against
chance with a paired bootstrap interval of the difference.

Table schema (`GROUNDING_COLUMNS`; one row per instance x query position x layer x measure)::

    subject, intervention, seed, instance_id, latent_step, layer, image_layer, site, measure, grid_rows, grid_cols,
    similarity (row-major list), peak_token, has_truth, region_tokens (row-major indices), hit, mass_inside,
    chance_hit, chance_mass
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from ..errors import LatentProbeError
from ..model.sites import Site, check_sites

GROUNDING_COLUMNS = ["subject", "intervention", "seed", "instance_id", "latent_step", "layer", "image_layer", "site",
                     "measure", "grid_rows", "grid_cols", "similarity", "peak_token", "has_truth", "region_tokens", "hit",
                     "mass_inside", "chance_hit", "chance_mass"]


# ------------------------------------------------------------------------------------------- ground truth
def truth_boxes(instance) -> list[tuple[float, float, float, float]] | None:
    """The answer region of an instance as boxes (x0, y0, x1, y1) in fractions of the image, or None.

    Transform and path tasks name grid cells; V* gives pixel boxes ``[x, y, w, h]`` (one or a list), read
    against the image's own size.
    """
    attributes = instance.attributes or {}
    grid = attributes.get("grid_size")
    cell = None
    if grid and {"transform", "query_cell"} <= set(attributes):
        from ..data.tasks.transform import apply_transform

        g = int(grid)
        sources = apply_transform(np.arange(g * g).reshape(g, g), attributes["transform"],
                                  attributes.get("swap_cells", ()))
        cell = int(sources.flat[int(attributes["query_cell"])])
    elif grid and "end_cell" in attributes:
        cell = int(attributes["end_cell"])
    if cell is not None:
        g = int(grid)
        row, col = divmod(cell, g)
        return [(col / g, row / g, (col + 1) / g, (row + 1) / g)]
    if "bbox" in attributes and attributes["bbox"] is not None and instance.images:
        boxes = attributes["bbox"]
        boxes = [boxes] if len(boxes) == 4 and all(np.isscalar(v) for v in boxes) else boxes
        from PIL import Image

        with Image.open(instance.images[0]) as image:
            width, height = image.size
        out = []
        for box in boxes:
            if len(box) != 4:
                raise LatentProbeError(f"instance {instance.id}: bbox {box} is not [x, y, w, h]",
                                       "V* boxes are [x, y, w, h] in pixels")
            x, y, w, h = (float(v) for v in box)
            if not all(np.isfinite([x, y, w, h])) or w <= 0 or h <= 0:
                raise LatentProbeError(f"instance {instance.id}: bbox {box} has no area or is not finite",
                                       "fix the annotation (w and h must be > 0)")
            x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)
            if x1 <= x0 or y1 <= y0:
                raise LatentProbeError(f"instance {instance.id}: bbox {box} lies outside its {width} x {height} image",
                                       "fix the annotation ([x, y, w, h] in the image's own pixels)")
            if (x0, y0, x1, y1) != (x, y, x + w, y + h):
                # a box beyond the image would count every token as inside (chance 1.0) without a word
                logging.getLogger(__name__).warning(
                    "instance %s: bbox %s reaches beyond its %d x %d image; clamped to [%g, %g, %g, %g]",
                    instance.id, list(box), width, height, x0, y0, x1 - x0, y1 - y0)
            out.append((x0 / width, y0 / height, x1 / width, y1 / height))
        return out
    return None


def region_mask(boxes: Sequence[tuple[float, float, float, float]], rows: int, cols: int) -> np.ndarray:
    """Tokens (rows, cols) whose centres lie inside any box; at least the token under each box's centre."""
    centres_y = (np.arange(rows) + 0.5) / rows
    centres_x = (np.arange(cols) + 0.5) / cols
    mask = np.zeros((rows, cols), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        inside = ((centres_y >= y0) & (centres_y < y1))[:, None] & ((centres_x >= x0) & (centres_x < x1))[None, :]
        if not inside.any():
            cy = min(rows - 1, max(0, int((y0 + y1) / 2 * rows)))
            cx = min(cols - 1, max(0, int((x0 + x1) / 2 * cols)))
            inside[cy, cx] = True
        mask |= inside
    return mask


# ------------------------------------------------------------------------------------------------ scores
def similarity_map(latent: torch.Tensor, image_tokens: torch.Tensor) -> np.ndarray:
    """Cosine similarity (n_tokens,) between one latent state (D,) and each image-token state (n, D)."""
    return torch.nn.functional.cosine_similarity(latent.float().unsqueeze(0), image_tokens.float(), dim=-1).numpy()


def _mass(weights: np.ndarray, mask: np.ndarray) -> float:
    total = weights.sum()
    if total <= 0:  # a flat map: every token equal
        return float(mask.mean())
    return float(weights[mask].sum() / total)


def random_placements(mask: np.ndarray, n_random: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Top-left corners for regions of the mask's bounding-rectangle size: all when few, else a seeded draw."""
    ys, xs = np.nonzero(mask)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    rows, cols = mask.shape
    corners = [(y, x) for y in range(rows - height + 1) for x in range(cols - width + 1)]
    if len(corners) <= n_random:
        return corners
    picks = rng.integers(0, len(corners), size=n_random)
    return [corners[i] for i in picks]


def _check_n_random(n_random):
    if isinstance(n_random, bool) or not isinstance(n_random, (int, np.integer)) or n_random < 1:
        raise LatentProbeError(f"n_random must be an integer >= 1, got {n_random!r}",
                               "pass a positive number of random regions")


def score_map(similarity: np.ndarray, mask: np.ndarray, n_random: int = 100,
              rng: np.random.Generator | None = None) -> dict[str, float]:
    """Pointing-game hit, mass inside the region, and both for random regions of the same size.

    Parameters
    ----------
    similarity : (rows, cols) array
    mask : (rows, cols) bool array, the ground-truth region (not empty)
    n_random : int
        Random placements for the chance baseline (every placement when there are at most this many).
    rng : numpy Generator
        For the draw of placements; pass a seeded one.
    """
    if not mask.any():
        raise LatentProbeError("the ground-truth region covers no image token", "check the region or its image")
    _check_n_random(n_random)
    rng = rng if rng is not None else np.random.default_rng(0)
    peak = np.unravel_index(int(np.argmax(similarity)), similarity.shape)
    weights = similarity - similarity.min()
    ys, xs = np.nonzero(mask)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    hits, masses = [], []
    for y, x in random_placements(mask, n_random, rng):
        box = np.zeros_like(mask)
        box[y:y + height, x:x + width] = True
        hits.append(bool(box[peak]))
        masses.append(_mass(weights, box))
    return {"hit": bool(mask[peak]), "mass_inside": _mass(weights, mask), "chance_hit": float(np.mean(hits)),
            "chance_mass": float(np.mean(masses)), "peak_token": int(np.argmax(similarity))}


# ------------------------------------------------------------------------------------------------ tables
MEASURES = ("cosine", "centred")


def grounding_table(subject_name: str, cache, instances, *, layers: Sequence[int] | None = None,
                    image_layer: int | None = None, n_random: int = 100, seed: int = 0,
                    measures: Sequence[str] = MEASURES, intervention: str = "none") -> pd.DataFrame:
    """One row per instance x query position x layer x measure: the map, its peak, and its scores.

    Query positions are the latent steps (``latent_step`` k >= 0) and, as a baseline with no latent phase
    needed, the last prompt token (``latent_step`` = -1, site ``prompt_last.layer[L]``), where a model without
    latents decides its answer. Measures: ``cosine``, and ``centred`` (the instance's mean image-token state
    subtracted from the query and the tokens first: cosine in transformers is inflated by a shared direction).
    ``cache`` is a `LatentCache` holding ``latent.layer[L]`` / ``prompt_last.layer[L]`` and ``image.layer[L]``
    (or ``image_layer``) sites. Only the first image of an instance is mapped.
    """
    unknown = sorted(set(measures) - set(MEASURES))
    if unknown or not measures:
        raise LatentProbeError(f"unknown grounding measure(s) {unknown or list(measures)}",
                               f"use {' and/or '.join(MEASURES)}")
    layers = list(cache.layer_ids if layers is None else layers)
    by_id = {inst.id: inst for inst in instances}
    rows = []
    for layer in layers:
        queries = []  # (latent_step, site, states (B, S, D))
        if Site("latent", layer) in cache:
            queries.append(("latent", cache[Site("latent", layer)]))
        if Site("prompt_last", layer) in cache:
            queries.append(("prompt_last", cache[Site("prompt_last", layer)].unsqueeze(1)))
        images = cache[Site("image", layer if image_layer is None else image_layer)]
        for r, instance_id in enumerate(cache.instance_ids):
            grids = cache.image_grids[r]
            if not grids:
                continue
            t, grid_rows, grid_cols = grids[0]
            n_tokens = t * grid_rows * grid_cols
            tokens = images[r, :n_tokens]
            centre = tokens.mean(0)
            boxes = truth_boxes(by_id[instance_id])
            mask = region_mask(boxes, t * grid_rows, grid_cols) if boxes else None
            for group, states in queries:
                n_steps = int((~torch.isnan(states[r, :, 0])).sum())
                for k in range(n_steps):
                    step = k if group == "latent" else -1
                    site = Site("latent", layer, step=k) if group == "latent" else Site("prompt_last", layer)
                    for measure in measures:
                        query, keys = states[r, k], tokens
                        if measure == "centred":
                            query, keys = query - centre, tokens - centre
                        # frames of a video would stack on rows; images have t = 1
                        similarity = similarity_map(query, keys).reshape(t * grid_rows, grid_cols)
                        row: dict[str, Any] = {
                            "subject": subject_name, "intervention": intervention, "seed": seed,
                            "instance_id": instance_id, "latent_step": step, "layer": layer,
                            "image_layer": layer if image_layer is None else image_layer, "site": str(site),
                            "measure": measure, "grid_rows": t * grid_rows, "grid_cols": grid_cols,
                            "similarity": similarity.ravel().tolist(), "peak_token": int(np.argmax(similarity)),
                            "has_truth": mask is not None, "region_tokens": [], "hit": np.nan,
                            "mass_inside": np.nan, "chance_hit": np.nan, "chance_mass": np.nan}
                        if mask is not None:
                            row.update(score_map(similarity, mask, n_random, _row_rng(seed, instance_id, layer, step)))
                            row["hit"] = float(row["hit"])
                            row["region_tokens"] = np.flatnonzero(mask).tolist()
                        rows.append(row)
    return pd.DataFrame(rows, columns=GROUNDING_COLUMNS)


def _row_rng(seed: int, instance_id: str, layer: int, step: int) -> np.random.Generator:
    """A generator seeded by (seed, instance, layer, step): a row's chance baseline does not depend on its batch."""
    import hashlib

    digest = hashlib.sha256(f"{seed}:{instance_id}:{layer}:{step}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def grounding_summary(table: pd.DataFrame, *, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Per (subject, measure, layer, query): hit rate with exact 95% CI and a one-sided exact binomial p-value
    against the mean chance hit rate; mean mass inside vs chance with a paired bootstrap 95% CI of the
    difference. ``latent_step`` is the step ("0", "1", ...), "all" (every latent step pooled) or "prompt_last"."""
    from scipy import stats

    from ..stats.effects import paired_bootstrap

    columns = ["subject", "measure", "layer", "latent_step", "n", "hit_rate", "hit_ci_low", "hit_ci_high",
               "chance_hit", "p_above_chance", "mass_inside", "chance_mass", "mass_gain", "mass_gain_ci_low",
               "mass_gain_ci_high"]
    scored = table[table["has_truth"].astype(bool)].dropna(subset=["hit"])
    if scored.empty:
        return pd.DataFrame(columns=columns)
    keys = ["subject", "measure", "layer"]
    groups = [((*key[:3], "prompt_last" if key[3] < 0 else str(key[3])), part)
              for key, part in scored.groupby(keys + ["latent_step"])]
    latent = scored[scored["latent_step"] >= 0]
    groups += [((*key, "all"), part) for key, part in latent.groupby(keys)]
    out = []
    for (subject, measure, layer, step), part in groups:
        n = len(part)
        hits = int(part["hit"].sum())
        chance = float(part["chance_hit"].mean())
        test = stats.binomtest(hits, n, p=min(max(chance, 1e-12), 1 - 1e-12), alternative="greater")
        ci = stats.binomtest(hits, n).proportion_ci(method="exact")
        gain = (part["mass_inside"] - part["chance_mass"]).to_numpy(dtype=float)
        _, low, high = paired_bootstrap(gain, n_boot=n_boot, seed=seed)
        out.append({"subject": subject, "measure": measure, "layer": layer, "latent_step": step, "n": n,
                    "hit_rate": hits / n, "hit_ci_low": ci.low, "hit_ci_high": ci.high, "chance_hit": chance,
                    "p_above_chance": test.pvalue, "mass_inside": float(part["mass_inside"].mean()),
                    "chance_mass": float(part["chance_mass"].mean()), "mass_gain": float(gain.mean()),
                    "mass_gain_ci_low": low, "mass_gain_ci_high": high})
    return pd.DataFrame(out, columns=columns)


# ------------------------------------------------------------------------------------------------ runner
def check_grounding_input(subject, instances, layers: Sequence[int] | None, image_layer: int | None) -> list[int]:
    """Everything grounding needs, checked before any model runs; returns the layers to map."""
    from ..model.backbones import require_images

    require_images(subject, "grounding")
    if not instances:
        raise LatentProbeError("grounding got no instances", "pass a data file with at least one instance")
    without = [inst.id for inst in instances if not inst.images]
    if without:
        raise LatentProbeError(f"grounding needs image tokens, but {len(without)} instance(s) have no image "
                               f"(e.g. {without[0]})", "use instances with an image, or filter them out")
    layers = list(range(subject.num_layers + 1)) if layers is None else list(layers)
    if not layers:
        raise LatentProbeError("no layers to ground", "pass at least one layer (0 = embeddings .. N = final norm)")
    check_sites([Site("latent", layer) for layer in layers] +
                ([Site("image", image_layer)] if image_layer is not None else []), subject.num_layers)
    return sorted(set(layers))


def run_grounding(subject, instances, *, config=None, layers: Sequence[int] | None = None,
                  image_layer: int | None = None, n_random: int = 100, batch_size: int = 16,
                  measures: Sequence[str] = MEASURES, seed: int = 0, journal=None) -> pd.DataFrame:
    """Decode ``instances`` in batches (`run_with_cache`) and return the grounding table (module docstring).

    ``journal`` (a `latentprobe.runs.journal.ChunkJournal`) keeps each finished batch on disk and skips the
    batches it already holds (``ground --resume``)."""
    from ..model.cache import run_with_cache

    layers = check_grounding_input(subject, instances, layers, image_layer)
    _check_n_random(n_random)
    if not measures or set(measures) - set(MEASURES):
        raise LatentProbeError(f"unknown grounding measure(s) {list(measures)}", f"use {' and/or '.join(MEASURES)}")
    if batch_size < 1:
        raise LatentProbeError(f"batch size must be >= 1, got {batch_size}", "pass --batch-size 1 or more")
    image_layers = layers if image_layer is None else [image_layer]
    # subjects without a latent phase (the direct baseline) are mapped from their last prompt token only
    groups = ("latent", "prompt_last") if subject.resolved_protocol is not None else ("prompt_last",)
    sites = [Site(g, layer) for g in groups for layer in layers] + [Site("image", layer) for layer in image_layers]
    parts = []
    for start in range(0, len(instances), batch_size):
        done = journal.load(start, ("grounding",)) if journal is not None else None
        if done is not None:
            parts.append(done["grounding"])
            continue
        chunk = instances[start:start + batch_size]
        _, cache = run_with_cache(subject, chunk, sites=sites, config=config)
        parts.append(grounding_table(subject.name, cache, chunk, layers=layers, image_layer=image_layer,
                                     n_random=n_random, seed=seed, measures=measures))
        if journal is not None:
            journal.save(start, {"grounding": parts[-1]})
    return pd.concat(parts, ignore_index=True)
