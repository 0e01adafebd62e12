"""`intervene`: run interventions on a subject and measure their causal effects.

For every instance: one clean run (X = x0, Z = Z(x0)); then, batch by batch,

* latent interventions, all decoded side by side from ONE prefill of the prompt (nothing a latent edit does can
  change the prompt's keys and values), so a sweep of M edits costs one prefill plus one batched decode;
* input interventions x1, each with the two mediation runs that pin the mediator: Y(x1, Z(x0)) (treated input,
  clean latents) and Y(x0, Z(x1)) (clean input, the treated run's latents; decoded from the clean prefill).
  Two definitions of the mediator Z (``mediators``): ``"fed_back"`` (default; the fed-back latent vectors, i.e.
  layer 0 at the latent positions: the latent positions may still read the image in upper layers, a route that
  then counts as direct) and ``"all_layers"`` (the latent positions' states at every layer taken from the
  other run: the full mediator, so NDE is only what the answer reads from the image itself). The outcome
  columns of the second end in ``_all_layers`` and its effects rows say ``mediator = all_layers``;
* text interventions on a text mediator: the rewritten imagination is forced after the prompt, then the model
  answers.

Outputs in the run folder: ``effects_rows.parquet/.csv`` (one row per instance x intervention x seed),
``effects_summary.parquet/.csv`` (tidy: subject, target, intervention, metric, estimate, ci_low, ci_high, n),
``latent_change.parquet/.csv`` (input -> latent, per latent step), and the traces of every run in the store.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from ..data.instances import Instance, load_images
from ..model.decoding import DecodeConfig, DecodeResult, LatentDecoder, RowOutput, prefill_without_start
from ..stats.effects import (ANSWER_PROBABILITY_COLUMNS, answer_flipped, applied_mask, applied_only,
                             latent_change_metrics, summarize)
from ..model.conditions import warn_about_conditions
from ..errors import LatentProbeError
from ..fileio import atomic_write
from ..interventions.knockout import KnockoutHooks
from ..interventions import (InputIntervention, Intervention, LatentIntervention, LatentStats, LayerEditHooks,
                            PinLatents, PinLatentStates, RowBinding, TextIntervention, derangement)
from ..model.recording import Recorder, RecordSpec
from .store import TraceStore, TraceWriter, decode_json
from ..model.answers import canonical_answer
from ..stats.contributions import contribution_table
from ..interventions.controls import CONTROL_KINDS, step_means
from .common import decode_with_isolation, failed_record, manifest_for, progress_bar, row_record
from .kept_prefills import KeptPrefills

log = logging.getLogger(__name__)

MEDIATORS = ("fed_back", "all_layers")


@dataclass
class CleanRun:
    """What the clean run of one instance left behind, for binding edits and comparing outcomes. ``images`` are
    decoded only while a batch that uses them runs (`_Run.images_of`): held for every instance, a benchmark's
    photographs (about 10 MB each, decoded) grew the run's memory with its size."""

    instance: Instance
    record: dict[str, Any]
    latents: dict[int, torch.Tensor]  # layer (0 = fed-back vector) -> (S, D)
    images: list | None = None


@dataclass
class InterventionSummary:
    run_dir: str
    n_instances: int
    n_failed: int
    interventions: list[str]
    table: pd.DataFrame
    failures: list[tuple[str, str]] = field(default_factory=list)
    not_applied: dict[str, tuple[int, int, str]] = field(default_factory=dict)  # name -> (missing, rows, reason)
    contributions: pd.DataFrame | None = None  # the component controls' table (stats.contributions), when run

    def lines(self) -> list[str]:
        out = [f"instances       {self.n_instances} ({self.n_failed} failed)",
               f"interventions   {len(self.interventions)}"]
        out += not_applied_warnings(self.not_applied)
        for name, (missing, total, reason) in self.not_applied.items():
            out.append(f"not applied     {name}: {missing} of {total} rows ({reason}), excluded from its effects")
        # the mediation summary on correctness: total, direct (NDE) and indirect (NIE) effects, per mediator
        shown = self.table[self.table.metric.isin(["accuracy_change", "flip_rate", "TE_correct", "NDE_correct",
                                                   "NIE_correct"]) & (self.table.n > 0)]
        for _, row in shown.iterrows():
            mediator = row.get("mediator") if isinstance(row.get("mediator"), str) else ""
            metric = f"{row.metric}[{mediator}]" if mediator and row.metric[:2] in ("NI", "ND") else row.metric
            out.append(f"  {row.intervention[:44]:<44} {metric:<22} {row.estimate:+.3f} "
                       f"[{row.ci_low:+.3f}, {row.ci_high:+.3f}] n={int(row.n)}")
        out.append(f"results         {self.run_dir}/effects_summary.csv")
        if self.contributions is not None and len(self.contributions):
            shown = self.contributions[self.contributions.metric.isin(["accuracy", "markers_share"])]
            for _, row in shown.iterrows():
                out.append(f"  {row.condition:<14} {row.metric:<14} {row.estimate:.3f} "
                           f"[{row.ci_low:.3f}, {row.ci_high:.3f}] n={int(row.n)}")
            out.append(f"contributions   {self.run_dir}/contributions.csv")
        return out


def check_interventions(subject, interventions: Sequence[Intervention], n_instances: int, config: DecodeConfig):
    """Everything that can be refused is refused here, before any model runs."""
    if not interventions:
        raise LatentProbeError("no interventions given", "pass --kind (e.g. --target latent --kind noise)")
    if n_instances < 1:
        raise LatentProbeError("the dataset is empty", "pass a data file with at least one instance")
    for iv in interventions:
        if iv.needs_images and subject.text_only:
            from ..model.backbones import require_images

            require_images(subject, iv.name)
        if iv.target == "text" and subject.mediator != "text":
            raise LatentProbeError(f"{iv.name}: subject {subject.name} has no text mediator",
                                   "text interventions need a text-imagination subject such as capimagine")
        if iv.target == "latent" and subject.protocol is None:
            raise LatentProbeError(f"{iv.name}: subject {subject.name} does not reason in latent space",
                                   "use --target input, or a latent subject (monet, lvr, mirage, organisms)")
    max_steps = config.latent_steps if config.latent_steps is not None else (
        subject.protocol.num_steps if subject.protocol else 0)
    for iv in interventions:
        if hasattr(iv, "check_subject"):  # checks that need the subject (attention knockout: latent phase, blocks)
            iv.check_subject(subject)
        iv.check(max_steps, n_instances)


