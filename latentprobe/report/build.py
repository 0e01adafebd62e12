"""From trace folders to the analyses' tables and figures. Reads stores only; never runs a model.

    collapse_study(run_dirs, out)   similarity tables + heatmaps/curves per subject, and a cross-subject figure
    probe_study(run_dir, attrs, out) probe tables (latent states vs image-token / prompt baselines) + figures
    effect_tables(run_dirs)          the effects summaries written by `intervene`, in the report's tidy schema
    build_report(run_dirs, out)      all of the above into one Markdown + HTML report
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from . import figures as fig
from ..errors import LatentProbeError
from ..fileio import atomic_write
from ..stats.probes import probe_table
from ..stats.similarity import inter_instance_similarity, intra_instance_similarity, similarity_table
from ..runs.store import TraceStore

log = logging.getLogger(__name__)


def clean_records(store: TraceStore) -> pd.DataFrame:
    """The un-intervened, successful records of a trace or intervention run."""
    frame = store.records()
    if "intervention" in frame.columns:
        frame = frame[frame.intervention.isin(["clean", "none"]) | frame.intervention.isna()]
    return frame


def _latent_records(store: TraceStore) -> pd.DataFrame:
    frame = clean_records(store)
    frame = frame[frame.n_latent_steps > 0]
    if len(frame) < 2:
        raise LatentProbeError(f"{store.run_dir}: fewer than 2 instances entered latent mode",
                               "trace more instances, or a subject whose protocol enters latent mode")
    return frame


def collapse_study(run_dirs: Sequence[str | Path], out_dir: str | Path, *, seed: int = 0,
                   n_boot: int = 1000, floor_runs: Sequence[str | Path] = ()) -> tuple[pd.DataFrame, dict[str, list[Path]]]:
    """Collapse of latent vectors across instances, per step, against image-token and prompt baselines.

    Returns the concatenated :func:`latentprobe.stats.similarity.similarity_table` of every run (the relative spread,
    the spread ratio that :func:`latentprobe.verdicts.collapse.verdict_collapse` reads, and the cosine views)
    and the figures made. Latents are the fed-back vectors; the baselines are the last recorded layer's
    image-token mean and last prompt token of the same instances. Where the trace recorded every image token
    (``--image-states all``), one token per instance (seeded) is the single-token yardstick and all of them the
    whitening pool; a latent placebo in ``floor_runs`` (intervention runs of the same subject) gives the noise
    floor (issue 18)."""
    out_dir = Path(out_dir)
    tables, made = [], {"collapse": []}
    for run_dir in run_dirs:
        store = TraceStore(run_dir)
        subject = store.manifest.get("subject_name", Path(run_dir).name)
        frame = _latent_records(store)
        latents = store.latent_array(frame.record_id)
        baselines = {}
        for name in ("image_mean", "prompt_last"):
            if all(name in tensors for tensors in frame.tensors):
                baselines[name] = store.state_array(frame.record_id, name)
        single, pool = _single_image_tokens(store, frame, seed)
        floor = _latent_placebo_floor(floor_runs, subject, list(frame.instance_id), latents.shape[1])
        table = similarity_table(latents, baselines, subject, seed=seed, n_boot=n_boot,
                                 single_tokens={"image_token": single} if single is not None else None,
                                 token_pool=pool, floor=floor)
        tables.append(table)
        stem = out_dir / _safe(subject)
        # The paper's view: raw cosine between instances per step. The verdict reads the spread rows instead.
        made["collapse"] += fig.plot_similarity_heatmaps(inter_instance_similarity(latents), f"{stem}-heatmaps-raw",
                                                         title=f"{subject}: raw cosine similarity between instances")
        made["collapse"] += fig.plot_similarity_by_step(table, f"{stem}-similarity-by-step", subject=subject)
        made["collapse"] += fig.plot_intra_instance_heatmap(intra_instance_similarity(latents), f"{stem}-intra",
                                                            title=f"{subject}: similarity between latent steps")
    combined = pd.concat(tables, ignore_index=True)
    if combined.subject.nunique() > 1:
        made["collapse"] += fig.plot_subject_comparison(combined, out_dir / "subjects-similarity")
    _write_table(combined, out_dir / "similarity")
    return combined, made


def _single_image_tokens(store: TraceStore, frame: pd.DataFrame, seed: int, max_pool: int = 20000):
    """One image token per instance (a seeded random position) at the last recorded layer, and a pool of the
    layer's image tokens for whitening; (None, None) when the trace kept only the image-token mean."""
    if not all("image_tokens" in tensors for tensors in frame.tensors):
        return None, None
    rng = np.random.default_rng([seed, 18])
    position = store.layer_position(None)
    single, pool = [], []
    for record_id in frame.record_id:
        tokens = store.tensor(record_id, "image_tokens")[position].float().numpy()
        single.append(tokens[rng.integers(len(tokens))])
        pool.append(tokens)
    pool = np.concatenate(pool)
    if len(pool) > max_pool:
        pool = pool[rng.choice(len(pool), max_pool, replace=False)]
    return np.stack(single).astype(np.float64), pool.astype(np.float64)


