"""Run the step x step influence map (statistics in `latentprobe.stats.step_influence`): for every latent step i,
edit the fed-back vector at step i with the later steps recomputed, and record how far every latent step moves
and whether the answer changes; one placebo edit (the same decode path, nothing changed) gives the noise floor.

A first pass decodes the clean runs (the reference latents, the donors and the spreads); then the K + 1 variants
of a batch are decoded side by side from one prefill of the clean prompt (one prefill plus one batched decode per
batch, as the other latent edits), so memory stays that of one batch. Edits (``kind``): ``patch`` (default; the donor instance's
clean latent at step i, the donor a seeded derangement), ``noise`` (``scale`` x the clean latents' per-dimension
std) or ``mean`` (the step's dataset mean, ``mean-step``). A patch whose donor lacks step i is recorded not
applied for that cell. Instances are kept whole: the rows name subject, kind, seed and instance.

    latentprobe step-influence --subject organism-bottleneck --out runs/steps [--kind patch|noise|mean]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..errors import LatentProbeError
from ..fileio import atomic_write
from ..interventions import LatentFunction, LatentNoise, LatentPatch, LatentStats, RowBinding, StepMean, derangement
from ..interventions.base import MAX_NOISE_SCALE, checked_scale
from ..interventions.controls import step_means
from ..model.decoding import DecodeConfig, LatentDecoder
from ..runs.common import row_record
from ..stats.effects import answer_flipped
from ..stats.step_influence import ANSWER, influence_map, relative_sq_change, step_spread

KINDS = ("patch", "noise", "mean")


def _edit(kind: str, step: int, scale: float, seed: int):
    if kind == "patch":
        return LatentPatch(steps=[step], semantics="recompute", seed=seed)
    if kind == "noise":
        return LatentNoise(scale=scale, relative_to="std", steps=[step], semantics="recompute", seed=seed)
    return StepMean(steps=[step], semantics="recompute", seed=seed)


def check_step_influence(subject, instances, kind: str, scale: float, config: DecodeConfig) -> int:
    """Refuse what cannot run, before any model runs; returns the number of latent steps K."""
    if kind not in KINDS:
        raise LatentProbeError(f"unknown step-influence edit {kind!r}", f"choose from {', '.join(KINDS)}")
    checked_scale("noise scale", scale, 0.0, MAX_NOISE_SCALE, "e.g. --scale 3")
    if subject.protocol is None:
        raise LatentProbeError(f"subject {subject.name} does not reason in latent space",
                               "use a latent subject (monet, lvr, mirage, the latent organisms)")
    steps = config.latent_steps if config.latent_steps is not None else subject.protocol.num_steps
    if steps < 2:
        raise LatentProbeError(f"a step x step map needs at least 2 latent steps; the run has {steps}",
                               "raise --latent-steps")
    if len(instances) < 3:
        raise LatentProbeError(f"{len(instances)} instance(s): the map needs at least 3 (donors and a spread)",
                               "run on more instances")
    return steps


@torch.no_grad()
def step_influence(subject, instances, out_dir: str | Path | None = None, *, kind: str = "patch", scale: float = 3.0,
                   config: DecodeConfig | None = None, batch_size: int = 8, seed: int = 0,
                   n_boot: int = 2000) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-instance rows and the influence map (written as ``step_influence_rows.csv`` and ``step_influence.csv``
    into ``out_dir`` when given)."""
    config = config or DecodeConfig(max_new_tokens=subject.max_new_tokens, seed=seed)
    instances = list(instances)
    n_steps = check_step_influence(subject, instances, kind, scale, config)
    decoder = LatentDecoder(subject, config)
    clean_rows = {}
    chunks = [instances[start:start + batch_size] for start in range(0, len(instances), batch_size)]
    for chunk in chunks:  # first pass: the clean latents every edit is measured against (and donors, spreads)
        result = decoder.run(subject.encode(chunk))
        for inst, row in zip(chunk, result.rows):
            if not row.failed:
                clean_rows[inst.id] = (row.latent_vectors.float(), row_record(subject, inst, row)["parsed_answer"])
    latents = [v[0] for v in clean_rows.values() if len(v[0])]
    if len(latents) < 3:
        raise LatentProbeError("fewer than 3 instances entered latent mode in the clean run",
                               "check the subject's protocol, or run on more instances")
    stats = LatentStats.from_vectors(torch.cat(latents))
    stats.step_means = step_means(latents, n_steps)
    spread = step_spread([x.numpy() for x in latents], n_steps)
    donors = derangement(len(instances), seed)
    donor_of = {inst.id: instances[d].id for inst, d in zip(instances, donors)}
    placebo = LatentFunction(lambda vectors, steps: vectors, name="placebo")
    variants = [placebo] + [_edit(kind, i, scale, seed) for i in range(n_steps)]
    out = []
    for chunk in chunks:  # second pass: the K edits and the placebo side by side from one prefill per batch
        ok = [inst for inst in chunk if inst.id in clean_rows]
        if not ok:
            continue
        prefill = decoder.prefill(subject.encode(ok))
        edits = []
        for inst in ok:
            donor = clean_rows.get(donor_of[inst.id])
            for iv in variants:
                edits.append(iv.bind(RowBinding(inst.id, clean=clean_rows[inst.id][0],
                                                donor=None if donor is None else donor[0], stats=stats)))
        result = decoder.decode(prefill, edits, repeats=len(variants), streams=[0] * len(variants))
        for k, row in enumerate(result.rows):
            inst, source = ok[k // len(variants)], k % len(variants) - 1
            clean_latents, clean_answer = clean_rows[inst.id]
            reason = None if source < 0 else edits[k].not_applied_reason(row.n_latent_steps)
            applied = reason is None and not row.failed
            edited = row.latent_vectors.float().numpy()
            for j in range(n_steps):
                value = relative_sq_change(clean_latents[j].numpy() if j < len(clean_latents) else None,
                                           edited[j] if j < len(edited) else None, spread[j])
                out.append(dict(subject=subject.name, instance_id=inst.id, kind=kind, source_step=source,
                                target=str(j), value=value, applied=applied, seed=seed))
            answer = row_record(subject, inst, row)["parsed_answer"] if not row.failed else None
            out.append(dict(subject=subject.name, instance_id=inst.id, kind=kind, source_step=source, target=ANSWER,
                            value=float(answer_flipped(clean_answer, answer)) if not row.failed else np.nan,
                            applied=applied, seed=seed))
    rows = pd.DataFrame(out)
    table = influence_map(rows, n_boot=n_boot, seed=seed)
    if out_dir is not None:
        folder = Path(out_dir)
        for name, frame in (("step_influence_rows", rows), ("step_influence", table)):
            atomic_write(folder / f"{name}.csv", lambda tmp, f=frame: f.to_csv(tmp, index=False))
    return rows, table
