"""`study --estimate`: what the full study will cost, from a pilot of a few instances, before paying for it.

The pilot runs the study's own edits stage (the same clean pass, edits and mediation runs) on the first few
instances in a temporary folder, counting decodes (`DecodeCounter`) and timing them. Decodes scale with the
number of instances exactly (every instance gets the same runs), and so do prompt prefills while every clean
batch's prefill fits the budget of `latentprobe.runs.kept_prefills` (beyond its first batches, or a large model's
first one, a batch prefills its clean prompt once more: one prefill per instance beyond the estimate); wall time
is extrapolated from the pilot's seconds per instance (batches of the study's size: the pilot runs at the same
batch size when it can), and so is the disk its stores take (every instance records the same tensors: all image tokens of the clean pass with
``image_states = "all"``, the largest part for a model with many image tokens); peak memory is the pilot's (one
batch of the same size is the peak of the full run, whose batches are alike) plus the prefills the full run keeps
(at most `KEPT_PREFILL_BATCHES` batches, and a budget in bytes). The pilot's effects then go
through `latentprobe plan`, which says per finding the n a decision needs at the study's margins. The pilot
folder is removed afterwards: nothing is written outside it.
"""

from __future__ import annotations

import math
import resource
import tempfile
import time
from pathlib import Path
from dataclasses import dataclass, field

import pandas as pd

from ..runs.kept_prefills import KEPT_PREFILL_BATCHES
from .config import StudyConfig, check_config
from .counting import DecodeCounter
from .edits import check_kinds_registered, study_edits
from .run import _edits_stage, load_study_subject, study_instances

DEFAULT_PILOT = 4


@dataclass
class SubjectEstimate:
    subject: str
    n_instances: int
    pilot_instances: int
    pilot_seconds: float
    pilot_prefill_rows: int
    pilot_decode_rows: int
    peak_memory_bytes: int
    peak_memory_kind: str
    interventions: int
    plan: pd.DataFrame = field(default_factory=pd.DataFrame)
    pilot_store_bytes: int = 0

    @property
    def expected_store_bytes(self) -> int:
        return math.ceil(self.pilot_store_bytes / self.pilot_instances * self.n_instances)

    @property
    def expected_decode_rows(self) -> int:
        return math.ceil(self.pilot_decode_rows / self.pilot_instances * self.n_instances)

    @property
    def expected_prefill_rows(self) -> int:
        return math.ceil(self.pilot_prefill_rows / self.pilot_instances * self.n_instances)

    @property
    def expected_seconds(self) -> float:
        return self.pilot_seconds / self.pilot_instances * self.n_instances

    def lines(self) -> list[str]:
        out = [f"{self.subject}: {self.n_instances} instances, {self.interventions} interventions "
               f"(pilot of {self.pilot_instances}: {self.pilot_seconds:.1f}s, {self.pilot_decode_rows} row decodes)",
               f"  expected decodes   {self.expected_decode_rows} rows decoded, {self.expected_prefill_rows} prompts "
               f"prefilled ({self.pilot_decode_rows / self.pilot_instances:.1f} and "
               f"{self.pilot_prefill_rows / self.pilot_instances:.1f} per instance; beyond the first "
               f"{KEPT_PREFILL_BATCHES} batches, up to one more prefill per instance)",
               f"  expected wall time {_duration(self.expected_seconds)} for the edits stage (report and maps extra)",
               f"  peak memory        {self.peak_memory_bytes / 2**30:.2f} GiB ({self.peak_memory_kind}, the "
               f"pilot's; the full run also keeps up to {KEPT_PREFILL_BATCHES} batches' prompt caches)",
               f"  expected disk      {_size(self.expected_store_bytes)} for the edits stage's store "
               f"({_size(self.pilot_store_bytes / self.pilot_instances)} per instance)"]
        if len(self.plan):
            for row in self.plan.itertuples():
                needed = row.needed_n
                shown = "-" if needed is None or (isinstance(needed, float) and math.isnan(needed)) else (
                    "unreachable" if isinstance(needed, float) and math.isinf(needed) else str(int(needed)))
                out.append(f"  plan {row.finding:<13} needs n = {shown} (pilot says {row.verdict}; margin "
                           f"{row.margin})")
        return out


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _size(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes:.0f} B"


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _peak_memory(device: str) -> tuple[int, str]:
    import torch

    if str(device).startswith("cuda") or device == "auto":
        if torch.cuda.is_available():
            return int(torch.cuda.max_memory_allocated()), "accelerator, torch.cuda.max_memory_allocated"
    # ru_maxrss is in kilobytes on Linux: the whole process's peak, the model's weights included
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process peak resident memory"


def estimate_study(config: StudyConfig, *, pilot: int = DEFAULT_PILOT, say=print) -> list[SubjectEstimate]:
    """Decode a pilot of ``pilot`` instances per subject and extrapolate the full study (module docstring)."""
    from ..errors import LatentProbeError
    from ..report.build import plan_runs

    if isinstance(pilot, bool) or not isinstance(pilot, int) or pilot < 2:
        raise LatentProbeError(f"--estimate-instances {pilot!r} is not a whole number >= 2",
                               "a pilot needs 2 instances at least (donor edits)")
    check_config(config)
    check_kinds_registered(config)
    out = []
    for name in config.subjects:
        instances, source = study_instances(config, name)
        chosen = list(instances)[:pilot]
        if len(chosen) < 2:
            raise LatentProbeError(f"{name}: the data hold {len(chosen)} instance(s)", "pass at least 2 instances")
        subject = load_study_subject(config, name)
        edits = study_edits(subject, config)
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
        except RuntimeError:
            pass
        with tempfile.TemporaryDirectory(prefix="latentprobe-estimate-") as tmp:
            started = time.perf_counter()
            with DecodeCounter() as counts:
                _edits_stage(subject, chosen, source, edits.interventions, Path(tmp) / "pilot", config,
                             progress=False, resume=False, shard=None)
            seconds = time.perf_counter() - started
            peak, kind = _peak_memory(config.device)
            store_bytes = _folder_bytes(Path(tmp) / "pilot")
            try:
                plan = plan_runs([Path(tmp) / "pilot"], config.margins_object())
            except LatentProbeError:
                plan = pd.DataFrame()
        estimate = SubjectEstimate(subject=name, n_instances=len(instances), pilot_instances=len(chosen),
                                   pilot_seconds=seconds, pilot_prefill_rows=counts.prefill_rows,
                                   pilot_decode_rows=counts.decode_rows, peak_memory_bytes=peak,
                                   peak_memory_kind=kind, interventions=len(edits.interventions), plan=plan,
                                   pilot_store_bytes=store_bytes)
        out.append(estimate)
    return out

