"""`latentprobe demo`: the study on the shipped model organisms, in a few minutes on a laptop CPU.

The demo IS a study (`latentprobe.study.run_study`, the same stages, files and report as a user's study): its
study file (`demo_config`) names the organisms, 80 of their held-out questions and a light probe grid, and keeps
every other default. Subjects: the shipped model organisms (whose causal structure is known: `bottleneck` routes
everything through its latents, `shortcut` ignores them), or the random-weight `tiny` subject when no organism is
installed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import LatentProbeError
from .config import StudyConfig

log = logging.getLogger(__name__)

DEMO_ORGANISMS = ("bottleneck", "shortcut", "mirage", "lvr", "capimagine", "direct")
# Enough held-out questions for an organism without a latent route to reach `disconnect` at the default margin:
# 0 answer changes in n give an exact 95% upper bound of 1 - 0.025^(1/n), below 0.05 from n = 72 on.
DEMO_N_INSTANCES = 80
DEMO_TITLE = "latentprobe demo: do the organisms' latent tokens carry the image to the answer?"


def available_subjects() -> list[str]:
    from ..model.subjects import SUBJECTS, _register_builtin_families

    _register_builtin_families()
    found = [f"organism-{name}" for name in DEMO_ORGANISMS if f"organism-{name}" in SUBJECTS]
    return found or ["tiny"]


def demo_config(n_instances: int = DEMO_N_INSTANCES, seed: int = 0, subjects: list[str] | None = None,
                n_boot: int = 500) -> StudyConfig:
    """The demo's study file: the organisms, ``n_instances`` of their held-out split, batches of 16, and a probe
    grid light enough for minutes on a CPU (3 folds, 2 inner folds, ridge strengths 10 and 1); `latentprobe study`
    defaults to the thorough grid."""
    return StudyConfig(subjects=list(subjects or available_subjects()), n_instances=n_instances, seed=seed,
                       batch_size=16, bootstrap=n_boot, probe_folds=3, probe_inner_folds=2,
                       probe_alphas=[10.0, 1.0])


def run_demo(out_dir: str | Path, *, n_instances: int = DEMO_N_INSTANCES, seed: int = 0,
             subjects: list[str] | None = None, n_boot: int = 500, progress: bool = False, say=print,
             margins=None) -> dict:
    """The demo study into ``out_dir``; returns the paths made.

    ``n_instances`` held-out questions per subject (at least 2, at most the test split); ``margins`` are the
    verdicts' `latentprobe.verdicts.Margins` (default margins when None)."""
    import dataclasses

    from .run import run_study

    if isinstance(n_instances, bool) or not isinstance(n_instances, int) or n_instances < 2:
        raise LatentProbeError(f"demo n_instances={n_instances!r} is not a whole number >= 2",
                               f"pass --n-instances of at least 2 (default {DEMO_N_INSTANCES})")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise LatentProbeError(f"demo output folder {out_dir} exists and is not empty", "choose a new --out folder")
    config = demo_config(n_instances, seed, subjects, n_boot)
    if margins is not None:
        config.margins = {f.name: getattr(margins, f.name) for f in dataclasses.fields(margins)}
    result = run_study(config, out_dir, progress=progress, say=say, title=DEMO_TITLE)
    return {"report_md": result.report_md, "report_html": result.report_html, "runs": result.runs,
            "seconds": result.seconds, "verdicts": result.verdicts, "study": result}


def demo_data(n_instances: int | None = None) -> Path:
    """The first ``n_instances`` of the organisms' own held-out split (generated once, deterministically, into
    the latentprobe cache; only the images used are written); it shares no instance with their training data."""
    from ..organisms.recipes import ORGANISMS
    from ..organisms.training import organism_held_out_data

    return organism_held_out_data(ORGANISMS["bottleneck"], n_instances)