def intervene(subject, instances: Sequence[Instance], interventions: Sequence[Intervention], out_dir: str | Path, *,
              config: DecodeConfig | None = None, batch_size: int = 8, seed: int = 0, n_boot: int = 2000,
              resume: bool = False, progress: bool = False, data_source: str | None = None,
              writer_id: str = "w0", shard_size: int = 64,
              mediators: Sequence[str] = ("fed_back",), placebo: bool = True,
              record_layers: Sequence[int] | str | None = None, clean_image_states: str = "mean",
              shard: tuple[int, int] | None = None) -> InterventionSummary:
    """Run ``interventions`` on ``instances`` and write rows, summaries and traces into ``out_dir``.

    With ``placebo`` (default) every family edited (latent, input, text) also runs its placebo (`with_placebos`):
    the clean input or latents through exactly the edited runs' code path. Its rows (role ``placebo``) are the
    noise floor every effect is read against: each effects_summary row carries the same metric under its family's
    placebo in the ``placebo`` column.

    ``record_layers`` ("all" or hidden-state layers) adds layers to record beyond what the edits need: a study
    records every layer in its clean pass, which is then its trace. ``clean_image_states`` = "all" keeps every image
    token of the clean runs (the collapse verdict's yardstick is a single token; a trace's ``--image-states all``);
    the edited runs keep the image tokens' mean either way. ``shard`` = (rank, world) runs this process's
    share of ``instances`` (the full list: ``instances[rank::world]``) in a store shared by every rank: each rank
    decodes its share's clean runs, waits for the others (a barrier), then binds donors and latent statistics from
    every rank's clean runs, so the union equals a single-process run; rank 0 writes the tables after a second
    barrier (the other ranks return a summary without them).

    >>> from latentprobe.interventions import make_interventions
    >>> ivs = make_interventions("latent", ["noise", "zero"], scales=[1.0, 3.0])          # doctest: +SKIP
    >>> intervene(load_subject("tiny"), builtin_instances(), ivs, "runs/iv")          # doctest: +SKIP
    """
    config = config or DecodeConfig(max_new_tokens=subject.max_new_tokens, seed=seed)
    instances = list(instances)
    check_interventions(subject, interventions, len(instances), config)  # the user's edits refused first
    if placebo:
        interventions = with_placebos(interventions, seed=seed)
    warn_about_conditions(subject, instances, data_source)
    mediators = tuple(dict.fromkeys(mediators))
    unknown = [m for m in mediators if m not in MEDIATORS]
    if unknown or not mediators:
        raise LatentProbeError(f"unknown mediator definition(s) {unknown or '(none)'}",
                               f"choose from {', '.join(MEDIATORS)}")
    layers = sorted({0} | {iv.layer for iv in interventions if isinstance(iv, LatentIntervention) and iv.layer})
    if "all_layers" in mediators and subject.mediator == "latent":
        layers = list(range(subject.num_layers + 1))  # the full mediator needs every layer's latent states
    if record_layers == "all":
        layers = list(range(subject.num_layers + 1))
    elif record_layers is not None:
        layers = sorted(set(layers) | {int(layer) for layer in record_layers})
    spec = RecordSpec(layers=layers, image="mean", prompt_last=True)
    decoder = LatentDecoder(subject, config)
    recorder = Recorder(decoder, spec)
    manifest = manifest_for(subject, instances, config, spec, recorder.layers, "intervene", data_source,
                            extra={"interventions": [iv.describe() for iv in interventions]})
    if clean_image_states != "mean":  # part of what is recorded, so a resume with other image states is refused
        manifest["record"]["clean_image"] = clean_image_states
    from .distributed import barrier, rank_and_world

    own = list(instances) if shard is None else list(instances)[shard[0]::shard[1]]
    if shard is not None:
        writer_id = f"{writer_id}-rank{shard[0]}of{shard[1]}"
    writer = TraceWriter(out_dir, manifest, resume=resume, writer_id=writer_id,
                         shared=shard is not None or rank_and_world()[1] > 1, shard_size=shard_size)
    run = _Run(subject, decoder, recorder, writer, config, interventions, n_instances=len(instances))
    run.mediators = mediators
    run.clean_image_states = clean_image_states
    bar = progress_bar(len(own), progress, "intervene")
    own_ids = {inst.id for inst in own}
    with recorder, writer:
        clean = run.clean_pass(own, batch_size)
        if shard is not None:  # every rank's clean runs, read back from the shared store (nothing is decoded)
            barrier()
            run.failures = []
            clean = run.clean_pass(instances, batch_size)
        # this process's clean latents; under torchrun LatentStats sums them over the ranks (the dataset's)
        run.compute_stats({k: v for k, v in clean.items() if k in own_ids})
        donors = derangement(len(instances), seed) if len(instances) > 1 else [0]
        donor_of = {inst.id: instances[d].id for inst, d in zip(instances, donors)}
        done = writer.finished_keys(("instance_id", "intervention")) if resume else set()
        ok = [inst for inst in own if inst.id in clean]
        chunks = [ok[start:start + batch_size] for start in range(0, len(ok), batch_size)]
        run.kept_prefills.retain_only([[inst.id for inst in chunk] for chunk in chunks])
        for chunk in chunks:
            run.intervene_batch(chunk, clean, donor_of, done)
            bar.update(len(chunk))
        run.kept_prefills.clear()
    bar.close()
    if shard is not None:
        barrier()  # every rank's edits are on disk
        if shard[0] != 0:
            return InterventionSummary(str(out_dir), len(own), len(run.failures), [iv.name for iv in interventions],
                                       pd.DataFrame(), run.failures)
    rows = run.result_rows(TraceStore(out_dir))
    table = _summaries(rows, n_boot, seed)
    if subject.mediator == "text" and "mediator" in table.columns:  # the pinned mediator is the imagination text
        table.loc[table["mediator"] == "fed_back", "mediator"] = "text"
    table = with_placebo_column(table, rows)
    latent_change = _latent_change(run, clean, instances, n_boot, seed, applied_rows(rows))
    mediator_change = _mediator_change(run, donor_of, instances, n_boot, seed, applied_rows(rows))
    if len(mediator_change):  # a text mediator's input -> mediator rows sit beside the latents' (same columns)
        latent_change = pd.concat([latent_change, mediator_change], ignore_index=True) if len(latent_change) \
            else mediator_change
    _write_tables(Path(out_dir), rows, table, latent_change, run.latent_change_instances)
    contributions = None
    if any(iv.kind in CONTROL_KINDS for iv in interventions) and len(rows):
        # the component controls' table: full / no-latent / markers-only / dummy / oracle (stats.contributions)
        contributions = contribution_table(rows, n_boot=n_boot, seed=seed)
        _write_tables(Path(out_dir), contributions=contributions)
    not_applied = not_applied_counts(rows)
    for line in not_applied_warnings(not_applied):
        log.warning(line)
    summary = InterventionSummary(str(out_dir), len(instances), len(run.failures),
                                  [iv.name for iv in interventions], table, run.failures, not_applied)
    summary.contributions = contributions
    return summary


# The family whose placebo is each target's noise floor (an attention knockout runs the latent edits' path).
PLACEBO_FAMILY = {"latent": "latent", "attention": "latent", "input": "input", "text": "text"}


