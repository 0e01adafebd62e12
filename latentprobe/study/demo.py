"""`latentprobe demo`: the whole analysis on the built-in default, in a few minutes on a laptop CPU.

Data: a held-out set of the mental-transformation task. Subjects: the shipped model organisms (whose causal
structure is known: `bottleneck` routes everything through its latents, `shortcut` ignores them), or the
random-weight `tiny` subject when no organism is installed. For each subject: trace, latent and input
interventions with mediation, then similarity, probes and one report with a verdict per finding.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ..data.instances import load_jsonl
from ..model.decoding import DecodeConfig
from ..data.loading import DEFAULT_INSTANCES
from ..errors import LatentProbeError

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


def available_subjects() -> list[str]:
    from ..model.subjects import SUBJECTS, _register_builtin_families

    _register_builtin_families()
    found = [f"organism-{name}" for name in DEMO_ORGANISMS if f"organism-{name}" in SUBJECTS]
    return found or ["tiny"]


def run_demo(out_dir: str | Path, *, n_instances: int = DEMO_N_INSTANCES, seed: int = 0,
             subjects: list[str] | None = None, n_boot: int = 500, progress: bool = False, say=print,
             margins=None) -> dict:
    """Trace, intervene (with both mediator definitions) and report on each subject; returns the paths made.

    ``n_instances`` held-out questions per subject (at least 2, at most the test split); ``margins`` are the
    verdicts' `latentprobe.verdicts.Margins` (default margins when None)."""
    from ..report.build import build_report
    from ..runs.intervene import intervene
    from ..interventions import make_interventions
    from ..model.recording import RecordSpec
    from ..model.subjects import load_subject
    from ..runs.trace import trace

    if isinstance(n_instances, bool) or not isinstance(n_instances, int) or n_instances < 2:
        raise LatentProbeError(f"demo n_instances={n_instances!r} is not a whole number >= 2",
                               f"pass --n-instances of at least 2 (default {DEMO_N_INSTANCES})")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise LatentProbeError(f"demo output folder {out_dir} exists and is not empty", "choose a new --out folder")
    started = time.time()
    subjects = subjects or available_subjects()
    data_file = demo_data(n_instances)
    available = load_jsonl(data_file, split="test")
    if n_instances > len(available):
        raise LatentProbeError(f"demo n_instances={n_instances!r} is more than the {len(available)} held-out questions",
                               f"pass --n-instances between 2 and {len(available)} (default {DEMO_N_INSTANCES})")
    instances = available[:n_instances]
    say(f"data      {len(instances)} held-out mental-transformation questions ({data_file})")
    runs = []
    for name in subjects:
        subject = load_subject(name)
        config = DecodeConfig(max_new_tokens=subject.max_new_tokens, seed=seed)
        trace_dir = out_dir / "runs" / f"{name}-trace"
        # every image token (not only their mean): the collapse verdict's yardstick is a single image token
        summary = trace(subject, instances, trace_dir, config=config, spec=RecordSpec(layers="all", image="all"),
                        batch_size=DEMO_BATCH_SIZE, data_source=str(data_file), progress=progress)
        runs.append(trace_dir)
        interventions = make_interventions("input", ["image-swap", "image-blank"], seed=seed)
        if subject.protocol is not None:
            interventions = make_interventions("latent", ["noise"], scales=[3.0], seed=seed) + \
                make_interventions("latent", ["constant", "patch"], seed=seed) + interventions
        if subject.mediator == "text":
            interventions += make_interventions("text", ["text-swap", "text-shuffle"], seed=seed)
        iv_dir = out_dir / "runs" / f"{name}-intervene"
        intervene(subject, instances, interventions, iv_dir, config=config, batch_size=DEMO_BATCH_SIZE, seed=seed,
                  n_boot=n_boot, progress=progress, data_source=str(data_file), mediators=("fed_back", "all_layers"))
        runs.append(iv_dir)
        say(f"subject   {name:<11} accuracy {summary.accuracy:.2f}, latent steps {summary.mean_latent_steps:.1f}, "
            f"{len(interventions)} interventions ({time.time() - started:.0f}s)")
    attributes = _probe_attributes(instances)
    # A lighter probe grid than the CLI default keeps the demo within minutes; `latentprobe probe` is thorough.
    fast_probes = dict(n_splits=3, inner_splits=2, Cs=(0.1, 1.0))
    md, html = build_report(runs, out_dir / "report", attributes=attributes, seed=seed, n_boot=n_boot,
                            probe_kwargs=fast_probes, margins=margins,
                            title="latentprobe demo: do the organisms' latent tokens carry the image to the answer?")
    truth = write_truth_comparison(out_dir / "report", subjects)
    return {"report_md": md, "report_html": html, "runs": runs, "seconds": time.time() - started,
            "verdicts": out_dir / "report" / "verdicts.csv", "truth": truth}


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


def _probe_attributes(instances) -> list[str]:
    keys = set(instances[0].attributes)
    wanted = [k for k in ("answer", "cell_0_colour") if k in keys]
    return wanted or (["answer"] if instances[0].answer else [])