def _latent_placebo_floor(run_dirs, subject: str, instance_ids: list, steps: int):
    """Per instance and step, the squared distance between the clean fed-back latents and those of a latent
    placebo (an intervention named ``...placebo...`` on target latent) in an intervention run of ``subject``;
    None when no such run covers every instance."""
    for run_dir in run_dirs:
        store = TraceStore(run_dir)
        if store.manifest.get("subject_name") != subject:
            continue
        records = store.records()
        if "intervention" not in records.columns:
            continue
        if "target" not in records.columns:
            continue
        placebo = records[(records.target == "latent") & records.intervention.astype(str).str.contains("placebo")]
        clean = records[records.intervention == "clean"]
        placebo = placebo.drop_duplicates("instance_id").set_index("instance_id")
        clean = clean.drop_duplicates("instance_id").set_index("instance_id")
        if not all(i in placebo.index and i in clean.index for i in instance_ids):
            continue
        floor = np.full((len(instance_ids), steps), np.nan)
        for row, instance in enumerate(instance_ids):
            a = store.tensor(clean.loc[instance, "record_id"], "latent").float().numpy()
            b = store.tensor(placebo.loc[instance, "record_id"], "latent").float().numpy()
            k = min(len(a), len(b), steps)
            floor[row, :k] = ((a[:k] - b[:k]) ** 2).sum(axis=1)
        return floor
    return None


def _labels(frame: pd.DataFrame, attribute: str) -> np.ndarray:
    if "answer" == attribute and "gold_answer" in frame.columns:
        return frame.gold_answer.astype(str).to_numpy()
    values = frame.attributes.map(lambda a: (a or {}).get(attribute) if isinstance(a, dict) else None)
    if values.isna().all():
        available = sorted({k for a in frame.attributes if isinstance(a, dict) for k in a})
        raise LatentProbeError(f"attribute {attribute!r} is not in the data",
                               f"choose from {', '.join(available) or '(no attributes recorded)'} or 'answer'")
    if values.isna().any():
        raise LatentProbeError(f"attribute {attribute!r} is missing for {int(values.isna().sum())} instances",
                               "probe an attribute every instance has")
    return values.map(lambda v: json.dumps(v) if isinstance(v, (list, dict)) else v).to_numpy()