def with_placebos(interventions: Sequence[Intervention], seed: int = 0) -> list[Intervention]:
    """``interventions`` plus one placebo for each family they edit that has none yet (latent: `LatentPlacebo` at
    the fed-back vector, all steps; input: `InputPlacebo`; text: `TextPlacebo`), after that family's edits."""
    from ..interventions import InputPlacebo, LatentPlacebo, TextPlacebo

    out = list(interventions)
    has = {PLACEBO_FAMILY.get(iv.target) for iv in out if iv.role == "placebo"}
    make = {"latent": lambda: LatentPlacebo(seed=seed), "input": lambda: InputPlacebo(seed=seed),
            "text": lambda: TextPlacebo(seed=seed)}
    for family in ("latent", "input", "text"):
        if family not in has and any(PLACEBO_FAMILY.get(iv.target) == family for iv in out):
            out.append(make[family]())
    return out


def with_placebo_column(table: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """``table`` with a ``placebo`` column: for each row, the same metric (same subject, mediator) under the
    placebo of the row's family; NaN where that family ran no placebo or the placebo has no such metric."""
    table = table.copy()
    table["placebo"] = float("nan")
    if table.empty or rows.empty or "role" not in rows.columns:
        return table
    placebos = rows[rows["role"] == "placebo"].drop_duplicates("intervention")
    family_placebo = {PLACEBO_FAMILY.get(t): name for t, name in zip(placebos.target, placebos.intervention)}
    keys = ["subject", "metric"] + (["mediator"] if "mediator" in table.columns else [])
    by_intervention = {name: group for name, group in table.groupby("intervention", sort=False)}
    for family, name in family_placebo.items():
        reference = by_intervention.get(name)
        if reference is None:
            continue
        lookup = {tuple(r[k] for k in keys): r["estimate"] for _, r in reference.iterrows()}
        hit = table["target"].map(PLACEBO_FAMILY) == family
        table.loc[hit, "placebo"] = [lookup.get(tuple(r[k] for k in keys), float("nan"))
                                     for _, r in table[hit].iterrows()]
    return table


def applied_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows whose edit was made (runs from before the `applied` column count as applied)."""
    return applied_only(rows).reset_index(drop=True)


def not_applied_counts(rows: pd.DataFrame) -> dict[str, tuple[int, int, str]]:
    """Per intervention with any row not applied: (rows not applied, rows, the most common reason)."""
    if rows.empty or "applied" not in rows.columns:
        return {}
    out = {}
    for name, group in rows.groupby("intervention", sort=True):
        missing = group[~applied_mask(group)]
        if len(missing):
            reasons = missing.get("not_applied_reason", pd.Series(dtype=str)).fillna("").value_counts()
            out[str(name)] = (len(missing), len(group), str(reasons.index[0]) if len(reasons) else "")
    return out


def not_applied_warnings(counts: dict[str, tuple[int, int, str]]) -> list[str]:
    """One loud line per intervention most of whose rows were not applied."""
    return [f"WARNING: {name} was NOT APPLIED in {missing} of {total} rows ({reason}); its effects use only the "
            f"{total - missing} applied row(s)" for name, (missing, total, reason) in counts.items()
            if missing * 2 > total]


class _Run:
    def __init__(self, subject, decoder, recorder, writer, config, interventions, n_instances):
        self.subject, self.decoder, self.recorder, self.writer = subject, decoder, recorder, writer
        self.config = config
        self.interventions = list(interventions)
        self.latent_ivs = [iv for iv in interventions if isinstance(iv, LatentIntervention)]
        self.input_ivs = [iv for iv in interventions if isinstance(iv, InputIntervention)]
        self.text_ivs = [iv for iv in interventions if isinstance(iv, TextIntervention)]
        self.stats: dict[int, LatentStats] = {}
        self.done: set[tuple[str, str]] = set()
        self.failures: list[tuple[str, str]] = []
        self.layer_positions = {layer: i for i, layer in enumerate(recorder.layers)}
        self.mediators: tuple[str, ...] = ("fed_back",)
        self.clean_image_states = "mean"  # what the clean runs record of the image tokens ("mean" or "all")
        self.max_steps = config.latent_steps if config.latent_steps is not None else (
            subject.protocol.num_steps if subject.protocol else 0)
        self.target_reasons: dict[tuple[str, str], str] = {}  # (instance, intervention) -> why no oracle target
        self.kept_prefills = KeptPrefills()  # the clean pass's prefills, for the edits of the same batches

    # -- clean ------------------------------------------------------------------------------------------
    def clean_pass(self, instances, batch_size) -> dict[str, CleanRun]:
        store = TraceStore(self.writer.run_dir)
        previous, by_record = {}, None
        if len(store.index()):
            frame = store.index()
            previous = {r.instance_id: r for r in frame[frame.intervention == "clean"].itertuples()}
            by_record = frame.set_index("record_id")
        clean: dict[str, CleanRun] = {}
        todo = []
        for inst in instances:
            if inst.id in previous:
                row = previous[inst.id]
                if row.status == "ok":
                    load_images(inst)  # still readable (a clear error now, not in the middle of the edits)
                    latents = self._latents_from_store(store, row.record_id)
                    clean[inst.id] = CleanRun(inst, by_record.loc[row.record_id].to_dict()
                                              | {"record_id": row.record_id}, latents)
                else:
                    self.failures.append((inst.id, row.error))
            else:
                todo.append(inst)
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            with self.recorder.image_states(self.clean_image_states):
                decoded = list(decode_with_isolation(self.decoder, self.subject, chunk, self.recorder,
                                                     keep_prefill=self._keep_clean_prefill if self._edits_reuse_prefill
                                                     else None))
            for inst, imgs, row, tensors, error in decoded:
                if error is not None:
                    self._fail(inst, "clean", "none", error)
                    continue
                record = row_record(self.subject, inst, row, intervention="clean", target="none",
                                    seed=self.config.seed)
                if self.subject.mediator == "text":  # the imagined span's own representation (input -> mediator)
                    tensors = {**tensors, "mediator_pooled": span_states(self.decoder, [record.get("mediator_text")])}
                self.writer.add(record, {"latent": row.latent_vectors, **tensors})
                latents = {0: row.latent_vectors}
                for layer, pos in self.layer_positions.items():
                    if layer and "latent_layers" in tensors:
                        latents[layer] = tensors["latent_layers"][pos]
                clean[inst.id] = CleanRun(inst, record, latents)
        self.writer.flush()
        return clean

    @property
    def _edits_reuse_prefill(self) -> bool:
        """Whether some edit decodes from the clean prefill: latent edits, and the mediation run Y(x0, Z(x1)) of an
        input edit on a latent subject (a text mediator's runs and text edits prefill their own prompts)."""
        latent_mediation = self.input_ivs and self.subject.mediator == "latent" and self.subject.protocol is not None
        return bool(self.latent_ivs or latent_mediation)

    def _keep_clean_prefill(self, instances, prefill):
        """Keep a clean batch's prefill for its edits (within `KeptPrefills`' budget), with the Recorder's copy of
        its prompt; the image tokens are left out: the edits record only their mean."""
        self.kept_prefills.keep([inst.id for inst in instances], prefill, self.recorder.prompt_states())

    def _latents_from_store(self, store, record_id) -> dict[int, torch.Tensor]:
        latents = {0: store.tensor(record_id, "latent")}
        for layer, pos in self.layer_positions.items():
            if layer:
                latents[layer] = store.tensor(record_id, "latent_layers")[pos]
        return latents

    def compute_stats(self, clean: dict[str, CleanRun]):
        if not self.latent_ivs:
            return
        for layer in {iv.layer or 0 for iv in self.latent_ivs}:
            vectors = [c.latents[layer] for c in clean.values() if layer in c.latents and len(c.latents[layer])]
            if vectors:
                self.stats[layer] = LatentStats.from_vectors(torch.cat(vectors))
                self.stats[layer].step_means = step_means(vectors, self.max_steps)  # for mean-step
        if 0 not in self.stats and any((iv.layer or 0) == 0 for iv in self.latent_ivs):
            raise LatentProbeError("no instance entered latent mode in the clean run, so latent interventions "
                                   "have nothing to edit", "check the subject's protocol or force latent mode")

    # -- interventions ------------------------------------------------------------------------------------
    @contextmanager
    def images_of(self, chunk: list[Instance], clean: dict[str, CleanRun], donor_of: dict[str, str]):
        """The images of a batch's instances and of their donors, decoded for the batch and let go after it."""
        wanted = {inst.id for inst in chunk} | {donor_of[inst.id] for inst in chunk if inst.id in donor_of}
        opened = [clean[i] for i in sorted(wanted) if i in clean and clean[i].images is None]
        try:
            for run in opened:
                run.images = load_images(run.instance)
            yield
        finally:
            for run in opened:
                run.images = None

    def intervene_batch(self, chunk: list[Instance], clean: dict[str, CleanRun], donor_of: dict[str, str], done):
        with self.images_of(chunk, clean, donor_of):
            self._intervene_batch(chunk, clean, donor_of, done)

    def _intervene_batch(self, chunk: list[Instance], clean: dict[str, CleanRun], donor_of: dict[str, str], done):
        subject, decoder = self.subject, self.decoder
        self.done = done
        cached = []

        def clean_prefill():  # one prompt prefill per batch: the clean pass's, or made if some edit needs it
            if not cached:
                kept = self.kept_prefills.take([inst.id for inst in chunk])
                if kept is not None:  # the Recorder then holds this batch's prompt, as after a new prefill
                    self.recorder.resume_prompt(kept.prompt_states)
                    cached.append(kept.prefill)
                else:
                    cached.append(decoder.prefill(subject.encode(chunk, images=[clean[i.id].images for i in chunk])))
            return cached[0]

        if self.latent_ivs:
            todo = [iv for iv in self.latent_ivs if any((i.id, iv.name) not in done for i in chunk)]
            # Edits decoded from the clean prefill as it is, then the controls that remove the latent phase, from
            # the same prefill without its forced start token (no new prompt prefill).
            groups = {}
            for iv in todo:
                groups.setdefault(getattr(iv, "prefill_variant", "clean"), []).append(iv)
            for variant, group in sorted(groups.items(), key=lambda item: item[0] != "clean"):
                self._decode_latent_group(chunk, group, clean, donor_of, clean_prefill, variant)
        for iv in self.input_ivs:
            if all((i.id, iv.name) in done for i in chunk):
                continue
            self._input_intervention(iv, chunk, clean, donor_of, clean_prefill)
        for iv in self.text_ivs:
            if all((i.id, iv.name) in done for i in chunk):
                continue
            self._text_intervention(iv, chunk, clean, donor_of)
        self.kept_prefills.discard([inst.id for inst in chunk])  # a batch with every edit done (a resume)
        self.writer.flush()

    def _decode_latent_group(self, chunk, group, clean, donor_of, clean_prefill, variant: str):
        """Decode one group of latent edits side by side from the clean prefill (``variant`` "clean") or from it
        without the forced start token ("without_start": `prefill_without_start`; its states are not recorded:
        the recorder holds the clean prefill's batch)."""
        decoder = self.decoder
        edits = [iv.bind(self._binding(inst, iv, clean, donor_of)) for inst in chunk for iv in group]
        prefill = clean_prefill() if variant == "clean" else prefill_without_start(decoder, clean_prefill())
        recording = variant == "clean"
        with LayerEditHooks(decoder, edits), KnockoutHooks(decoder, edits), self._recording(recording):
            # every copy samples from the instance's own stream, as the clean run did (common random numbers)
            result = decoder.decode(prefill, edits, repeats=len(group), streams=[0] * len(group))
        records = self.recorder.records() if recording else [{} for _ in result.rows]
        for k, (row, tensors) in enumerate(zip(result.rows, records)):
            inst, iv = chunk[k // len(group)], group[k % len(group)]
            reason = (self._donor_reason(inst, iv, clean, donor_of) or self.target_reasons.get((inst.id, iv.name))
                      or edits[k].not_applied_reason(row.n_latent_steps))
            self._write(inst, iv, row, tensors, clean, not_applied=reason, extra=self._target_columns(inst, iv, clean,
                                                                                                      donor_of))

    def _recording(self, on: bool):
        from contextlib import nullcontext

        return nullcontext() if on else self.recorder.paused()

    def _binding(self, inst, iv: LatentIntervention, clean, donor_of) -> RowBinding:
        layer = iv.layer or 0
        donor = clean.get(donor_of[inst.id])
        binding = RowBinding(instance_id=inst.id, clean=clean[inst.id].latents.get(layer),
                             donor=donor.latents.get(layer) if donor is not None else None, stats=self.stats.get(layer))
        if getattr(iv, "wants_row_targets", False):  # oracle latents: this instance's targets, or the donor's
            source = donor if iv.needs_donor else clean[inst.id]
            if source is not None:
                targets, reason = iv.row_targets(self.subject, source.instance, source.images, self.max_steps)
                binding.forced = targets
                if reason is not None:
                    self.target_reasons[(inst.id, iv.name)] = reason
        return binding

    def _target_columns(self, inst, iv, clean, donor_of) -> dict[str, Any] | None:
        """For oracle rows: the answer the fed targets encode (the source instance's gold answer, as this
        instance's option) and the number of options (chance of moving there)."""
        if not getattr(iv, "wants_row_targets", False):
            return None
        source = clean.get(donor_of[inst.id]) if iv.needs_donor else clean[inst.id]
        target = None
        if source is not None and source.instance.answer is not None:
            target = canonical_answer(str(source.instance.answer), inst)
        own = canonical_answer(str(inst.answer), inst) if inst.answer is not None else None
        return {"oracle_target_answer": target, "oracle_own_answer": own, "n_options": len(inst.options or [])}

    def _donor_reason(self, inst, iv: Intervention, clean, donor_of) -> str | None:
        """Why a donor edit cannot be made: the donor instance failed in the clean run."""
        if iv.needs_donor and donor_of.get(inst.id) not in clean:
            return f"the donor instance {donor_of.get(inst.id)} failed in the clean run"
        return None

    def _input_intervention(self, iv: InputIntervention, chunk, clean, donor_of, clean_prefill):
        subject, decoder = self.subject, self.decoder
        images, prompts, reasons = [], [], {}
        for inst in chunk:
            donor = clean.get(donor_of[inst.id])
            own = clean[inst.id].images
            reason = self._donor_reason(inst, iv, clean, donor_of) or iv.not_applied_reason(
                inst, own, donor.instance if donor else None, donor.images if donor else None)
            if reason is None:
                imgs, question = iv.apply(inst, own, donor.instance if donor else None,
                                          donor.images if donor else None)
            else:  # not applied: the row runs on the clean input and is recorded as not applied
                imgs, question = own, None
                reasons[inst.id] = reason
            images.append(imgs)
            prompts.append(subject.prompt_text(inst, n_images=len(imgs), question=question))
        treated = decoder.prefill(subject.encode(chunk, images=images, prompts=prompts))
        x1 = decoder.decode(treated)
        x1_records = self.recorder.records()
        with self.recorder.paused():  # the mediation runs' states are not stored
            mediation = self._mediation_runs(chunk, clean, images, prompts, treated, x1, clean_prefill, x1_records)
        for inst, row, tensors in zip(chunk, x1.rows, x1_records):
            extra = None
            if subject.mediator == "text":  # input -> mediator for a text mediator: how much the imagination changed
                clean_span, span = clean[inst.id].record.get("mediator_text"), subject.mediator_span(row.raw_text)
                extra = {"mediator_text_similarity": _text_similarity(clean_span, span),
                         **span_token_change(subject.tokenizer, clean_span, span)}
                tensors = {**(tensors or {}), "mediator_pooled": span_states(decoder, [span])}
            self._write(inst, iv, row, tensors, clean, mediation=mediation.get(inst.id), extra=extra,
                        not_applied=reasons.get(inst.id))

    def _mediation_runs(self, chunk, clean, images, prompts, treated, x1, clean_prefill,
                        x1_records=None) -> dict[str, dict]:
        """Outcomes of the two mediator-pinned runs, Y(x1, Z(x0)) and Y(x0, Z(x1)), per instance."""
        subject, decoder = self.subject, self.decoder
        if subject.mediator == "latent" and subject.protocol is not None:
            full = {}
            if "all_layers" in self.mediators:  # before the fed-back runs, which consume the treated prefill
                full = self._all_layer_mediation_runs(chunk, clean, treated, x1, x1_records, clean_prefill)
            # Y(x1, Z(x0)): treated input, clean latents; Y(x0, Z(x1)): clean input, the treated run's latents
            pin_clean, pin_treated = PinLatents(source="clean"), PinLatents(source="treated")
            edits = [pin_clean.bind(RowBinding(inst.id, forced=clean[inst.id].latents[0])) for inst in chunk]
            x1z0 = decoder.decode(treated, edits, consume=True)
            edits = [pin_treated.bind(RowBinding(inst.id, forced=row.latent_vectors)) for inst, row in zip(chunk, x1.rows)]
            x0z1 = decoder.decode(clean_prefill(), edits)
        elif subject.mediator == "text":
            clean_spans = {i.id: clean[i.id].record.get("mediator_text") or "" for i in chunk}
            treated_spans = {inst.id: subject.mediator_span(row.raw_text) or "" for inst, row in zip(chunk, x1.rows)}
            x1z0 = self._decode_with_span(chunk, images, clean_spans, prompts)
            x0z1 = self._decode_with_span(chunk, [clean[i.id].images for i in chunk], treated_spans, None)
        else:  # no mediator: total effects only
            return {}
        out = {inst.id: {"x1_z0": self._outcome(inst, a), "x0_z1": self._outcome(inst, b)}
               for inst, a, b in zip(chunk, x1z0.rows, x0z1.rows)}
        if subject.mediator == "latent" and subject.protocol is not None:
            for inst_id, runs in full.items():
                out[inst_id].update(runs)
        return out

    def _all_layer_mediation_runs(self, chunk, clean, treated, x1, x1_records, clean_prefill) -> dict[str, dict]:
        """Y(x1, Z(x0)) and Y(x0, Z(x1)) with the full mediator: the latent positions' states at every layer
        (and the fed-back vectors) from the other run."""
        decoder, upper = self.decoder, [layer for layer in self.layer_positions if layer > 0]

        def states_of(tensors, fallback=None) -> dict[int, torch.Tensor] | None:
            if tensors is None or "latent_layers" not in tensors:
                return fallback
            return {layer: tensors["latent_layers"][self.layer_positions[layer]] for layer in upper}

        clean_states = [{layer: clean[inst.id].latents[layer] for layer in upper if layer in clean[inst.id].latents}
                        for inst in chunk]
        treated_states = [states_of(tensors) for tensors in x1_records]
        pin_clean, pin_treated = PinLatents(source="clean-all-layers"), PinLatents(source="treated-all-layers")
        edits = [pin_clean.bind(RowBinding(inst.id, forced=clean[inst.id].latents[0])) for inst in chunk]
        with PinLatentStates(decoder, clean_states):
            x1z0 = decoder.decode(treated, edits)
        edits = [pin_treated.bind(RowBinding(inst.id, forced=row.latent_vectors)) for inst, row in zip(chunk, x1.rows)]
        with PinLatentStates(decoder, treated_states):
            x0z1 = decoder.decode(clean_prefill(), edits)
        return {inst.id: {"x1_z0_all_layers": self._outcome(inst, a), "x0_z1_all_layers": self._outcome(inst, b)}
                for inst, a, b in zip(chunk, x1z0.rows, x0z1.rows)}

    def _decode_with_span(self, chunk, images, spans: dict[str, str], prompts) -> DecodeResult:
        subject = self.subject
        open_marker, close_marker = subject.text_mediator_markers
        forced = []
        for k, inst in enumerate(chunk):
            base = prompts[k] if prompts is not None else subject.prompt_text(inst, n_images=len(images[k]))
            forced.append(f"{base}{open_marker}{spans[inst.id]}{close_marker}")
        return self.decoder.run(subject.encode(chunk, images=images, prompts=forced))

    def _text_intervention(self, iv: TextIntervention, chunk, clean, donor_of):
        spans, reasons = {}, {}
        for inst in chunk:
            own = clean[inst.id].record.get("mediator_text")
            donor = clean.get(donor_of[inst.id])
            donor_span = donor.record.get("mediator_text") if donor else None
            reason = self._donor_reason(inst, iv, clean, donor_of) or iv.not_applied_reason(own, donor_span)
            if reason is not None:  # recorded as not applied, never as an edit without effect
                reasons[inst.id] = reason
            spans[inst.id] = iv.rewrite(own or "", inst.id, donor_span or "") if reason is None else (own or "")
        with self.recorder.paused():  # text-mediator runs store their text, not states
            result = self._decode_with_span(chunk, [clean[i.id].images for i in chunk], spans, None)
        for inst, row in zip(chunk, result.rows):
            self._write(inst, iv, row, {}, clean, extra={"mediator_text_given": spans[inst.id]},
                        not_applied=reasons.get(inst.id))

    # -- rows -----------------------------------------------------------------------------------------------
    def _outcome(self, inst: Instance, row: RowOutput) -> dict[str, Any]:
        if row.failed:  # non-finite values: no outcome rather than a wrong one
            return {"correct": float("nan"), "gold_prob": float("nan")}
        rec = row_record(self.subject, inst, row)
        return {"correct": float(rec["correct"]), "gold_prob": rec["gold_prob"], "answer": rec.get("parsed_answer")}

    def _write(self, inst, iv: Intervention, row: RowOutput, tensors, clean, mediation=None, extra=None,
               not_applied: str | None = None):
        if (inst.id, iv.name) in self.done:  # a resumed batch re-runs its rows but never writes one twice
            return
        if row.failed:  # non-finite values in this run: a failed row with the decoder's reason
            self._fail(inst, iv.name, iv.target, row.error)
            return
        base = clean[inst.id].record
        # An edit that could not be made is recorded as such and left out of every effect (never a null effect).
        record = row_record(self.subject, inst, row, intervention=iv.name, target=iv.target, kind=iv.kind,
                            role=iv.role, seed=self.config.seed, intervention_seed=iv.seed,
                            applied=not_applied is None,
                            not_applied_reason=not_applied or "", **(extra or {}))
        record.update(_comparison(base, record, clean[inst.id].latents[0], row.latent_vectors))
        if mediation:
            for outcome in ("correct", "gold_prob"):
                record[f"{outcome}_x0_z0"] = _as_float(base.get(outcome))
                record[f"{outcome}_x1_z1"] = _as_float(record.get(outcome))
                record[f"{outcome}_x1_z0"] = _as_float(mediation["x1_z0"][outcome])
                record[f"{outcome}_x0_z1"] = _as_float(mediation["x0_z1"][outcome])
            # The primary latent -> answer outcome: did the answer change from the clean answer (0 in the clean
            # run by definition, so TE/NDE/NIE on it are rates of changed answers).
            clean_answer = base.get("parsed_answer")
            record["answer_changed_x0_z0"] = 0.0
            record["answer_changed_x1_z1"] = float(answer_flipped(clean_answer, record.get("parsed_answer")))
            for run in ("x1_z0", "x0_z1"):
                record[f"answer_changed_{run}"] = float(answer_flipped(clean_answer, mediation[run]["answer"]))
            if "x1_z0_all_layers" in mediation:  # the full mediator: same x0_z0 and x1_z1, other pinned runs
                for outcome in ("correct", "gold_prob", "answer_changed"):
                    record[f"{outcome}_all_layers_x0_z0"] = record[f"{outcome}_x0_z0"]
                    record[f"{outcome}_all_layers_x1_z1"] = record[f"{outcome}_x1_z1"]
                for run in ("x1_z0", "x0_z1"):
                    given = mediation[f"{run}_all_layers"]
                    record[f"correct_all_layers_{run}"] = _as_float(given["correct"])
                    record[f"gold_prob_all_layers_{run}"] = _as_float(given["gold_prob"])
                    record[f"answer_changed_all_layers_{run}"] = float(answer_flipped(clean_answer, given["answer"]))
        self.writer.add(record, {"latent": row.latent_vectors, **(tensors or {})})

    def _fail(self, inst, intervention, target, reason):
        self.writer.add(failed_record(self.subject, inst, reason, intervention=intervention, target=target,
                                      seed=self.config.seed))
        self.failures.append((inst.id, reason))

    def result_rows(self, store: TraceStore) -> pd.DataFrame:
        """The edited runs' rows. Only the answer probabilities the summaries read are decoded from JSON; answer
        ids, segments and attributes stay JSON text (as effects_rows writes them): as Python objects they were a
        quarter of the memory a 1,024-instance run added (bench/bench_memory.py)."""
        frame = store.index(decode=())
        rows = frame[(frame.intervention != "clean") & (frame.status == "ok")].reset_index(drop=True)
        del frame
        for column in ANSWER_PROBABILITY_COLUMNS:
            if column in rows.columns:
                rows[column] = decode_json(rows[column])
        return rows


@torch.no_grad()
def span_states(decoder: LatentDecoder, spans: Sequence[str | None]) -> torch.Tensor:
    """(len(spans), D): each imagined span's mean-pooled final hidden state, the span run alone through the
    language model (no prompt, no image; positions from 0). Context-free on purpose: the representation is a
    function of the written text only, so an unchanged imagination has an unchanged representation whatever the
    image (in context, the span's states would read the image themselves). A missing or empty span gives NaN."""
    tokenizer = decoder.subject.tokenizer
    out = torch.full((len(spans), decoder.subject.hidden_size), float("nan"))
    for k, span in enumerate(spans):
        ids = tokenizer(span, add_special_tokens=False)["input_ids"] if span else []
        if not ids:
            continue
        ids = torch.tensor([ids], device=decoder.subject.device)
        positions = torch.arange(ids.shape[1], device=ids.device).view(1, 1, -1).expand(3, 1, -1)
        hidden = decoder._forward(inputs_embeds=decoder.embed(ids), attention_mask=torch.ones_like(ids),
                                  position_ids=positions, use_cache=False)
        out[k] = hidden[0].float().mean(dim=0).cpu()
    return out


def span_token_change(tokenizer, clean: str | None, edited: str | None) -> dict[str, float]:
    """Token-level change of an imagined span: Levenshtein distance between the two token-id sequences (insertions,
    deletions, substitutions of whole tokens) and the clean span's length; NaN when either span is missing."""
    from ..stats.latent_effect import token_edit_distance

    if clean is None or edited is None:
        return {"mediator_token_edit_distance": float("nan"), "mediator_tokens_clean": float("nan")}
    a = tokenizer(clean, add_special_tokens=False)["input_ids"]
    b = tokenizer(edited, add_special_tokens=False)["input_ids"]
    return {"mediator_token_edit_distance": float(token_edit_distance(a, b)), "mediator_tokens_clean": float(len(a))}


def mediator_states(run_dir: str | Path, rows: pd.DataFrame | None = None
                    ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
    """Input -> text mediator data of a text-mediator run: the clean runs' span states by instance id, and per
    input intervention its edited runs' span states by instance id (mean-pooled, context-free: `span_states`;
    NaN where a run wrote no span). With ``rows``, edited runs are kept only if their record is among them (the
    applied rows)."""
    store = TraceStore(run_dir)
    frame = store.index()
    if frame.empty or "tensors" not in frame.columns:
        return {}, {}
    has = frame["tensors"].map(lambda t: t is not None and "mediator_pooled" in list(t))
    frame = frame[has & (frame.status == "ok")]
    state = lambda record_id: store.tensor(record_id, "mediator_pooled")[0].numpy()  # noqa: E731
    clean = {r.instance_id: state(r.record_id) for r in frame[frame.intervention == "clean"].itertuples()}
    edited_rows = frame[frame.target == "input"]
    if rows is not None and "record_id" in rows.columns:
        edited_rows = edited_rows[edited_rows.record_id.isin(set(rows.record_id))]
    edited = {str(name): {r.instance_id: state(r.record_id) for r in group.itertuples()}
              for name, group in edited_rows.groupby("intervention", sort=True)}
    return clean, edited


def _text_similarity(a: str | None, b: str | None) -> float:
    """Word-level similarity of two mediator texts (difflib ratio: 1 identical, 0 nothing shared)."""
    import difflib

    if a is None or b is None:
        return float("nan")
    return difflib.SequenceMatcher(a=a.split(), b=b.split(), autojunk=False).ratio()


def _as_float(value) -> float:
    try:
        return float("nan") if value is None else float(value)
    except (TypeError, ValueError):
        return float("nan")


def _comparison(clean: dict, record: dict, clean_latents: torch.Tensor, latents: torch.Tensor) -> dict[str, Any]:
    """Clean vs intervened outcome columns (the effects module's answer columns) and latent distances."""
    shared = min(len(clean_latents), len(latents))
    cosine = rel_l2 = float("nan")
    if shared:
        a, b = clean_latents[:shared].float(), latents[:shared].float()
        cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())
        rel_l2 = float(((a - b).norm(dim=-1) / a.norm(dim=-1).clamp(min=1e-12)).mean())
    return {
        "clean_parsed": clean.get("parsed_answer"), "intervened_parsed": record.get("parsed_answer"),
        "clean_correct": bool(clean.get("correct")), "intervened_correct": bool(record.get("correct")),
        "clean_gold_prob": _as_float(clean.get("gold_prob")), "intervened_gold_prob": _as_float(record.get("gold_prob")),
        "clean_answer_probs": clean.get("answer_probs"), "intervened_answer_probs": record.get("answer_probs"),
        "clean_n_latent": int(clean.get("n_latent_steps") or 0), "intervened_n_latent": int(record["n_latent_steps"]),
        "clean_answer_slot": clean.get("answer_slot"),
        "latent_cosine": cosine, "latent_relative_l2": rel_l2,
    }


def _summaries(rows: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    """Effects over the applied rows only, plus one ``applied_rate`` row per intervention (estimate = share of rows
    applied, exact Clopper-Pearson interval, n = all rows)."""
    rates = _applied_rates(rows)
    rows = applied_rows(rows)
    table = _effect_summaries(rows, n_boot, seed)
    if len(rates):
        table = pd.concat([table, rates], ignore_index=True) if len(table) else rates
    return table


def _applied_rates(rows: pd.DataFrame) -> pd.DataFrame:
    from scipy.stats import binomtest

    if rows.empty or "applied" not in rows.columns:
        return pd.DataFrame()
    out = []
    for key, group in rows.groupby(["subject", "target", "intervention"], sort=True):
        applied = applied_mask(group)
        ci = binomtest(int(applied.sum()), len(applied)).proportion_ci(method="exact")
        out.append(dict(zip(["subject", "target", "intervention"], key), metric="applied_rate",
                        estimate=float(applied.mean()), ci_low=float(ci.low), ci_high=float(ci.high), n=len(applied)))
    return pd.DataFrame(out)


def _effect_summaries(rows: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    if rows.empty:
        return pd.DataFrame(columns=["subject", "target", "intervention", "metric", "estimate", "ci_low", "ci_high", "n"])
    # the store's index() has already decoded the *_json columns (answer probabilities) into lists
    keep = [c for c in rows.columns if not c.endswith("_json")]
    table = summarize(rows[keep], seed=seed, n_boot=n_boot)
    extra = []
    for key, group in rows.groupby(["subject", "target", "intervention"], sort=True):
        for metric in ("latent_cosine", "latent_relative_l2", "mediator_text_similarity"):
            if metric not in group.columns:
                continue
            values = group.groupby("instance_id")[metric].mean().dropna().to_numpy()
            if len(values):
                from ..stats.effects import paired_bootstrap

                est, low, high = paired_bootstrap(values, n_boot=n_boot, seed=seed)
                extra.append(dict(zip(["subject", "target", "intervention"], key), metric=metric, estimate=est,
                                  ci_low=low, ci_high=high, n=len(values)))
    if extra:
        table = pd.concat([table, pd.DataFrame(extra)], ignore_index=True)
    # Metrics that do not apply to an intervention (mediation of a latent edit) have n = 0: leave them out.
    return table[table.n > 0].reset_index(drop=True)


def _latent_change(run: _Run, clean: dict[str, CleanRun], instances, n_boot, seed, rows=None) -> pd.DataFrame:
    """Input -> latent, per input intervention and latent step (applied rows only): the former distance metrics
    (cosine, relative L2, change_ratio; kept for the figures) and the rows the verdict reads, ``latent_r2`` /
    ``latent_relative_change`` (``stats.latent_effect.input_latent_rows``: placebo-corrected R2, the spread among
    instances sharing everything but the edited input, paired BCa intervals; step NaN = all steps together).
    The input placebo's rows (an intervention named ``...placebo...``) give every edit its noise floor; a ``cka_image``
    row compares the clean latents with the image-token states. The per-instance squared distances go to
    ``run.latent_change_instances``."""
    from ..stats.latent_effect import input_latent_rows

    run.latent_change_instances = pd.DataFrame()
    if not run.input_ivs or run.subject.mediator != "latent":
        return pd.DataFrame()
    store = TraceStore(run.writer.run_dir)
    frame = store.records(target="input")
    if rows is not None and "record_id" in rows.columns:
        frame = frame[frame.record_id.isin(set(rows.record_id))]
    ids = [inst.id for inst in instances if inst.id in clean]
    by_instance = {inst.id: inst for inst in instances}
    clean_by_id = {c: clean[c].latents[0].numpy() for c in ids}
    edited = {name: dict(zip(group.instance_id, group.record_id)) for name, group in frame.groupby("intervention")}
    placebo_names = [name for name in edited if "placebo" in str(name)]
    frames, per_instance = [], []
    for name, by_id in edited.items():
        usable = [i for i in ids if i in by_id]
        if len(usable) < 2:
            continue
        steps = max(max(len(clean_by_id[i]) for i in usable), 1)
        a = _pad([clean_by_id[i] for i in usable], steps)
        b = _pad([store.tensor(by_id[i], "latent").numpy() for i in usable], steps)
        table = latent_change_metrics(a, b, seed=seed, n_boot=n_boot)
        placebo = _placebo_latents(store, edited, placebo_names, name, usable, steps)
        groups = _shared_rest(name, [by_instance[i] for i in usable])
        r2, distances = input_latent_rows(a, b, placebo=placebo, groups=groups, seed=seed, n_boot=n_boot)
        table = pd.concat([table, r2], ignore_index=True)
        table.insert(0, "intervention", name)
        table.insert(0, "subject", run.subject.name)
        frames.append(table)
        distances.insert(0, "instance_id", [usable[i] for i in distances.pop("instance")])
        per_instance.append(distances.assign(subject=run.subject.name, intervention=name))
    frames.append(_clean_cka(run, store, ids, clean_by_id, seed))
    run.latent_change_instances = pd.concat(per_instance, ignore_index=True) if per_instance else pd.DataFrame()
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _mediator_change(run: _Run, donor_of: dict[str, str], instances, n_boot: int, seed: int,
                     rows: pd.DataFrame | None = None) -> pd.DataFrame:
    """Input -> text mediator, per input intervention (applied rows only): ``mediator_r2`` (or
    ``mediator_relative_change`` where the spans have no spread beyond noise), `latent_r2` on the imagined span's
    context-free mean-pooled states (`span_states`) with the input placebo's spans as the floor, the donor's own
    span as the yardstick of a swap (instances sharing the question for any other edit), and the mean token edit
    distance between the clean and edited spans beside it. Rows have latent_change's columns (step NaN)."""
    from ..stats.latent_effect import R2_COLUMNS, latent_r2

    if not run.input_ivs or run.subject.mediator != "text":
        return pd.DataFrame()
    clean, edited = mediator_states(run.writer.run_dir, rows)
    by_instance = {inst.id: inst for inst in instances}
    placebo = next((states for name, states in edited.items() if "placebo" in name), None)
    distances = {}
    if rows is not None and "mediator_token_edit_distance" in rows.columns:
        distances = {name: group.mediator_token_edit_distance.mean() for name, group in rows.groupby("intervention")}
    out = []
    for iv in run.input_ivs:
        states = edited.get(iv.name, {})
        use_donor = iv.needs_donor
        ids = [i for i in states if i in clean and not np.isnan(clean[i]).any() and not np.isnan(states[i]).any()
               and (not use_donor or (donor_of.get(i) in clean and not np.isnan(clean[donor_of[i]]).any()))
               and (iv.role == "placebo" or placebo is None or i in placebo)]
        if len(ids) < 2:
            continue
        c, t = np.stack([clean[i] for i in ids]), np.stack([states[i] for i in ids])
        p = None if placebo is None or iv.role == "placebo" else np.stack([placebo[i] for i in ids])
        donor = np.stack([clean[donor_of[i]] for i in ids]) if use_donor else None
        groups = None if use_donor else _shared_rest(iv.name, [by_instance[i] for i in ids])
        result = latent_r2(c, t, placebo=p, donor=donor, groups=groups, n_boot=n_boot, seed=seed)
        metric = "mediator_r2" if result["statistic"] == "r2" else "mediator_relative_change"
        row = {"step": np.nan, "metric": metric, "estimate": result["estimate"], "ci_low": result["ci_low"],
               "ci_high": result["ci_high"], "n": result["n"], "k": np.nan, "p_value": np.nan,
               "interval": "paired BCa bootstrap", "confidence": 0.95, "move": result["move"],
               "floor": result["floor"], "spread": result["spread"], "spread_source": result["spread_source"],
               "excess_spread_low": result["excess_spread_low"], "one_minus_cosine": result["one_minus_cosine"],
               "collapsed": result["collapsed"], "placebo": result["placebo"]}
        out.append({"subject": run.subject.name, "intervention": iv.name, **{k: row[k] for k in R2_COLUMNS},
                    "token_edit_distance": distances.get(iv.name, np.nan)})
    return pd.DataFrame(out)


def _placebo_latents(store: TraceStore, edited: dict, placebo_names: list, name: str, usable: list, steps: int):
    """The input placebo's latents of ``usable`` (the placebo itself gets none: its floor would be itself), or
    None when no placebo ran for every one of them."""
    if "placebo" in str(name):
        return None
    for placebo in placebo_names:
        if all(i in edited[placebo] for i in usable):
            return _pad([store.tensor(edited[placebo][i], "latent").numpy() for i in usable], steps)
    return None


def _shared_rest(intervention: str, instances: list) -> list | None:
    """What the instances must share for their spread to be the yardstick of an edit: the question for an image
    edit, the image for a question edit (None when no two instances share it)."""
    kind = str(intervention).split("(")[0]
    if kind.startswith("question"):
        keys = ["|".join(map(str, inst.images or [])) for inst in instances]
    else:
        keys = [str(inst.question) for inst in instances]
    return keys if len(set(keys)) < len(keys) else None


def _clean_cka(run: _Run, store: TraceStore, ids: list, clean_by_id: dict, seed: int) -> pd.DataFrame:
    """Linear CKA of the clean latents (the steps every instance has) with the mean image-token states at the last
    recorded layer, with a permutation p-value: a representational check reported beside input_latent."""
    from ..stats.latent_effect import cka_test

    try:
        records = store.records()
        records = records[records.intervention == "clean"].drop_duplicates("instance_id").set_index("instance_id")
        have = [i for i in ids if i in records.index and len(clean_by_id[i])]
        if len(have) < 4:
            return pd.DataFrame()
        steps = min(len(clean_by_id[i]) for i in have)
        latents = np.stack([clean_by_id[i][:steps].reshape(-1) for i in have]).astype(np.float64)
        image = store.state_array(records.loc[have, "record_id"], "image_mean").astype(np.float64)
    except (LatentProbeError, KeyError, ValueError):  # no image states recorded: no representational check
        return pd.DataFrame()
    cka, p = cka_test(latents, image, n_permutations=999, seed=seed)
    return pd.DataFrame([{"subject": run.subject.name, "intervention": "clean", "step": np.nan, "metric": "cka_image",
                          "estimate": cka, "ci_low": np.nan, "ci_high": np.nan, "n": len(have), "p_value": p,
                          "interval": "permutation (999)"}])


def _pad(arrays, steps):
    dim = next((a.shape[-1] for a in arrays if a.size), 1)
    out = np.full((len(arrays), steps, dim), np.nan, dtype=np.float32)
    for i, a in enumerate(arrays):
        n = min(steps, len(a))
        if n:
            out[i, :n] = a[:n]
    return out


def _write_tables(out: Path, rows: pd.DataFrame | None = None, table: pd.DataFrame | None = None,
                  latent_change: pd.DataFrame | None = None, latent_change_instances: pd.DataFrame | None = None,
                  contributions: pd.DataFrame | None = None):
    named = (("effects_rows", rows), ("effects_summary", table), ("latent_change", latent_change),
             ("latent_change_instances", latent_change_instances),  # the squared distances behind R2
             ("contributions", contributions))
    for name, frame in ((n, f) for n, f in named if f is not None and (len(f) or n != "latent_change_instances")):
        frame = frame.copy()
        for column in frame.columns:  # parquet needs one type per column
            if frame[column].map(lambda v: isinstance(v, (list, dict))).any():
                frame[column] = frame[column].map(lambda v: None if v is None else json.dumps(v))
        atomic_write(out / f"{name}.parquet", lambda tmp, f=frame: f.to_parquet(tmp, index=False))
        atomic_write(out / f"{name}.csv", lambda tmp, f=frame: f.to_csv(tmp, index=False))
