"""The ground-truth check: run latentprobe's own interventions on an organism and read off the effects whose
sign the organism's construction fixes (bottleneck: the latents matter; shortcut: they do not)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..data.instances import Instance


def ground_truth_checks(subject, instances: Sequence[Instance], out_dir: str | Path, *, noise_scale: float = 3.0,
                        seed: int = 0, n_boot: int = 1000, batch_size: int = 50) -> dict[str, Any]:
    """Latent noise (``noise_scale`` x per-dimension std, all steps), a constant latent (the dataset mean, all
    steps), an image swap with its mediation runs, and for a text mediator a swap of the imagination text.

    Returns the clean accuracy, the accuracy and flip rate under each latent or text edit, and TE / NDE / NIE on
    correctness under the image swap, each as ``{estimate, ci_low, ci_high}`` (paired bootstrap)."""
    from ..runs.intervene import intervene
    from ..interventions import ImageSwap, LatentConstant, LatentNoise, TextSwap

    interventions = [ImageSwap(seed=seed)]
    if subject.protocol is not None:
        interventions = [LatentNoise(scale=noise_scale, relative_to="std", seed=seed),
                         LatentConstant(value="mean", seed=seed)] + interventions
    if subject.mediator == "text":
        interventions.append(TextSwap(seed=seed))
    summary = intervene(subject, list(instances), interventions, out_dir, batch_size=batch_size, seed=seed,
                        n_boot=n_boot)
    table = summary.table
    out: dict[str, Any] = {"n": len(instances), "noise_scale": noise_scale, "failed": summary.n_failed}

    def cell(intervention: str, metric: str) -> dict[str, float] | None:
        rows = table[(table.intervention == intervention) & (table.metric == metric)]
        if rows.empty:
            return None
        row = rows.iloc[0]
        return {"estimate": float(row.estimate), "ci_low": float(row.ci_low), "ci_high": float(row.ci_high)}

    names = {iv.kind.replace("-", "_") if iv.kind != "constant" else "constant_mean": iv.name
             for iv in interventions}
    first = next(iter(names.values()))
    out["accuracy_clean"] = cell(first, "accuracy_clean")["estimate"]
    for key, name in names.items():
        if key == "image_swap":
            for metric in ("TE_correct", "NDE_correct", "NIE_correct"):
                out[f"image_swap_{metric}"] = cell(name, metric)
            out["image_swap_accuracy"] = cell(name, "accuracy_intervened")["estimate"]
        else:
            out[f"{key}_accuracy"] = cell(name, "accuracy_intervened")["estimate"]
            out[f"{key}_flip_rate"] = cell(name, "flip_rate")["estimate"]
    return out