def control_types(store: TraceStore, frame: pd.DataFrame, control_type: str = "auto") -> tuple[np.ndarray, str]:
    """The types of the Hewitt & Liang control task for the instances of ``frame``, and the name of what they are.

    ``control_type``: "image" (identity of the instance's image files), "question" (the question text, i.e. the
    template), "instance" (every instance its own type), an attribute name, or several joined by "+" (e.g.
    "transform+query_cell"). "auto" (the default) is the image identity where the instances have images and
    the trace's data source (``manifest['data']['source']``) can be read, else the instance.

    Memorising a type is only detectable when the type recurs across instances (HR-Bench's cycles, benchmarks
    that ask several questions per image). Where every image is shown once, the per-image control cannot be
    learned across folds and measures the probe's chance level on labels unrelated to the states; "question"
    then is the stricter check, penalising states that encode the question template (see the README).
    """
    if control_type == "instance":
        return frame.instance_id.astype(str).to_numpy(), "instance"
    if control_type in ("auto", "image", "question"):
        by_id = _instances_by_id(store, required=control_type != "auto")
        if by_id is None:
            return frame.instance_id.astype(str).to_numpy(), "instance"
        image = np.array(["|".join(by_id[i].images) if i in by_id else i for i in frame.instance_id])
        question = np.array([by_id[i].question if i in by_id else i for i in frame.instance_id])
        if control_type == "auto":
            if all(i in by_id and by_id[i].images for i in frame.instance_id):
                return image, "image"
            return frame.instance_id.astype(str).to_numpy(), "instance"
        return (image if control_type == "image" else question), control_type
    parts = control_type.split("+")
    values = [_labels(frame, part) for part in parts]
    return np.array(["|".join(str(v) for v in row) for row in zip(*values)]), control_type


def _instances_by_id(store: TraceStore, required: bool):
    from ..data.loading import load_instances

    source = store.manifest.get("data", {}).get("source")
    try:
        instances, _ = load_instances(None if source in (None, "builtin") else source)
    except (LatentProbeError, OSError) as exc:
        if required:
            raise LatentProbeError(f"cannot read the trace's data source {source!r} for the control types: {exc}",
                                   "pass --control-type instance or an attribute name") from None
        log.warning("control task per instance: the data source %s cannot be read (%s)", source, exc)
        return None
    return {instance.id: instance for instance in instances}


