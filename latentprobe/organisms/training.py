"""Train an organism in one call: data, encoding, the unrolled training loop, and its own fast evaluation.

    >>> from latentprobe.organisms import train_organism
    >>> result = train_organism("bottleneck", out_dir="my_weights", seed=0)    # doctest: +SKIP
    >>> result.metrics["test_accuracy"]                                        # doctest: +SKIP

Determinism: the data are generated from ``data_seed``, the model is initialised and the batches are drawn from
``seed``. The same call gives bit-identical weights on the same machine with the same torch version and the same
number of intra-op threads (``torch.get_num_threads()``, recorded in the weights' metrics). Across machines,
thread counts or torch versions, float reductions are summed in another order and training (hundreds of steps
through a phase transition) amplifies those 1e-7 differences: weights then differ (a retrain elsewhere measured
a max difference of 0.07) and test accuracy by about 1 point (0.975 vs 0.982 shipped).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.instances import Instance, cache_dir, load_jsonl
from ..model.decoding import LatentDecoder
from ..errors import LatentProbeError
from ..model.subject import Subject
from .recipes import IMAGE_SIZE, OrganismRecipe, get_recipe
from .architecture import fresh_subject
from .unroll import EncodedRows, unroll

DEFAULT_N = 2400  # 1800 train / 600 test instances


@dataclass
class TrainResult:
    """A trained organism: its subject, where it was saved, and what it scored."""

    subject: Subject
    recipe: OrganismRecipe
    folder: Path | None
    metrics: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------- data
def organism_data(recipe: OrganismRecipe, data_seed: int = 0, n: int = DEFAULT_N) -> Path:
    """The organism's task data (generated once into the latentprobe cache folder, deterministic for the seed)."""
    from ..data.tasks import GENERATOR_VERSIONS, make_task

    options = dict(recipe.task_options)
    tag = "-".join(f"{k}{v}" for k, v in sorted(options.items()))
    folder = (cache_dir() / "organism-data" /
              f"{recipe.task}-v{GENERATOR_VERSIONS[recipe.task]}-n{n}-s{data_seed}-px{IMAGE_SIZE}{tag}")
    data = folder / "data.jsonl"
    if not data.exists():
        make_task(recipe.task, n=n, seed=data_seed, out_dir=folder, image_size=IMAGE_SIZE, overwrite=True,
                  **options)
    return data


def organism_held_out_data(recipe: OrganismRecipe, n_test: int | None = None, data_seed: int = 0,
                           n: int = DEFAULT_N) -> Path:
    """The first ``n_test`` instances of the organism's own held-out (test) split, written without the training
    images: the same instances, ids and pixels as the test split of `organism_data`, at a fraction of the cost.

    The training items are generated in memory only, to exclude them from the test split as `make_task` does.
    """
    from ..data.instances import write_jsonl
    from ..fileio import atomic_write_json
    from ..data.tasks import GENERATOR_VERSIONS
    from ..data.tasks.writer import IMAGE_DIR, TASKS, _save

    test_fraction = 0.25  # make_task's default, with which organism_data writes the training data
    total_test = int(n * test_fraction + 0.5)
    n_test = total_test if n_test is None else int(n_test)
    if not 1 <= n_test <= total_test:
        raise LatentProbeError(f"the held-out split has {total_test} instances; {n_test} were asked for",
                               f"ask for 1 to {total_test}")
    options = dict(recipe.task_options)
    tag = "-".join(f"{k}{v}" for k, v in sorted(options.items()))
    folder = (cache_dir() / "organism-data" / f"{recipe.task}-v{GENERATOR_VERSIONS[recipe.task]}-n{n}-s{data_seed}"
              f"-px{IMAGE_SIZE}{tag}-heldout{n_test}")
    data = folder / "data.jsonl"
    if data.exists():
        return data
    generate = TASKS[recipe.task]
    train = generate(n - total_test, data_seed, IMAGE_SIZE, split="train", **options)
    keys = frozenset(item.dedup_key() for item in train)
    test = generate(total_test, data_seed, IMAGE_SIZE, split="test", exclude=keys, **options)[:n_test]
    instances = [_save(item, f"{recipe.task}-test-{i:05d}", "test", recipe.task, folder / IMAGE_DIR)
                 for i, item in enumerate(test)]
    atomic_write_json(folder / "task.json", {"task": recipe.task, "n": n, "held_out_only": n_test,
                                             "seed": data_seed, "image_size": IMAGE_SIZE, "task_options": options})
    return write_jsonl(instances, data)


