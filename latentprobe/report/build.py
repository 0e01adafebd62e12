"""From run folders to the analyses' tables and figures. Reads run folders only; never runs a model.

    run_kind(run_dir)                which command wrote a folder: trace, intervene, patch, ground or lens
    collapse_study(run_dirs, out)    similarity tables + heatmaps/curves per subject, and a cross-subject figure
    probe_study(run_dir, attrs, out) probe tables (latent states vs image-token / prompt baselines) + figures
    effect_tables(run_dirs)          the effects summaries written by `intervene`, in the report's tidy schema
    build_report(run_dirs, out)      all of the above, and the where-and-when runs, into one Markdown + HTML report
"""

from __future__ import annotations

import functools
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from . import figures as fig
from ..errors import LatentProbeError
from ..fileio import atomic_write, safe_name
from ..stats.image_readout import pool_tokens, pooling_plan
from ..stats.parallel import map_in_processes
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
    # one order whatever wrote the store (a single process or interleaved torchrun ranks): the seeded choices
    # below (a single image token per instance, the halves of the collapse split, bootstrap draws) follow it
    frame = frame.sort_values("instance_id", kind="stable").reset_index(drop=True)
    if len(frame) < 2:
        raise LatentProbeError(f"{store.run_dir}: fewer than 2 instances entered latent mode",
                               "trace more instances, or a subject whose protocol enters latent mode")
    return frame


def collapse_study(run_dirs: Sequence[str | Path], out_dir: str | Path, *, seed: int = 0,
                   n_boot: int = 1000, floor_runs: Sequence[str | Path] = (),
                   margin: float | None = None) -> tuple[pd.DataFrame, dict[str, list]]:
    """Collapse of latent vectors across instances, per step, against image-token and prompt baselines.

    Returns the concatenated :func:`latentprobe.stats.similarity.similarity_table` of every run (the relative spread,
    the spread ratio that :func:`latentprobe.verdicts.collapse.verdict_collapse` reads, and the cosine views)
    and the figures made. Latents are the fed-back vectors; the baselines are the last recorded layer's
    image-token mean and last prompt token of the same instances. Where the trace recorded every image token
    (``--image-states all``), one token per instance (seeded) is the single-token yardstick and all of them the
    whitening pool; a latent placebo in ``floor_runs`` (intervention runs of the same subject) gives the noise
    floor (issue 18).

    Figures: ``made["collapse"]`` is the figure the verdict reads (every subject's spread ratio per step, with
    ``margin`` drawn), as (path, caption); ``made["appendix"]`` the per-subject views (raw cosine heatmaps, the
    curves by step, the similarity between steps)."""
    tables, made = [], {"collapse": [], "appendix": []}
    for run_dir in run_dirs:
        table, appendix = subject_collapse(run_dir, out_dir, seed=seed, n_boot=n_boot, floor_runs=floor_runs)
        tables.append(table)
        made["appendix"] += appendix
    made["collapse"] = collapse_comparison(tables, out_dir, margin)
    return pd.concat(tables, ignore_index=True), made


def subject_collapse(run_dir: str | Path, out_dir: str | Path, *, seed: int = 0, n_boot: int = 1000,
                     floor_runs: Sequence[str | Path] = ()) -> tuple[pd.DataFrame, list]:
    """One subject's part of `collapse_study`: its similarity table and its appendix figures (path, caption)."""
    out_dir = Path(out_dir)
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
    stem = out_dir / _safe(subject)
    # The paper's view: raw cosine between instances per step. The verdict reads the spread rows instead.
    appendix = [(fig.plot_similarity_by_step(table, f"{stem}-similarity-by-step", subject=subject)[0],
                 f"{subject}: raw cosine between instances and relative spread per latent step, "
                 "against the image-token and prompt baselines (95% bootstrap bands)."),
                (fig.plot_similarity_heatmaps(inter_instance_similarity(latents), f"{stem}-heatmaps-raw",
                                              title=f"{subject}: raw cosine similarity between instances")[0],
                 f"{subject}: raw cosine similarity between every pair of instances, one panel per latent step."),
                (fig.plot_intra_instance_heatmap(intra_instance_similarity(latents), f"{stem}-intra",
                                                 title=f"{subject}: similarity between latent steps")[0],
                 f"{subject}: cosine similarity between the latent steps of one instance, averaged over instances.")]
    return table, appendix


