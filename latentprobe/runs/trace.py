"""`trace`: run a subject over instances, record latent states, and write a TraceStore.

One record per instance: the decoded text, the parsed answer and its correctness, where and for how long the
row was in latent mode, and the recorded tensors. An instance that fails (an unreadable image, a prompt the
model cannot take) is recorded as failed with its reason; the rest of the run goes on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..data.instances import Instance
from ..model.decoding import DecodeConfig, LatentDecoder
from ..model.conditions import warn_about_conditions
from ..errors import LatentProbeError
from ..model.recording import Recorder, RecordSpec
from .store import TraceWriter
from .common import decode_with_isolation, failed_record, manifest_for, progress_bar, row_record

log = logging.getLogger(__name__)


@dataclass
class TraceSummary:
    run_dir: str
    n_instances: int = 0
    n_ok: int = 0
    n_failed: int = 0
    n_skipped_resume: int = 0
    n_entered_latent: int = 0
    total_latent_steps: int = 0
    n_correct: int = 0
    n_unparsable: int = 0
    n_slot_forced: int = 0  # rows whose output had no answer prefix (latentprobe.model.answer_slot)
    failures: list[tuple[str, str]] = field(default_factory=list)
    chance: float | None = None  # expected accuracy of a uniform guess among the options
    warnings: list[str] = field(default_factory=list)
    n_in_folder: int = 0  # distinct instances the run folder holds in all (a resumed run may hold more than asked)

    @property
    def mean_latent_steps(self) -> float:
        return self.total_latent_steps / self.n_ok if self.n_ok else 0.0

    @property
    def accuracy(self) -> float:
        return self.n_correct / self.n_ok if self.n_ok else float("nan")

    def lines(self) -> list[str]:
        out = [f"instances       {self.n_instances} asked ({self.n_ok} ok, {self.n_failed} failed"
               + (f", {self.n_skipped_resume} already done" if self.n_skipped_resume else "") + ")"]
        if self.n_in_folder > self.n_instances:  # --resume --limit smaller than an earlier session's
            out.append(f"in the folder   {self.n_in_folder} instances in all: the figures below are the "
                       f"{self.n_instances} asked; similarity, probe and report read all {self.n_in_folder}")
        out += [
               f"latent mode     {self.n_entered_latent}/{self.n_ok} entered, mean {self.mean_latent_steps:.2f} steps",
               f"accuracy        {self.accuracy_line()}",
               f"answer slot     {self.n_ok - self.n_slot_forced}/{self.n_ok} found in the output, "
               f"{self.n_slot_forced} forced (prefix appended)",
               f"trace           {self.run_dir}"]
        out += [f"warning         {w}" for w in self.warnings]
        for iid, reason in self.failures[:5]:
            out.append(f"failed          {iid}: {reason}")
        if len(self.failures) > 5:
            out.append(f"failed          ... and {len(self.failures) - 5} more (see the index's error column)")
        return out

    def accuracy_line(self) -> str:
        """Clean accuracy with its count, the chance level and whether it is above chance (one-sided binomial)."""
        text = f"{self.accuracy:.3f} ({self.n_correct}/{self.n_ok} correct, {self.n_unparsable} unparsable)"
        if self.chance is not None and self.n_ok:
            text += f"; chance {self.chance:.3f}"
            if at_chance(self.n_correct, self.n_ok, self.chance):
                text += ": AT CHANCE (not above it at p < 0.05); the answers carry no signal to analyse"
        return text


def at_chance(n_correct: int, n: int, chance: float, alpha: float = 0.05) -> bool:
    """True when ``n_correct`` of ``n`` is not significantly above ``chance`` (exact one-sided binomial test)."""
    from scipy.stats import binomtest

    return n > 0 and binomtest(int(n_correct), int(n), chance, alternative="greater").pvalue >= alpha


def chance_level(instances: Sequence[Instance]) -> float | None:
    """Expected accuracy of a uniform guess among each instance's options (None without options)."""
    if not instances or not all(inst.options for inst in instances):
        return None
    return sum(1.0 / len(inst.options) for inst in instances) / len(instances)


def aligned_batches(instances: Sequence[Instance], batch_size: int, done: set[str]):
    """The batches of an uninterrupted run that still hold unfinished instances, with those instances' ids.

    Batches are cut from the full instance list, never from what is left, so a resumed run decodes every
    instance in the same batch (same padding, same kernels) as an uninterrupted one and its results are
    bit-identical; the finished members of a partly finished batch are decoded again but not written.
    """
    for start in range(0, len(instances), batch_size):
        chunk = list(instances[start:start + batch_size])
        todo = {inst.id for inst in chunk if inst.id not in done}
        if todo:
            yield chunk, todo


