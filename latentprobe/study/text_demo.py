"""`latentprobe demo --text`: the whole analysis on the text organisms, in about a minute.

Data: the first 80 held-out questions of the ``hops`` task (2-hop lookups in a written permutation of 8 names;
`latentprobe.data.tasks.hops`), never seen in training. Subjects: the shipped text organisms, whose causal
structure is built in (`latentprobe.organisms.text_recipes`): ``organism-text-routed`` carries the question to
the answer only through its fed-back latents, ``organism-text-bypass`` answers from the question while its
latents are one constant vector out of the answer's reach. For each subject: a trace (every layer, the latent
steps, the last prompt token and the answer), latent edits (noise at 3x the per-dimension std, the dataset-mean
constant, another instance's latents patched in) and the input edit a text model has, a question swap, with the
NIE/NDE runs under both mediator definitions and every family's placebo; then probes of the chain's names
(start, first hop, answer), the report, verdicts.csv and truth.csv (each organism's built-in truth, expected
against decided).

    >>> from latentprobe.study.text_demo import run_text_demo
    >>> result = run_text_demo("runs/demo-text")            # doctest: +SKIP
    >>> result["truth"]                                     # doctest: +SKIP
"""

from __future__ import annotations

import time
from pathlib import Path

from ..data.loading import DEFAULT_INSTANCES
from ..errors import LatentProbeError

TEXT_DEMO_ORGANISMS = ("text-routed", "text-bypass")
# Every question in one batch: a forward's fixed cost dominates on models this small.
TEXT_DEMO_BATCH_SIZE = 80
# The names along each question's chain: what a probe of the latents could read.
TEXT_PROBE_ATTRIBUTES = ("answer", "start", "hop_1")


def available_text_subjects() -> list[str]:
    """The text organisms shipped with this installation (``organism-text-...``)."""
    from ..model.subjects import SUBJECTS, _register_builtin_families

    _register_builtin_families()
    return [f"organism-{name}" for name in TEXT_DEMO_ORGANISMS if f"organism-{name}" in SUBJECTS]


def text_demo_edits(seed: int = 0) -> list:
    """The demo's edits of a text latent subject: latent noise (3x std), the mean constant and a patch from
    another instance (all steps, recomputed), and a question swap (its placebos are added by `intervene`)."""
    from ..interventions import make_interventions

    return (make_interventions("latent", ["noise"], scales=[3.0], seed=seed)
            + make_interventions("latent", ["constant", "patch"], seed=seed)
            + make_interventions("input", ["question-swap"], seed=seed))


def run_text_demo(out_dir: str | Path, *, n_instances: int = DEFAULT_INSTANCES, seed: int = 0,
                  subjects: list[str] | None = None, n_boot: int = 500, progress: bool = False, say=print,
                  margins=None) -> dict:
    """Trace, intervene (both mediator definitions, placebos) and report on each text organism; returns the
    paths made (``report_md``, ``report_html``, ``verdicts``, ``truth``, ``runs``) and the ``seconds`` taken.

    ``n_instances`` held-out questions per subject (2 to 600; 80 lets a subject without a latent route reach
    ``disconnect`` at the default margin); ``margins`` are the verdicts' `latentprobe.verdicts.Margins`."""
    from ..report.build import build_report
    from .demo import one_thread_each

    if isinstance(n_instances, bool) or not isinstance(n_instances, int) or not 2 <= n_instances <= 600:
        raise LatentProbeError(f"demo n_instances={n_instances!r} is not a whole number from 2 to 600",
                               f"pass --n-instances between 2 and 600 (default {DEFAULT_INSTANCES})")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise LatentProbeError(f"demo output folder {out_dir} exists and is not empty", "choose a new --out folder")
    subjects = subjects or available_text_subjects()
    if not subjects:
        raise LatentProbeError("no text organism is installed (latentprobe/organisms/weights/text-*.safetensors)",
                               "train one with `latentprobe organisms train text-routed --overwrite-shipped`")
    started = time.time()
    with one_thread_each():  # tiny organisms: a second torch thread only spins (see `one_thread_each`)
        runs, instances = _decode_text_organisms(subjects, n_instances, seed, n_boot, out_dir, progress, say,
                                                 started)
        attributes = [a for a in TEXT_PROBE_ATTRIBUTES if a in instances[0].attributes]
        # the image demo's light probe grid: `latentprobe probe` on a trace is the thorough one
        fast_probes = dict(n_splits=3, inner_splits=2, Cs=(0.1, 1.0))
        report_dir = out_dir / "report"
        md, html = build_report(runs, report_dir, attributes=attributes, seed=seed, n_boot=n_boot,
                                probe_kwargs=fast_probes, margins=margins,
                                title="latentprobe demo --text: do the text organisms' latent steps carry the "
                                      "question to the answer?", say=say)
    truth = write_text_truth(report_dir, subjects)
    return {"report_md": md, "report_html": html, "runs": runs, "seconds": time.time() - started,
            "verdicts": report_dir / "verdicts.csv", "truth": truth}


def _decode_text_organisms(subjects, n_instances, seed, n_boot, out_dir, progress, say, started):
    """Each text organism's trace and intervention run: (run folders, the last one's instances)."""
    from ..model.decoding import DecodeConfig
    from ..model.recording import RecordSpec
    from ..model.subjects import SUBJECTS, load_subject
    from ..runs.intervene import intervene
    from ..runs.trace import trace

    runs, instances, source = [], [], None
    for name in subjects:
        spec = SUBJECTS.get(name)
        if spec is None or getattr(spec, "backbone", None) != "text":
            raise LatentProbeError(f"demo --text: {name!r} is not a text subject",
                                   f"choose among {', '.join(available_text_subjects()) or 'the text organisms'}")
        subject = load_subject(name)
        instances, source = spec.default_instances(limit=n_instances)
        config = DecodeConfig(max_new_tokens=subject.max_new_tokens, seed=seed)
        trace_dir = out_dir / "runs" / f"{name}-trace"
        summary = trace(subject, instances, trace_dir, config=config, spec=RecordSpec(layers="all", answer=True),
                        batch_size=TEXT_DEMO_BATCH_SIZE, data_source=source, progress=progress)
        runs.append(trace_dir)
        edits = text_demo_edits(seed)
        iv_dir = out_dir / "runs" / f"{name}-intervene"
        intervene(subject, instances, edits, iv_dir, config=config, batch_size=TEXT_DEMO_BATCH_SIZE, seed=seed,
                  n_boot=n_boot, progress=progress, data_source=source, mediators=("fed_back", "all_layers"))
        runs.append(iv_dir)
        say(f"subject   {name:<20} accuracy {summary.accuracy:.2f} (chance {1 / len(instances[0].options):.3f}), "
            f"latent steps {summary.mean_latent_steps:.1f}, {len(edits)} edits + placebos "
            f"({time.time() - started:.0f}s)")
    say(f"data      {len(instances)} held-out hops questions per subject ({source})")
    return runs, instances


def write_text_truth(report_dir: Path, subjects: list[str]) -> Path | None:
    """``truth.csv`` beside verdicts.csv: each organism's built-in truth (expected) against the decided verdict."""
    import pandas as pd

    from ..fileio import atomic_write
    from ..organisms.truth import compare_with_truth

    verdicts = Path(report_dir) / "verdicts.csv"
    organisms = [s for s in subjects if s.startswith("organism-")]
    if not organisms or not verdicts.exists():
        return None
    table = compare_with_truth(pd.read_csv(verdicts), organisms)
    return atomic_write(Path(report_dir) / "truth.csv", lambda tmp: table.to_csv(tmp, index=False))
