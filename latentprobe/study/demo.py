"""`latentprobe demo`: the whole analysis on the built-in default, in a few minutes on a laptop CPU.

The demo is a study (`latentprobe.study.run.run_study`, the code path of `latentprobe study`) with a study file of
its own (`demo_config`): every shipped model organism (whose causal structure is known: `bottleneck` routes
everything through its latents, `shortcut` ignores them), or the random-weight `tiny` subject when no organism is
installed, on the organisms' own held-out mental-transformation questions; the edits, probe grid and bootstrap
sized for minutes on a CPU. The run folder is a study folder (``study.toml``, ``stages.json``, ``runs/SUBJECT``,
``report/``): ``latentprobe study --config runs/demo/study.toml --out NEW`` repeats the demo, and
``latentprobe study --out runs/demo --resume`` continues a killed one (the report included; ``truth.csv``, each
organism's built-in truth against the decided verdicts, is the demo's own addition beside verdicts.csv).
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

from ..data.loading import DEFAULT_INSTANCES
from ..errors import LatentProbeError
from .config import DEFAULT_PLACEBO, StudyConfig

log = logging.getLogger(__name__)

# Together their built-in truths exhibit every finding both ways (latentprobe.organisms.truth).
DEMO_ORGANISMS = ("bottleneck", "shortcut", "blind", "collapsed", "mirage", "lvr", "capimagine", "direct")
# Enough held-out questions for an organism without a latent route to reach `disconnect` at the default margin:
# 0 answer changes in n give an exact 95% upper bound of 1 - 0.025^(1/n), below 0.05 from n = 72 on.
DEMO_N_INSTANCES = DEFAULT_INSTANCES  # the one rule for default instance counts (latentprobe.data.loading)
# Instances decoded together. The organisms are so small that a forward's fixed cost dominates: one batch of 80
# instead of five of 16 took 3.4x less CPU for CapImagine's trace (26.1 s -> 7.7 s) and 2.3x less for the
# bottleneck's (5.5 s -> 2.4 s), at 0.59 GB peak; answers do not depend on the batch size beyond float rounding.
DEMO_BATCH_SIZE = 80
DEMO_TITLE = "latentprobe demo: do the organisms' latent tokens carry the image to the answer?"
# The demo's edits: one information and one disruption edit per family, and the strong noise scale only (3x the
# clean latents' per-dimension std, ROME's "strong" corruption); question swaps and the component controls are
# left to `latentprobe study`. Kinds a subject has no target for are skipped per subject (latent edits on the
# text-mediator and plain organisms, text edits on the latent ones).
DEMO_INFORMATION = ("patch", "image-swap", "text-swap")
DEMO_DISRUPTION = ("noise", "constant", "image-blank", "text-shuffle")
DEMO_NOISE_SCALES = (3.0,)
# A lighter probe grid than `latentprobe probe` keeps the demo within minutes: 3 outer and 2 inner folds, ridge
# strengths 10 and 1 (the inverse strengths C = 0.1 and 1 of the demo's earlier driver, in the same order).
DEMO_PROBE_GRID = dict(probe_folds=3, probe_inner_folds=2, probe_alphas=[10.0, 1.0])
DEMO_BOOTSTRAP = 500
# Collapse and probes read three times as many instances as the edits (a clean trace costs about a second per
# organism; the edits are the expensive part): affirming `limited` needs the latents' probe interval inside the
# 0.1 margin, which a ridge probe's +-0.12 at 80 instances cannot show and +-0.06 at 240 can.
DEMO_READOUT_FACTOR = 3
DEMO_HELD_OUT = 600  # the organisms' held-out split (latentprobe.organisms.training.organism_held_out_data)


def available_subjects() -> list[str]:
    from ..model.subjects import SUBJECTS, _register_builtin_families

    _register_builtin_families()
    found = [f"organism-{name}" for name in DEMO_ORGANISMS if f"organism-{name}" in SUBJECTS]
    return found or ["tiny"]


def demo_config(subjects: list[str] | None = None, *, n_instances: int = DEMO_N_INSTANCES, seed: int = 0,
                n_boot: int = DEMO_BOOTSTRAP, margins=None) -> StudyConfig:
    """The demo's study file: ``subjects`` (default: every shipped organism) on their own held-out questions, one
    batch of `DEMO_BATCH_SIZE`, every layer and every image token of the clean pass recorded, the demo's edits
    with both mediator definitions and every family's placebo, collapse and probes on `DEMO_READOUT_FACTOR` times
    as many instances (a clean trace), the light probe grid, ``n_boot`` bootstrap
    resamples and ``margins`` (a `latentprobe.verdicts.Margins`; the defaults when None).

    >>> demo_config(["organism-bottleneck"], n_instances=12).probe_folds
    3
    """
    return StudyConfig(subjects=list(subjects or available_subjects()), n_instances=n_instances, seed=seed,
                       batch_size=DEMO_BATCH_SIZE, information=list(DEMO_INFORMATION),
                       disruption=list(DEMO_DISRUPTION), noise_scales=list(DEMO_NOISE_SCALES),
                       mediators=["fed_back", "all_layers"], placebo=list(DEFAULT_PLACEBO), controls=[],
                       image_states="all", bootstrap=n_boot, margins=margin_overrides(margins),
                       readout_instances=min(DEMO_READOUT_FACTOR * n_instances, DEMO_HELD_OUT), **DEMO_PROBE_GRID)


def margin_overrides(margins) -> dict[str, float]:
    """The fields of ``margins`` that differ from the defaults: what a study file's [margins] table states."""
    import dataclasses

    from ..verdicts.margins import Margins

    if margins is None:
        return {}
    defaults = Margins()
    return {f.name: getattr(margins, f.name) for f in dataclasses.fields(Margins)
            if getattr(margins, f.name) != getattr(defaults, f.name)}