def trace(subject, instances: Sequence[Instance], out_dir: str | Path, *, config: DecodeConfig | None = None,
          spec: RecordSpec | None = None, batch_size: int = 8, resume: bool = False, data_source: str | None = None,
          progress: bool = False, shard_size: int = 64, writer_id: str = "w0") -> TraceSummary:
    """Decode every instance in latent mode where the protocol says so, and store the traces.

    >>> from latentprobe.model.subjects import load_subject
    >>> from latentprobe.data import builtin_instances
    >>> summary = trace(load_subject("tiny"), builtin_instances(4), "/tmp/lp-doc-trace")  # doctest: +SKIP
    """
    if not instances:
        raise LatentProbeError("the dataset is empty", "pass a data file with at least one instance")
    if batch_size < 1:
        raise LatentProbeError(f"batch size must be >= 1, got {batch_size}", "pass --batch-size 1 or more")
    config = config or DecodeConfig(max_new_tokens=subject.max_new_tokens)
    spec = spec or RecordSpec()
    warn_about_conditions(subject, instances, data_source)  # another task or image size: at chance, say so now
    decoder = LatentDecoder(subject, config)
    recorder = Recorder(decoder, spec)
    manifest = manifest_for(subject, instances, config, spec, recorder.layers, "trace", data_source,
                            extra={"batching": batching_record(batch_size)})
    from .distributed import rank_and_world

    writer = TraceWriter(out_dir, manifest, resume=resume, shard_size=shard_size, writer_id=writer_id,
                         shared=rank_and_world()[1] > 1)
    summary = TraceSummary(run_dir=str(Path(out_dir)), n_instances=len(instances), chance=chance_level(instances))
    done = {key[0] for key in writer.finished_keys()} if resume else set()
    summary.n_skipped_resume = sum(inst.id in done for inst in instances)
    bar = progress_bar(len(instances) - summary.n_skipped_resume, progress, "trace")
    with recorder, writer:
        for chunk, todo in aligned_batches(instances, batch_size, done):
            for inst, _, row, tensors, error in decode_with_isolation(decoder, subject, chunk, recorder):
                if inst.id not in todo:  # decoded again only to keep the batch as it was
                    continue
                extra = {"intervention": "clean", "target": "none", "seed": config.seed}
                if error is not None:
                    writer.add(failed_record(subject, inst, error, **extra))
                else:
                    writer.add(row_record(subject, inst, row, **extra), {"latent": row.latent_vectors, **tensors})
                bar.update(1)
    bar.close()
    _tally_from_store(summary, out_dir, [inst.id for inst in instances])
    summary.warnings += [f"resume re-ran the instances of damaged shard {d}" for d in writer.damaged]
    return summary


def batching_record(batch_size: int) -> dict:
    """How instances were grouped: a resume with the same batch size reproduces a run bit for bit; another
    batch size changes the padding and so float rounding (of order 1e-7 relative in float32)."""
    return {"batch_size": int(batch_size), "batches": "cut from the full instance list in data order"}


def clean_summary(run_dir: str | Path, instances: Sequence[Instance]) -> TraceSummary:
    """The trace summary (accuracy, chance, latent steps, failures) of the clean runs that ``run_dir`` holds for
    ``instances``: a trace's, or the clean pass of an intervention run (a study's trace)."""
    summary = TraceSummary(run_dir=str(Path(run_dir)), n_instances=len(instances), chance=chance_level(instances))
    _tally_from_store(summary, run_dir, [inst.id for inst in instances])
    return summary


def _tally_from_store(summary: TraceSummary, out_dir, instance_ids: list[str]):
    """Fill the summary from what is on disk for this run's instances (finished earlier or just now), so a
    resumed run reports the whole run, not only its last session."""
    from .store import TraceStore

    frame = TraceStore(out_dir).index()
    if "intervention" in frame.columns:
        frame = frame[frame.intervention.fillna("clean") == "clean"]
    summary.n_in_folder = int(frame.instance_id.nunique())
    frame = frame[frame.instance_id.isin(set(instance_ids))].drop_duplicates("instance_id", keep="last")
    ok = frame[frame.status == "ok"] if "status" in frame.columns else frame
    failed = frame[frame.status != "ok"] if "status" in frame.columns else frame.iloc[:0]
    summary.n_ok, summary.n_failed = len(ok), len(failed)
    summary.failures = list(zip(failed.instance_id, failed.error.fillna("")))
    if len(ok):
        summary.n_entered_latent = int(ok.entered_latent.astype(bool).sum())
        summary.total_latent_steps = int(ok.n_latent_steps.sum())
        summary.n_correct = int(ok.correct.astype(bool).sum())
        summary.n_unparsable = int((ok.answer_status == "unparsable").sum())
        if "answer_slot" in ok.columns:
            summary.n_slot_forced = int((ok.answer_slot == "forced").sum())
        if "reentered_latent" in ok.columns and ok.reentered_latent.fillna(False).astype(bool).any():
            again = int(ok.reentered_latent.fillna(False).astype(bool).sum())
            summary.warnings.append(f"{again} row(s) entered latent mode more than once (index: reentered_latent); "
                                    "latentprobe caps every phase, where Mirage's own loop never ends a second one")
    missing = len(instance_ids) - len(frame)
    if missing > 0:
        summary.warnings.append(f"{missing} instance(s) have no record (interrupted?); run again with --resume")
