"""The decodability gap of a traced run (arXiv 2606.05753): probe the gold option from the states at every latent
step and from the states right after the latent phase (the answer region's first positions), at every recorded
layer, and say where the answer becomes decodable. The statistics are `latentprobe.stats.decodability`'s.

    latentprobe trace --subject organism-bottleneck --layers all --answer-states --out runs/t
    latentprobe decodability runs/t --out runs/decodability

The trace must hold answer-region states (``--answer-states``). Instances that never entered latent mode are
left out; every probed latent step is one that all remaining instances reached (``max_steps`` caps it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import LatentProbeError
from ..fileio import atomic_write
from ..runs.store import TraceStore
from ..stats.decodability import decodability


def _whole(value, what: str, minimum: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise LatentProbeError(f"{what} must be a whole number >= {minimum}, got {value!r}",
                               f"pass e.g. {what.split()[0]}={max(minimum, 1)}")
    return int(value)


def decodability_study(run_dir: str | Path, out_dir: str | Path | None = None, *, answer_positions: int = 1,
                       max_steps: int | None = None, layers=None, n_splits: int = 5, seed: int = 0,
                       n_boot: int = 2000) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Cells and gap tables for the clean records of ``run_dir`` (written as ``decodability.csv`` and
    ``decodability_gap.csv`` into ``out_dir`` when given). Bad arguments are refused before any state is read."""
    answer_positions = _whole(answer_positions, "answer_positions", 1)
    max_steps = _whole(max_steps, "max_steps", 1)
    store = TraceStore(run_dir)
    record = store.manifest.get("record", {})
    if not record.get("answer"):
        raise LatentProbeError(f"{run_dir} was traced without answer-region states",
                               "re-run `latentprobe trace` with --answer-states")
    recorded = store.layer_ids
    layers = recorded if layers is None else [int(layer) for layer in layers]
    missing = [layer for layer in layers if layer not in recorded]
    if missing:
        raise LatentProbeError(f"layer(s) {missing} were not recorded in {run_dir} (recorded: {recorded})",
                               "pick recorded layers or re-trace with --layers")
    frame = store.records()
    if "intervention" in frame.columns:
        frame = frame[frame.intervention.isin(["clean", "none"]) | frame.intervention.isna()]
    frame = frame[frame.n_latent_steps > 0].drop_duplicates("instance_id")
    if len(frame) < 4:
        raise LatentProbeError(f"{run_dir}: {len(frame)} instance(s) entered latent mode; probes need more",
                               "trace more instances (a few dozen at least)")
    steps = int(frame.n_latent_steps.min()) if max_steps is None else min(max_steps, int(frame.n_latent_steps.min()))
    ids = list(frame.record_id)
    features = {}
    for layer in layers:
        for k in range(steps):
            features[("latent", k, layer)] = store.site_array(ids, f"latent[{k}].layer[{layer}]")
        for j in range(answer_positions):
            features[("after", j, layer)] = store.site_array(ids, f"answer[{j}].layer[{layer}]")
    lacking = [key for key, array in features.items() if key[0] == "after" and np.isnan(array).any()]
    if lacking:
        raise LatentProbeError(f"some instances have fewer than {answer_positions} answer-region position(s)",
                               "lower --answer-positions")
    subject = store.manifest.get("subject_name", Path(run_dir).name)
    cells, gap = decodability(features, frame.gold_answer.astype(str).to_numpy(), frame.instance_id.to_numpy(),
                              subject=subject, n_splits=n_splits, seed=seed, n_boot=n_boot)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, table in (("decodability", cells), ("decodability_gap", gap)):
            atomic_write(out / f"{name}.csv", lambda tmp, t=table: t.to_csv(tmp, index=False))
    return cells, gap