def collapse_comparison(tables: Sequence[pd.DataFrame], out_dir: str | Path, margin: float | None) -> list:
    """Every subject's spread ratio per step in one figure (the one the verdict reads), as [(path, caption)], and
    the combined similarity table written beside it."""
    out_dir = Path(out_dir)
    combined = pd.concat(tables, ignore_index=True)
    made = []
    try:
        paths = fig.plot_subject_comparison(combined, out_dir / "subjects-similarity", margin=margin)
        made.append((paths[0], COLLAPSE_CAPTION.format(margin=margin if margin is not None else 0.1)))
    except LatentProbeError as exc:
        log.warning("no collapse comparison figure: %s", exc)
    _write_table(combined, out_dir / "similarity")
    return made


def _subject_analysis(figure_dir, seed, n_boot, floor_runs, attributes, probe_kwargs):
    """`_analyse_subject` with a report's settings, as a function of the run folder (it pickles: a partial)."""
    return functools.partial(_analyse_subject, figure_dir=Path(figure_dir), seed=seed, n_boot=n_boot,
                             floor_runs=[Path(d) for d in floor_runs], attributes=list(attributes),
                             probe_kwargs=dict(probe_kwargs or {}))


def start_subject_analysis(run_dirs: Sequence[str | Path], out_dir: str | Path, *, count: int,
                           attributes: Sequence[str] = (), seed: int = 0, n_boot: int = 1000,
                           probe_kwargs: dict | None = None) -> dict:
    """Start now, in the processes shared by ``count`` subjects (`latentprobe.stats.parallel`), the collapse and
    probes that `build_report` into ``out_dir`` with the same settings would make of one subject's ``run_dirs``
    (its readout trace and edits run, as the report lists them); returns ``started`` for `build_report`: {the
    analysed folder: a call returning the result}, empty when the subject has no latents."""
    from ..stats.parallel import start_in_process

    stores = [(str(Path(d)), TraceStore(d)) for d in run_dirs if run_kind(d) in ("trace", "intervene")]
    analysed = next((d for d, store in stores if _has_latents(store)), None)
    if analysed is None:
        return {}
    function = _subject_analysis(Path(out_dir) / "figures", seed, n_boot, run_dirs, attributes, probe_kwargs)
    return {analysed: start_in_process(function, Path(analysed), count)}