def run_demo(out_dir: str | Path, *, n_instances: int = DEMO_N_INSTANCES, seed: int = 0,
             subjects: list[str] | None = None, n_boot: int = DEMO_BOOTSTRAP, progress: bool = False, say=print,
             margins=None) -> dict:
    """Run the demo's study (`demo_config`) into ``out_dir`` and write ``report/truth.csv``; returns the paths made.

    ``n_instances`` held-out questions per subject (at least 2, at most the test split); ``margins`` are the
    verdicts' `latentprobe.verdicts.Margins` (default margins when None)."""
    from .run import run_study

    if isinstance(n_instances, bool) or not isinstance(n_instances, int) or n_instances < 2:
        raise LatentProbeError(f"demo n_instances={n_instances!r} is not a whole number >= 2",
                               f"pass --n-instances of at least 2 (default {DEMO_N_INSTANCES})")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise LatentProbeError(f"demo output folder {out_dir} exists and is not empty", "choose a new --out folder")
    started = time.time()
    config = demo_config(subjects, n_instances=n_instances, seed=seed, n_boot=n_boot, margins=margins)
    data_file = demo_data(n_instances)  # each organism's own held-out split: the same questions for all of them
    say(f"data      {n_instances} held-out mental-transformation questions ({data_file})")
    with one_thread_each():
        result = run_study(config, out_dir, progress=progress, say=say, title=DEMO_TITLE)
    truth = write_truth_comparison(out_dir / "report", config.subjects)
    return {"report_md": result.report_md, "report_html": result.report_html, "runs": result.runs,
            "seconds": time.time() - started, "verdicts": result.verdicts, "truth": truth,
            "study": out_dir / "study.toml"}


@contextlib.contextmanager
def one_thread_each():
    """torch, BLAS and OpenMP on one thread in this process while the demo runs (restored after). The organisms
    are tiny: a forward is many small operations, between which OpenMP's threads spin, taking the core the
    report's analysis processes (`latentprobe.stats.parallel`) would use. Measured on 2 cores: 159 s -> 104 s of
    CPU and 89 s -> 60 s wall for the whole demo, with the same verdicts and tables to the last digit."""
    import torch

    from ..stats.parallel import one_blas_thread

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with one_blas_thread():
            yield
    finally:
        torch.set_num_threads(previous)


def write_truth_comparison(report_dir: Path, subjects: list[str]) -> Path | None:
    """``truth.csv`` beside verdicts.csv: each organism's built-in truth (expected) against the decided verdict."""
    import pandas as pd

    from ..fileio import atomic_write
    from ..organisms.truth import compare_with_truth

    organisms = [s for s in subjects if s.startswith("organism-")]
    verdicts = report_dir / "verdicts.csv"
    if not organisms or not verdicts.exists():
        return None
    table = compare_with_truth(pd.read_csv(verdicts), organisms)
    return atomic_write(report_dir / "truth.csv", lambda tmp: table.to_csv(tmp, index=False))


def demo_data(n_instances: int | None = None) -> Path:
    """The first ``n_instances`` of the organisms' own held-out split (generated once, deterministically, into
    the latentprobe cache; only the images used are written); it shares no instance with their training data."""
    from ..organisms.recipes import ORGANISMS
    from ..organisms.training import organism_held_out_data

    return organism_held_out_data(ORGANISMS["bottleneck"], n_instances)