def continuation_text(recipe: OrganismRecipe, instance: Instance) -> str:
    """What the organism is taught to write after its prompt (after the end token, for latent organisms)."""
    letter = instance.gold_letter
    if letter is None:
        raise LatentProbeError(f"instance {instance.id}: the gold answer is not one of the options",
                               "organisms are trained on multiple-choice tasks")
    if recipe.text_mediator_markers:
        open_marker, close_marker = recipe.text_mediator_markers
        imagination = instance.attributes.get("imagination")
        if not imagination:
            raise LatentProbeError(f"instance {instance.id} has no 'imagination' attribute",
                                   "a text-imagination organism needs a task that writes one (transform, path)")
        return f"{open_marker}{imagination}{close_marker}{letter}<|im_end|>"
    return f"{letter}<|im_end|>"


def source_cell(attributes: dict[str, Any]) -> int:
    """Row-major index of the original-image cell whose colour answers a transform question."""
    from ..data.tasks.transform import apply_transform

    g = int(attributes["grid_size"])
    sources = apply_transform(np.arange(g * g).reshape(g, g), attributes["transform"],
                              attributes.get("swap_cells", ()))
    return int(sources.flat[int(attributes["query_cell"])])


def _cell_tokens(grid_thw: torch.Tensor, merge: int, grid_size: int) -> list[list[int]]:
    """Merged-token indices (row-major) of each grid cell, cells in row-major order."""
    rows, cols = int(grid_thw[1]) // merge, int(grid_thw[2]) // merge
    if rows % grid_size or cols % grid_size:
        raise LatentProbeError(f"a {rows}x{cols} token grid does not split into {grid_size}x{grid_size} cells",
                               f"use image sizes that are multiples of {28 * grid_size} px")
    ch, cw = rows // grid_size, cols // grid_size
    return [[(ci * ch + i) * cols + cj * cw + j for i in range(ch) for j in range(cw)]
            for ci in range(grid_size) for cj in range(grid_size)]