def _analyse_subject(run_dir, figure_dir, *, seed: int, n_boot: int, floor_runs, attributes, probe_kwargs) -> dict:
    """One subject's collapse and probes for `build_report`: its tables, appendix figures and seconds taken."""
    started = time.time()
    similarity, appendix = subject_collapse(run_dir, figure_dir, seed=seed, n_boot=n_boot, floor_runs=floor_runs)
    probes = None
    if attributes:
        probes, _ = probe_study(run_dir, attributes, figure_dir, seed=seed, figures=False, **probe_kwargs)
        appendix += probe_heatmaps(probes, figure_dir / "probes")
    return {"subject": str(similarity.subject.iloc[0]) if len(similarity) else str(run_dir),
            "similarity": similarity, "appendix": appendix, "probes": probes, "seconds": time.time() - started}


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
    placebo (an intervention named ``...placebo...`` on target latent) in an intervention run of ``subject``
    (NaN for instances that run did not cover); None when no such run covers at least 3 of the instances."""
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
        # The trace may hold more instances than the intervention run (the demo traces more for its probes):
        # the floor is measured where the placebo ran and left NaN elsewhere (the noise check skips NaN rows).
        covered = [i in placebo.index and i in clean.index for i in instance_ids]
        if sum(covered) < 3:
            continue
        floor = np.full((len(instance_ids), steps), np.nan)
        for row, instance in enumerate(instance_ids):
            if not covered[row]:
                continue
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
                max_steps: int | None = None, control_type: str = "auto", figures: bool = True,
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
    # The witness that an attribute is readable from the image at all (the `limited` rule): the image tokens on
    # a coarse spatial grid, since their mean dilutes a local attribute (latentprobe.stats.image_readout).
    image_grid = _pooled_image_features(store, frame, layer_ids)
    tables = []
    for attribute in attributes:
        labels = _labels(frame, attribute)
        task = "regression" if _numeric_with_many_values(labels) else "classification"
        common = dict(subject=subject, attribute=attribute, task=task, n_splits=n_splits, seed=seed, types=types,
                      control_type=used_type, **probe_kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tables.append(probe_table(latent_features, labels, groups, representation="latent", **common))
            if image_grid is not None:
                tables.append(probe_table(image_grid, labels, groups, representation="image_tokens", **common))
            for name in ("image_mean", "prompt_last"):
                if all(name in t for t in frame.tensors):
                    feats = {(layer, -1): store.state_array(frame.record_id, name, layer) for layer in layer_ids}
                    tables.append(probe_table(feats, labels, groups, representation=name, **common))
            if random_init_dir is not None:
                tables.append(_random_init_probes(random_init_dir, frame, labels, groups, common))
    table = pd.concat(tables, ignore_index=True)
    made = {"visual_info": []}
    stem = out_dir / _safe(subject)
    try:  # the report draws every subject's probes in one figure instead (`probe_figures`)
        if figures:
            made["visual_info"] += fig.plot_probe_heatmap(table, f"{stem}-probe-heatmap")
            made["visual_info"] += fig.plot_probe_bars(table, f"{stem}-probe-bars")
    except LatentProbeError as exc:  # every probe skipped: the table says why
        log.warning("no probe figure: %s", exc)
    _write_table(table, out_dir / "probes")
    return table, made


def _pooled_image_features(store: TraceStore, frame: pd.DataFrame, layer_ids) -> dict | None:
    """Per recorded layer, every record's image tokens pooled onto one coarse grid (None without image tokens).
    Records are read one at a time and pooled at once, so memory holds the grids, never every token."""
    if not all("image_tokens" in tensors for tensors in frame.tensors):
        return None
    counts = [store.tensor(record_id, "image_tokens").shape[1] for record_id in frame.record_id]
    plan = pooling_plan(counts)
    pooled = []
    for record_id in frame.record_id:
        tokens = store.tensor(record_id, "image_tokens").float().numpy()
        pooled.append([pool_tokens(tokens[position], plan) for position in range(len(layer_ids))])
    return {(layer, -1): np.stack([record[position] for record in pooled])
            for position, layer in enumerate(layer_ids)}


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
    from ..runs.identity import distinct_runs

    frames = []
    for run_dir in distinct_runs(run_dirs)[0]:  # the same run given twice is counted once
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


RUN_KINDS = ("trace", "intervene", "patch", "ground", "lens")


def run_kind(run_dir: str | Path) -> str:
    """Which command wrote ``run_dir``: trace, intervene, patch, ground or lens (a clear error for anything else)."""
    from .where_report import where_run_kind

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LatentProbeError(f"{run_dir} is not a folder", "pass the --out folder of a latentprobe run")
    if (run_dir / "patching_summary.parquet").exists():
        return "patch"
    where = where_run_kind(run_dir)
    if where is not None:
        return where
    if (run_dir / "manifest.json").exists():
        store = TraceStore(run_dir)  # names a damaged or foreign manifest in one line
        return "intervene" if store.manifest.get("kind") == "intervene" or (run_dir / "effects_summary.parquet").exists() \
            else "trace"
    raise LatentProbeError(f"{run_dir} holds no latentprobe run (no manifest.json, no patching_summary.parquet)",
                           f"pass folders written by latentprobe {', '.join(RUN_KINDS)}")


def _subject_of(run_dir: Path, kind: str) -> dict:
    """The subject's name, checkpoint and protocol as a run folder's manifest records them."""
    if kind == "patch":
        manifest = _read_json(run_dir / "patching_manifest.json")
        table = pd.read_parquet(run_dir / "patching_summary.parquet", columns=["subject"])
        name = manifest.get("subject", {}).get("name") if isinstance(manifest.get("subject"), dict) else None
        return {"name": name or (str(table.subject.iloc[0]) if len(table) else run_dir.name)}
    manifest = _read_json(run_dir / "manifest.json")
    described = manifest.get("subject", {}) if isinstance(manifest.get("subject"), dict) else {}
    return {"name": manifest.get("subject_name") or described.get("name") or run_dir.name,
            "checkpoint": readable_path(manifest.get("checkpoint") or described.get("checkpoint") or ""),
            "protocol": _protocol_summary(manifest.get("protocol") or described.get("protocol")),
            "description": described.get("description", "")}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def readable_path(value, relative_to: Path | None = None) -> str:
    """A path as a reader wants it: relative to ``relative_to`` (or the working folder) when close by, inside
    the latentprobe cache or package as such, else with ~ for the home folder; anything else unchanged."""
    text = str(value or "")
    if not text or "/" not in text or not Path(text).is_absolute():
        return text
    import os

    from ..data.instances import cache_dir

    path = Path(text)
    package = Path(__file__).resolve().parents[1]
    for root, label in ((cache_dir(), "<latentprobe cache>"), (package, "<latentprobe package>")):
        try:
            return f"{label}/{path.resolve().relative_to(root.resolve()).as_posix()}"
        except ValueError:
            pass
    base = Path(relative_to) if relative_to is not None else Path.cwd()
    relative = os.path.relpath(path, base)
    if not relative.startswith("../../.."):
        return relative
    home = str(Path.home())
    return "~" + text[len(home):] if text.startswith(home + "/") else text


def run_provenance(run_dirs: Sequence[str | Path], kinds: Sequence[str], out_dir: Path) -> pd.DataFrame:
    """One row per run folder: what wrote it, for which subject, on which data, and how many instances it holds
    against how many its last session asked for (an interrupted or resumed run says so here)."""
    rows = []
    for run_dir, kind in zip(map(Path, run_dirs), kinds):
        subject = _subject_of(run_dir, kind)["name"]
        if kind in ("trace", "intervene"):
            store = TraceStore(run_dir)
            state = store.completeness()
            source = store.manifest.get("data", {}).get("source")
            held, asked = state["present"], state["expected"]
            created = store.manifest.get("created")
        elif kind == "patch":
            manifest = _read_json(run_dir / "patching_manifest.json")
            rows_table = pd.read_parquet(run_dir / "patching_rows.parquet", columns=["instance_id"]) \
                if (run_dir / "patching_rows.parquet").exists() else pd.DataFrame({"instance_id": []})
            held = int(rows_table.instance_id.nunique())
            asked = int(manifest.get("n_instances") or held)
            source, created = manifest.get("data_source") or manifest.get("source"), manifest.get("created")
        else:
            manifest = _read_json(run_dir / "manifest.json")
            held = asked = int(manifest.get("data", {}).get("n_instances") or 0)
            source, created = manifest.get("data", {}).get("source"), manifest.get("created")
        rows.append({"run": readable_path(run_dir.resolve(), out_dir), "kind": kind, "subject": subject,
                     "instances held / asked": f"{held} / {asked}" + ("" if held >= asked else " (incomplete)"),
                     "data": readable_path(source) if source else "n/a",
                     "written": _when(created)})
    return pd.DataFrame(rows)


def _when(created) -> str:
    import datetime

    if not isinstance(created, (int, float)):
        return str(created or "n/a")
    return datetime.datetime.fromtimestamp(created, tz=datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def build_report(run_dirs: Sequence[str | Path], out_dir: str | Path, *, attributes: Sequence[str] = (),
                 seed: int = 0, n_boot: int = 1000, title: str | None = None,
                 probe_kwargs: dict | None = None, margins=None, say=None,
                 started: dict | None = None) -> tuple[Path, Path]:
    """Everything measured in ``run_dirs`` (trace, intervene, patch, ground and lens folders) into report.md and
    report.html, with verdicts.csv (one decision per subject x finding, columns ``verdicts.VERDICT_COLUMNS``) and
    verdict-rows.csv (every row each verdict combined, with its own decision).

    Traces and intervention runs decide the verdicts; patching, knockout, grounding and lens runs make the
    "Where and when" section. Writes into ``out_dir`` as it is (`latentprobe report` builds into a fresh folder
    and swaps it in, so an existing report is never overwritten piecemeal). ``started`` maps a run folder to a
    call returning its collapse and probes, begun earlier with these settings (`start_subject_analysis`; a study
    starts each subject's as soon as its runs are decoded)."""
    from ..verdicts import Margins, evidence_rows, verdict_table
    from .patch_figures import patching_blocks
    from .render import report_verdicts, write_report
    from .where_report import where_blocks

    margins = Margins() if margins is None else margins
    from ..runs.identity import data_mismatch_notes, distinct_runs

    out_dir = Path(out_dir)
    figure_dir = out_dir / "figures"
    run_dirs, duplicates = distinct_runs(run_dirs)  # the same run given twice would count its rows twice
    run_dirs = [Path(d) for d in run_dirs]
    kinds = [run_kind(d) for d in run_dirs]  # every folder is checked before anything is computed
    stored = [(d, TraceStore(d)) for d, k in zip(run_dirs, kinds) if k in ("trace", "intervene")]
    mismatched = data_mismatch_notes([(str(d), s.manifest, set(s.records().instance_id.astype(str)))
                                      for d, s in stored])
    subjects, seen = [], set()
    for run_dir, kind in zip(run_dirs, kinds):
        described = _subject_of(run_dir, kind)
        if described["name"] not in seen:
            seen.add(described["name"])
            subjects.append(described)
    figures: dict[str, list] = {}
    # Collapse and probes from one clean trace per subject: its first run in which latents were used.
    first_with_latents: dict[str, str] = {}
    for run_dir, store in stored:
        name = store.manifest.get("subject_name")
        if name not in first_with_latents and _has_latents(store):
            first_with_latents[name] = str(run_dir)
    usable = list(first_with_latents.values())
    similarity = probes = None
    rest_started = time.time()  # what the last line times: all but the waits for the analyses
    # Each subject's collapse and probes (most of a report's time, figures included) start in processes now and
    # are collected below; the effects section, which does not need them, is made meanwhile.
    started = {Path(d).resolve(): call for d, call in (started or {}).items()}  # one folder, however spelled
    analyses = map_in_processes(_subject_analysis(figure_dir, seed, n_boot, run_dirs, attributes, probe_kwargs),
                                [d for d in usable if Path(d).resolve() not in started])
    effects = effect_tables([d for d, _ in stored])
    if effects is not None and len(effects):
        causal = effects[effects.target != "attention"] if "target" in effects.columns else effects
        if causal.target.isin(["latent", "text"]).any() or (causal.metric == "NIE_correct").any():
            paths = fig.plot_effects_forest(
                causal, figure_dir / "effects-latent-answer", metrics=["flip_rate", "accuracy_change", "NIE_correct"],
                reference_lines={"flip_rate": margins.answer_change, "accuracy_change": margins.correctness,
                                 "NIE_correct": margins.correctness})
            figures["latent_answer"] = [(paths[0], LATENT_ANSWER_CAPTION)]
        if "step" in causal.columns and causal.step.notna().any():
            # the verdict's own effect size: placebo-corrected R2 (issue 18); change_ratio for older tables
            metric = "latent_r2" if (causal.metric == "latent_r2").any() else "change_ratio"
            margin = margins.latent_r2 if metric == "latent_r2" else margins.change_ratio
            paths = fig.plot_effects_forest(causal, figure_dir / "effects-input-latent", metrics=[metric],
                                            reference_lines={metric: margin})
            figures["input_latent"] = [(paths[0], INPUT_LATENT_CAPTION.format(margin=margin))]
    if usable:
        analysed = []
        waited = time.time()
        for run_dir in usable:
            key = Path(run_dir).resolve()
            result = started[key]() if key in started else next(analyses)
            analysed.append(result)
            if say is not None:
                say(f"report    {result['subject']:<11} collapse and probes ({result['seconds']:.0f}s)")
        rest_started += time.time() - waited
        similarity = pd.concat([a["similarity"] for a in analysed], ignore_index=True)
        figures["collapse"] = collapse_comparison([a["similarity"] for a in analysed], figure_dir, margins.collapse)
        figures["appendix"] = [item for a in analysed for item in a["appendix"]]
        if attributes:
            probes = pd.concat([a["probes"] for a in analysed], ignore_index=True)
            _write_table(probes, figure_dir / "probes")  # every subject's rows (each study wrote only its own)
            made = probe_figures(probes, figure_dir / "probes", margin=margins.visual_info, heatmaps=False)
            figures["visual_info"] = made["visual_info"]
            figures["appendix"] += made["appendix"]
    provenance = run_provenance(run_dirs, kinds, out_dir)
    incomplete = [w for _, store in stored for w in store.completeness()["warnings"]]
    for warning in incomplete:
        log.warning(warning)
    data = {"sources": "; ".join(sorted(set(provenance.data))) if len(provenance) else "n/a",
            "instances": "each verdict's n (appendix) counts the instances its rows used; the table below gives "
                         "what each run folder holds"}
    if incomplete:
        data["WARNING: incomplete runs"] = " ".join(incomplete)
    sections, where_figures = patching_blocks(run_dirs, out_dir)
    sections += where_blocks(run_dirs)
    for warning in duplicates + mismatched:
        log.warning(warning)
    if duplicates or mismatched:  # counted once / merged as one subject: said in the report, not only the log
        data["WARNING: runs"] = " ".join(duplicates + mismatched)
    kwargs = {"title": title} if title else {}
    judged = report_verdicts(subjects, effects, similarity, probes, margins)  # once, for the report and the tables
    md, html = write_report(out_dir, subjects=subjects, data=data, effects=effects, similarity=similarity,
                            probes=probes, figures=figures, margins=margins, judged=judged, sections=sections,
                            provenance=provenance, **kwargs)
    _write_table(verdict_table(judged), out_dir / "verdicts")
    rows = evidence_rows(judged)
    if len(rows):
        _write_table(rows, out_dir / "verdict-rows")
    if say is not None:
        say(f"report    effects, figures and verdicts ({time.time() - rest_started:.0f}s)")
    return md, html


INPUT_LATENT_CAPTION = ("How much of the latents' variance each input edit moves, per latent step and over all steps "
                        "(latent_r2: placebo-corrected share of the spread among instances that share everything "
                        "but the edited input, 95% BCa interval; 0 = ignores the input, 1 = follows it as far as "
                        "another instance's input moves it). Dashed: the margin {margin:g}; an interval wholly "
                        "left of it is `disconnect`, wholly right of it `connected`.")
LATENT_ANSWER_CAPTION = ("Answer changes under latent and text edits (flip rate, exact 95% CI), the accuracy change, and "
                         "the natural indirect effect of an image swap on correctness (NIE). Dashed: the margins; "
                         "an interval wholly inside them is negligible. Points: subjects.")
COLLAPSE_CAPTION = ("Left: raw cosine between instances per latent step (the paper's view, inflated by a direction all "
                    "states share). Right: the collapse ratio the verdict reads (the latents' whitened spread per "
                    "direction in their own cross-fitted subspace over one image token's, 95% BCa interval, log "
                    "scale; 1 = as varied as an image token, near 0 = every instance alike). Dashed: the margin "
                    "{margin:g}; an interval wholly below it is `collapsed`, wholly above it `not collapsed`.")
PROBE_CAPTION = ("Probe score, control-task score and selectivity (score - control) of the best layer/step per "
                 "representation (chosen inside the training folds); error bars: fold std (score, control) and "
                 "the bootstrap 95% CI (selectivity, a diagnostic). Dotted: chance; dashed: chance + the margin "
                 "{margin:g}, the line the verdict holds the score's interval against (image_tokens: the image "
                 "tokens pooled onto a grid, the witness that an attribute is readable at all).")


def probe_figures(probes: pd.DataFrame, stem: Path, margin: float, *, heatmaps: bool = True) -> dict[str, list]:
    """The probe bars of every subject in one figure (for the finding) and, with ``heatmaps``, the per-subject
    heatmaps (appendix; `build_report` makes them with each subject's analysis)."""
    made = {"visual_info": [], "appendix": []}
    try:
        paths = fig.plot_probe_bars(probes, stem.with_name("probe-bars"), margin=margin)
        made["visual_info"].append((paths[0], PROBE_CAPTION.format(margin=margin)))
    except LatentProbeError as exc:  # every probe skipped: the table says why
        log.warning("no probe figure: %s", exc)
    if heatmaps:
        made["appendix"] += probe_heatmaps(probes, stem)
    return made


def probe_heatmaps(probes: pd.DataFrame, stem: Path) -> list:
    """Each subject's probe accuracy at every layer and latent step (appendix), as [(path, caption)]."""
    made = []
    try:
        for subject in probes.subject.unique():
            paths = fig.plot_probe_heatmap(probes[probes.subject == subject],
                                           stem.with_name(f"{_safe(subject)}-probe-heatmap"))
            made.append((paths[0], f"{subject}: probe accuracy of the latent states at every layer (rows) and "
                                   "latent step (columns), chance in each panel's title."))
    except LatentProbeError as exc:  # every probe skipped: the table says why
        log.warning("no probe figure: %s", exc)
    return made


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
    """A subject name as a file name (one sanitiser for every name derived from data: `fileio.safe_name`)."""
    return safe_name(name)


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