def probe_study(run_dir: str | Path, attributes: Sequence[str], out_dir: str | Path, *, seed: int = 0,
                n_splits: int = 5, random_init_dir: str | Path | None = None,
                max_steps: int | None = None, control_type: str = "auto",
                **probe_kwargs) -> tuple[pd.DataFrame, dict[str, list[Path]]]:
    """Linear probes from latent states (every recorded layer x latent step) to instance attributes, with the
    same probes on the mean image-token state and the last prompt token (and, given a trace of a randomly
    initialised model, its latents) as baselines.

    Every representation gets one row per cell plus a nested best-cell row (see :mod:`latentprobe.stats.probes`); the
    control task's types are chosen by ``control_type`` (see :func:`control_types`). ``probe_kwargs`` go to
    :func:`latentprobe.stats.probes.run_probes` (``inner_splits``, ``alphas``, ``n_permutations``, ``n_boot``...)."""
    out_dir = Path(out_dir)
    store = TraceStore(run_dir)
    subject = store.manifest.get("subject_name", Path(run_dir).name)
    frame = _latent_records(store)
    # Probe steps every instance has, so all (layer, step) probes see the same instances.
    steps = int(frame.n_latent_steps.min()) if max_steps is None else min(max_steps, int(frame.n_latent_steps.min()))
    layer_ids = store.layer_ids
    latent_features = {}
    for layer in layer_ids:
        array = store.latent_array(frame.record_id, "latent_layers", layer=layer, max_steps=steps)
        for step in range(steps):
            latent_features[(layer, step)] = array[:, step]
    groups = frame.instance_id.to_numpy()
    types, used_type = control_types(store, frame, control_type)
    tables = []
    for attribute in attributes:
        labels = _labels(frame, attribute)
        task = "regression" if _numeric_with_many_values(labels) else "classification"
        common = dict(subject=subject, attribute=attribute, task=task, n_splits=n_splits, seed=seed, types=types,
                      control_type=used_type, **probe_kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tables.append(probe_table(latent_features, labels, groups, representation="latent", **common))
            for name in ("image_mean", "prompt_last"):
                if all(name in t for t in frame.tensors):
                    feats = {(layer, -1): store.state_array(frame.record_id, name, layer) for layer in layer_ids}
                    tables.append(probe_table(feats, labels, groups, representation=name, **common))
            if random_init_dir is not None:
                tables.append(_random_init_probes(random_init_dir, frame, labels, groups, common))
    table = pd.concat(tables, ignore_index=True)
    made = {"visual_info": []}
    stem = out_dir / _safe(subject)
    try:
        made["visual_info"] += fig.plot_probe_heatmap(table, f"{stem}-probe-heatmap")
        made["visual_info"] += fig.plot_probe_bars(table, f"{stem}-probe-bars")
    except LatentProbeError as exc:  # every probe skipped: the table says why
        log.warning("no probe figure: %s", exc)
    _write_table(table, out_dir / "probes")
    return table, made


def _random_init_probes(run_dir, frame, labels, groups, common):
    store = TraceStore(run_dir)
    other = clean_records(store).set_index("instance_id")
    ids = [i for i in frame.instance_id if i in other.index]
    if len(ids) != len(frame):
        raise LatentProbeError(f"the random-init trace {run_dir} lacks some instances of the probed trace",
                               "trace the same data with the random-init model")
    array = store.latent_array(other.loc[ids, "record_id"], "latent")
    feats = {(0, step): array[:, step] for step in range(array.shape[1]) if not np.isnan(array[:, step]).any()}
    return probe_table(feats, labels, groups, representation="random_init", **common)


def _numeric_with_many_values(labels) -> bool:
    try:
        values = np.asarray(labels, dtype=float)
    except (TypeError, ValueError):
        return False
    return len(np.unique(values)) > 10


def effect_tables(run_dirs: Sequence[str | Path]) -> pd.DataFrame | None:
    """Effects summaries (and per-step input->latent change) of intervention runs, in the report's schema."""
    frames = []
    for run_dir in run_dirs:
        run_dir = Path(run_dir)
        summary = run_dir / "effects_summary.parquet"
        if summary.exists():
            frames.append(pd.read_parquet(summary))
        change = run_dir / "latent_change.parquet"
        if change.exists():
            table = pd.read_parquet(change)
            if len(table):
                table = table.assign(target="input")
                keep = ["subject", "target", "intervention", "metric", "estimate", "ci_low", "ci_high", "n", "step"]
                keep += [c for c in ("p_value", "interval", "confidence", "floor", "spread", "spread_source",
                                     "one_minus_cosine", "collapsed", "move") if c in table.columns]
                frames.append(table[keep])
    if not frames:
        return None
    return pd.concat(frames, ignore_index=True)


def build_report(run_dirs: Sequence[str | Path], out_dir: str | Path, *, attributes: Sequence[str] = (),
                 seed: int = 0, n_boot: int = 1000, title: str | None = None,
                 probe_kwargs: dict | None = None, margins=None) -> tuple[Path, Path]:
    """Everything measured in ``run_dirs`` (traces and intervention runs) into report.md and report.html, with
    verdicts.csv (one decision per subject x finding, columns ``verdicts.VERDICT_COLUMNS``) and
    verdict-rows.csv (every row each verdict combined, with its own decision)."""
    from .render import report_verdicts, write_report
    from ..verdicts import Margins, evidence_rows, verdict_table

    margins = Margins() if margins is None else margins

    out_dir = Path(out_dir)
    figure_dir = out_dir / "figures"
    stores = [TraceStore(d) for d in run_dirs]
    subjects, seen = [], set()
    for store in stores:
        name = store.manifest.get("subject_name")
        if name not in seen:
            seen.add(name)
            described = store.manifest.get("subject", {})
            subjects.append({"name": name, "checkpoint": store.manifest.get("checkpoint", ""),
                             "protocol": _protocol_summary(store.manifest.get("protocol")),
                             "description": described.get("description", "")})
    figures: dict[str, list[Path]] = {}
    # Collapse and probes from one clean trace per subject: its first run in which latents were used.
    first_with_latents: dict[str, str] = {}
    for run_dir, store in zip(run_dirs, stores):
        name = store.manifest.get("subject_name")
        if name not in first_with_latents and _has_latents(store):
            first_with_latents[name] = str(run_dir)
    usable = list(first_with_latents.values())
    similarity = probes = None
    if usable:
        similarity, made = collapse_study(usable, figure_dir, seed=seed, n_boot=n_boot, floor_runs=run_dirs)
        _merge(figures, made)
        if attributes:
            tables = []
            for run_dir in usable:
                table, made = probe_study(run_dir, attributes, figure_dir, seed=seed, **(probe_kwargs or {}))
                tables.append(table)
                _merge(figures, made)
            probes = pd.concat(tables, ignore_index=True)
            _write_table(probes, figure_dir / "probes")  # every subject's rows (each study wrote only its own)
    effects = effect_tables(run_dirs)
    if effects is not None and len(effects):
        if effects.target.isin(["latent", "text"]).any() or (effects.metric == "NIE_correct").any():
            figures.setdefault("latent_answer", []).extend(fig.plot_effects_forest(
                effects, figure_dir / "effects-latent-answer", metrics=["flip_rate", "accuracy_change", "NIE_correct"],
                reference_lines={"flip_rate": margins.answer_change}))
        if "step" in effects.columns and effects.step.notna().any():
            figures.setdefault("input_latent", []).extend(fig.plot_effects_forest(
                effects, figure_dir / "effects-input-latent", metrics=["change_ratio"],
                reference_lines={"change_ratio": margins.change_ratio}))
    completeness = [s.completeness() for s in stores]  # reads each store's index once
    data = {"runs": [str(d) for d in run_dirs],
            "sources": sorted({str(s.manifest.get("data", {}).get("source")) for s in stores}),
            # the instances actually on disk (an interrupted run holds fewer than its manifest asked for)
            "instances": int(max(c["present"] for c in completeness))}
    incomplete = [w for c in completeness for w in c["warnings"]]
    for warning in incomplete:
        log.warning(warning)
    if incomplete:
        data["WARNING: incomplete runs"] = " ".join(incomplete)
    kwargs = {"title": title} if title else {}
    judged = report_verdicts(subjects, effects, similarity, probes, margins)  # once, for the report and the tables
    md, html = write_report(out_dir, subjects=subjects, data=data, effects=effects, similarity=similarity,
                            probes=probes, figures=figures, margins=margins, judged=judged, **kwargs)
    _write_table(verdict_table(judged), out_dir / "verdicts")
    rows = evidence_rows(judged)
    if len(rows):
        _write_table(rows, out_dir / "verdict-rows")
    return md, html


def _has_latents(store: TraceStore) -> bool:
    frame = clean_records(store)
    return bool(len(frame)) and int((frame.n_latent_steps > 0).sum()) >= 2


def _protocol_summary(protocol) -> str:
    if not protocol:
        return "none (no latent mode)"
    rule = "fixed K" if protocol["stop_rule"] == "fixed" else "end token, cap"
    mask = f"; answer mask {protocol['answer_mask']}" if protocol.get("answer_mask") else ""
    return f"{protocol['name']}: {rule} = {protocol['num_steps']}{mask}"


def _merge(into: dict[str, list[Path]], made: dict[str, list[Path]]):
    for key, paths in made.items():
        into.setdefault(key, []).extend(paths)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))


def _write_table(frame: pd.DataFrame, stem: Path):
    stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(stem.with_suffix(".csv"), lambda tmp: frame.to_csv(tmp, index=False))
    atomic_write(stem.with_suffix(".parquet"), lambda tmp: frame.to_parquet(tmp, index=False))


def plan_runs(run_dirs: Sequence[str | Path], margins=None) -> pd.DataFrame:
    """`latentprobe.verdicts.planning.plan_table` of the effects written in ``run_dirs`` (folders of ``intervene``
    runs): the instances each finding needs, read from the run folders."""
    from ..verdicts import Margins
    from ..verdicts.planning import plan_table

    missing = [str(d) for d in run_dirs if not Path(d).is_dir()]
    if missing:
        raise LatentProbeError(f"run folder(s) not found: {', '.join(missing)}", "pass folders written by intervene")
    effects = effect_tables(run_dirs)
    if effects is None or effects.empty:
        raise LatentProbeError(f"no effects tables in {', '.join(map(str, run_dirs))}",
                               "plan from a run of `latentprobe intervene` (or a demo's runs/*-intervene folder)")
    return plan_table(effects, margins if margins is not None else Margins())