@torch.no_grad()
def image_features(subject: Subject, images: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The vision tower's merged features for same-size images: (N, tokens, D), and one image's grid (3,)."""
    processed = subject.image_processor(images=images, return_tensors="pt")
    grid = processed["image_grid_thw"]
    if not bool((grid == grid[0]).all()):
        raise LatentProbeError("organism training needs images of one size", "generate the task with one image_size")
    out = subject.model.model.get_image_features(processed["pixel_values"], grid)
    return torch.stack(list(out.pooler_output)), grid[0]


@torch.no_grad()
def encode_rows(subject: Subject, recipe: OrganismRecipe, instances: list[Instance], chunk: int = 128) -> EncodedRows:
    """Encode instances once for training or fast evaluation: prompts, positions, frozen image features,
    continuations and alignment targets."""
    from ..data.instances import load_images

    decoder = LatentDecoder(subject)
    tokenizer = subject.tokenizer
    merge = getattr(subject.image_processor, "merge_size", 2)
    ids, positions, image_masks, feats, aux_feats, grids = [], [], [], [], [], []
    for start in range(0, len(instances), chunk):
        part = instances[start:start + chunk]
        images = [load_images(inst) for inst in part]
        if any(len(row) != 1 for row in images):
            raise LatentProbeError("organisms are trained on one image per instance", "use a single-image task")
        batch = subject.encode(part, images=images)
        pos = decoder.prefill_positions(batch)
        for r in range(len(part)):
            keep = batch.attention_mask[r].bool()
            ids.append(batch.input_ids[r, keep])
            positions.append(pos[:, r, keep])
            image_masks.append(batch.mm_token_type_ids[r, keep].bool())
        features, grid = image_features(subject, [row[0] for row in images])
        feats.append(features)
        grids.append(grid)
        if recipe.align == "cosine_aux_cells":
            aux = [load_images(inst, which="aux_images")[0] for inst in part]
            aux_features, _ = image_features(subject, aux)
            aux_feats.append(aux_features)
    if any(not torch.equal(g, grids[0]) for g in grids):
        raise LatentProbeError("organism training needs images of one size", "generate the task with one image_size")
    length = max(len(x) for x in ids)
    n = len(instances)
    pad = subject.pad_token_id
    input_ids = torch.full((n, length), pad, dtype=torch.long)
    attention = torch.zeros((n, length), dtype=torch.long)
    image_mask = torch.zeros((n, length), dtype=torch.bool)
    position_ids = torch.ones((3, n, length), dtype=torch.long)
    for r in range(n):
        k = len(ids[r])
        input_ids[r, length - k:] = ids[r]
        attention[r, length - k:] = 1
        image_mask[r, length - k:] = image_masks[r]
        position_ids[:, r, length - k:] = positions[r]
    texts = [continuation_text(recipe, inst) for inst in instances]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(e) for e in encoded)
    continuation = torch.full((n, width), pad, dtype=torch.long)
    continuation_mask = torch.zeros((n, width), dtype=torch.bool)
    letter_ids = {letter: tokenizer.convert_tokens_to_ids(letter) for letter in "ABCDEFGH"}
    gold = torch.tensor([letter_ids[inst.gold_letter] for inst in instances])
    slots = []
    for r, e in enumerate(encoded):
        continuation[r, :len(e)] = torch.tensor(e)
        continuation_mask[r, :len(e)] = True
        slots.append(len(e) - 2)  # the letter, then <|im_end|>
        if e[-2] != int(gold[r]):
            raise LatentProbeError(f"the answer letter of {instances[r].id} does not tokenize on its own",
                                   "check the tokenizer's handling of the continuation text")
    image_embeds = torch.cat(feats)
    targets = None
    if recipe.align:
        grid_size = int(instances[0].attributes.get("grid_size", 2))
        cells = _cell_tokens(grids[0], merge, grid_size)
        if recipe.align == "cosine_aux_cells":  # Mirage: k pooled groups of the auxiliary image, one per cell
            aux = torch.cat(aux_feats)
            targets = torch.stack([aux[:, c].mean(dim=1) for c in cells], dim=1)
        elif recipe.align in ("mse_roi_tokens", "mse_roi_tokens_standardised"):  # LVR: the region of interest
            roi = torch.tensor([cells[source_cell(inst.attributes)] for inst in instances])
            tokens = image_embeds
            if recipe.align == "mse_roi_tokens_standardised":  # the shared mean is what raw MSE collapsed onto
                tokens = standardise_tokens(image_embeds)
            targets = torch.gather(tokens, 1, roi.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        elif recipe.align == "mse_fixed_point":  # one seeded vector for every latent step of every instance
            point = fixed_point(recipe.hidden_size)
            targets = point.expand(n, recipe.latent_steps, -1).clone()
        else:
            raise LatentProbeError(f"unknown alignment {recipe.align!r}",
                                   "use cosine_aux_cells, mse_roi_tokens, mse_roi_tokens_standardised or "
                                   "mse_fixed_point")
        if targets.shape[1] != recipe.latent_steps:
            raise LatentProbeError(f"{recipe.name}: {targets.shape[1]} alignment targets for "
                                   f"{recipe.latent_steps} latent steps", "match the grid to the latent steps")
    return EncodedRows(instance_ids=[inst.id for inst in instances], input_ids=input_ids, attention_mask=attention,
                       image_mask=image_mask, position_ids=position_ids, image_embeds=image_embeds,
                       continuation=continuation, continuation_mask=continuation_mask, gold_ids=gold,
                       answer_slot=torch.tensor(slots), align_targets=targets)


def standardise_tokens(image_embeds: torch.Tensor) -> torch.Tensor:
    """(N, T, D) image tokens with each dimension centred and scaled to unit variance over all N x T tokens given
    (the training set's, when training: the vision tower is frozen, so they are fixed for a dataset)."""
    flat = image_embeds.reshape(-1, image_embeds.shape[-1])
    return (image_embeds - flat.mean(0)) / flat.std(0).clamp(min=1e-6)


def fixed_point(dim: int, seed: int = 0) -> torch.Tensor:
    """The collapsed organism's target: a seeded direction scaled to norm sqrt(D), the norm of a final-RMSNorm
    state with unit gain."""
    direction = torch.randn(dim, generator=torch.Generator().manual_seed(seed))
    return direction / direction.norm() * dim ** 0.5


# ------------------------------------------------------------------------------------------------- losses
def organism_unroll(subject: Subject, recipe: OrganismRecipe, rows: EncodedRows, decoder: LatentDecoder | None = None):
    decoder = decoder or LatentDecoder(subject)
    proto = subject.resolved_protocol
    return unroll(decoder, rows, n_latent=recipe.latent_steps if proto is not None else 0,
                  answer_mask=proto.answer_mask if proto is not None else None,
                  end_id=proto.end_id if proto is not None else None,
                  start_id=proto.start_id if proto is not None and recipe.opens_latent else None)


def losses(subject: Subject, recipe: OrganismRecipe, rows: EncodedRows, out, align: bool) -> dict[str, torch.Tensor]:
    """The recipe's loss terms for one unrolled batch."""
    import torch.nn.functional as F

    mask = rows.continuation_mask
    weights = mask.float()
    weights[torch.arange(len(rows)), rows.answer_slot] = recipe.answer_weight
    token_ce = F.cross_entropy(out.logits.transpose(1, 2), rows.continuation, reduction="none")
    terms = {"answer_ce": (token_ce * weights).sum() / weights.sum()}
    proto = subject.resolved_protocol
    if recipe.stop_loss:  # end_token rule: keep going (pad) for K decisions, then emit the end token
        logits = subject.model.lm_head(out.decision_hidden).float()
        targets = torch.full(logits.shape[:2], proto.pad_id, dtype=torch.long)
        targets[:, -1] = proto.end_id
        terms["stop_ce"] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    if out.open_logits is not None:  # the model opens latent mode itself: its start token after the prompt
        target = torch.full((len(rows),), proto.start_id, dtype=torch.long, device=out.open_logits.device)
        terms["open_ce"] = F.cross_entropy(out.open_logits, target)
    if align and recipe.align:
        steps = list(recipe.align_steps) if recipe.align_steps is not None else slice(None)
        latents, targets = out.latents[:, steps], rows.align_targets[:, steps]
        if recipe.align == "cosine_aux_cells":
            terms["align_cos"] = recipe.align_weight * (1 - F.cosine_similarity(latents, targets, dim=-1)).mean()
        else:
            terms["align_mse"] = recipe.align_weight * F.mse_loss(latents, targets)
    return terms


@torch.no_grad()
def own_eval(subject: Subject, recipe: OrganismRecipe, rows: EncodedRows, batch_size: int = 100) -> dict[str, Any]:
    """The training code's evaluation: greedy letter at the answer slot of the unrolled decode (teacher-forced
    imagination for a text organism). Returns accuracy and the per-instance predicted letter ids."""
    decoder = LatentDecoder(subject)
    predictions = []
    for start in range(0, len(rows), batch_size):
        part = rows.select(torch.arange(start, min(start + batch_size, len(rows))))
        out = organism_unroll(subject, recipe, part, decoder)
        predictions.append(out.answer_logits(part.answer_slot).argmax(-1))
    predicted = torch.cat(predictions)
    return {"accuracy": float((predicted == rows.gold_ids).float().mean()), "predicted_ids": predicted.tolist(),
            "instance_ids": list(rows.instance_ids)}


# ----------------------------------------------------------------------------------------------- training
def optimisation_step(optimiser, params, terms: dict, step: int, steps: int, history: list) -> torch.Tensor:
    """One step on the sum of the loss ``terms`` (gradients clipped to norm 1), logged every 50 steps and at the
    last; shared by the image and the text organisms."""
    loss = sum(terms.values())
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimiser.step()
    if step % 50 == 0 or step == steps - 1:
        history.append({"step": step, "loss": float(loss.detach()), **{k: float(v.detach()) for k, v in terms.items()}})
    return loss


def _learning_rate(step: int, total: int, peak: float, warmup: int = 50) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_organism(name: str, out_dir: str | Path | None = None, seed: int = 0, *, data_seed: int = 0,
                   n: int = DEFAULT_N, steps: int | None = None, batch_size: int | None = None,
                   learning_rate: float | None = None, eval_every: int = 0, evaluate_with_decoder: bool = True,
                   threads: int | None = 1, log=None, **recipe_overrides: Any) -> TrainResult:
    """Train organism ``name`` (see `latentprobe.organisms.ORGANISMS`) and, with ``out_dir``, save it there as
    ``<name>.safetensors`` + ``<name>.json``. Returns the subject and its held-out metrics.

    The held-out accuracy in the metrics is measured by latentprobe's own `LatentDecoder` on the task's test
    split (``test_accuracy``); ``own_eval_accuracy`` is the training code's unrolled evaluation of the same
    instances (equal for latent organisms and the direct one; teacher-forced for the text organism).

    ``threads`` sets torch's intra-op threads for the call (restored afterwards): at these sizes every op is
    tiny, and one thread is both fastest (no thread handoffs; on a shared machine several times faster) and
    what makes the weights reproducible across machines with different core counts. None keeps torch's setting.
    Further keyword arguments replace fields of the organism's recipe (e.g. ``hidden_size=128``) for experiments.
    """
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train(name, out_dir, seed, data_seed, n, steps, batch_size, learning_rate, eval_every,
                      evaluate_with_decoder, log, recipe_overrides)
    finally:
        torch.set_num_threads(previous_threads)


def _train(name, out_dir, seed, data_seed, n, steps, batch_size, learning_rate, eval_every, evaluate_with_decoder,
           log, recipe_overrides) -> TrainResult:
    import dataclasses

    recipe = dataclasses.replace(get_recipe(name), **recipe_overrides)
    steps = recipe.steps if steps is None else steps
    batch_size = batch_size or recipe.batch_size
    learning_rate = learning_rate or recipe.learning_rate
    say = log or (lambda message: None)
    began = time.perf_counter()
    data = organism_data(recipe, data_seed=data_seed, n=n)
    train_instances = load_jsonl(data, split="train")
    test_instances = load_jsonl(data, split="test")

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        subject = fresh_subject(recipe, seed=seed)
        model = subject.model
        model.model.visual.requires_grad_(False)  # the vision tower stays at its seeded random initialisation
        train_rows = encode_rows(subject, recipe, train_instances)
        test_rows = encode_rows(subject, recipe, test_instances)
        say(f"{name}: encoded {len(train_rows)} train / {len(test_rows)} test rows "
            f"in {time.perf_counter() - began:.1f}s")
        params = [p for p in model.parameters() if p.requires_grad]
        optimiser = torch.optim.AdamW(params, lr=learning_rate, betas=(0.9, 0.98), weight_decay=0.01)
        order_gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(train_rows), generator=order_gen)
        cursor = 0
        decoder = LatentDecoder(subject)
        history = []
        align_until = int(steps * recipe.align_fraction) if recipe.align else 0
        model.train()
        for step in range(steps):
            if cursor + batch_size > len(order):
                order, cursor = torch.randperm(len(train_rows), generator=order_gen), 0
            rows = train_rows.select(order[cursor:cursor + batch_size])
            cursor += batch_size
            for group in optimiser.param_groups:
                group["lr"] = _learning_rate(step, steps, learning_rate)
            out = organism_unroll(subject, recipe, rows, decoder)
            terms = losses(subject, recipe, rows, out, align=step < align_until)
            loss = optimisation_step(optimiser, params, terms, step, steps, history)
            if eval_every and (step + 1) % eval_every == 0:
                model.eval()
                acc = own_eval(subject, recipe, test_rows)["accuracy"]
                model.train()
                history[-1]["test_accuracy_own"] = acc
                say(f"{name}: step {step + 1} loss {float(loss.detach()):.3f} own test acc {acc:.3f} "
                    f"({time.perf_counter() - began:.0f}s)")
        model.eval()
    train_seconds = time.perf_counter() - began
    metrics: dict[str, Any] = {
        "organism": name, "subject": recipe.subject_name, "task": recipe.task, "seed": seed, "data_seed": data_seed,
        "n_train": len(train_rows), "n_test": len(test_rows), "chance": 1.0 / len(test_instances[0].options),
        "steps": steps, "batch_size": batch_size, "learning_rate": learning_rate,
        "train_seconds": round(train_seconds, 1), "torch_threads": torch.get_num_threads(),
        "own_eval_accuracy": own_eval(subject, recipe, test_rows)["accuracy"],
        "final_loss": history[-1]["loss"] if history else None,
        "recipe": {k: v for k, v in dataclasses.asdict(recipe).items() if k != "protocol"}
        | {"protocol": recipe.protocol.name if recipe.protocol else None},
    }
    if evaluate_with_decoder:
        from .evaluation import decoder_accuracy

        metrics.update(decoder_accuracy(subject, test_instances))
    metrics["call_seconds"] = round(time.perf_counter() - began, 1)  # training + both evaluations
    # What bit-identical retraining needs (see the module docstring): the same torch and thread count.
    metrics["torch_version"], metrics["torch_threads"] = torch.__version__, torch.get_num_threads()
    folder = None
    if out_dir is not None:
        from .shipping import save_organism, update_metrics

        folder = save_organism(subject, recipe, out_dir, training=metrics | {"history": history})
        metrics["weights_bytes"] = (Path(folder) / f"{name}.safetensors").stat().st_size
        update_metrics(folder, name, training=metrics)
    say(f"{name}: done in {train_seconds:.0f}s: " + ", ".join(
        f"{k}={metrics[k]}" for k in ("own_eval_accuracy", "test_accuracy") if k in metrics))
    return TrainResult(subject=subject, recipe=recipe, folder=folder, metrics=metrics, history=history)
