"""`latentprobe study`: every stage the verdicts need, on one subject (or several), into one run folder.

Stages, per subject, then once:

1. **edits** (`latentprobe.runs.intervene`): ONE clean decode per instance, recording every layer (this is the
   trace: the collapse and probe analyses read its clean records), then every information and disruption edit,
   the placebo and the controls this version registers, each decoded from that clean run's prefill where the edit
   cannot change the prompt, with both mediator definitions;
   **readout** (``readout_instances``, right after the subject's edits): a clean trace of more instances for the
   collapse and probes. In one process the subject's collapse and probes then start at once in an analysis process
   of their own (`latentprobe.stats.parallel`), beside the next subject's decodes;
2. **maps** (``[maps] enabled``): patching maps, grounding maps and the logit lens (`latentprobe.where`);
3. **report** (`latentprobe.report.build.build_report`): effects, collapse, probes and verdicts over every
   subject's edits run, in one Markdown + HTML report with verdicts.csv (it collects the analyses started above).

The run folder holds ``study.toml`` (the resolved study file; ``--config`` takes it back), ``stages.json`` (the
finished stages), ``runs/SUBJECT`` (one store per subject), ``maps/SUBJECT-KIND`` and ``report/``. A killed study
continues with ``--resume``: finished stages are skipped, an unfinished edits stage continues its store without
losing or writing twice any record (the store's own resume), maps restart, and the report is built again.

Under ``torchrun`` the edits stage shards by instance: each rank decodes the clean runs and edits of its share,
waits for the others, then binds donors and latent statistics from every rank's clean runs (as one process
would); rank 0 writes the tables, the maps and the report.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LatentProbeError
from ..fileio import atomic_write_text
from .config import StudyConfig, check_config, study_toml
from .edits import check_kinds_registered, study_edits

log = logging.getLogger(__name__)

STUDY_FILE = "study.toml"
STAGES_FILE = "stages.json"
# A lighter probe grid than `latentprobe probe` for small studies would change verdicts silently; the study file
# states the grid instead (the demo's file chooses a light one).


@dataclass
class StudyResult:
    """What a study made: the report, the verdicts, each subject's runs, and the stages this call ran."""

    out_dir: Path
    report_md: Path | None = None
    report_html: Path | None = None
    verdicts: Path | None = None
    runs: list[Path] = field(default_factory=list)
    maps: list[Path] = field(default_factory=list)
    stages_run: list[str] = field(default_factory=list)
    stages_skipped: list[str] = field(default_factory=list)
    skipped_edits: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        out = [f"study     {self.out_dir / STUDY_FILE}"]
        for name, skipped in self.skipped_edits.items():
            for kind, reason in skipped:
                out.append(f"skipped   {name}: {kind} ({reason})")
        if self.stages_skipped:
            out.append(f"resumed   {len(self.stages_skipped)} finished stage(s) kept: {', '.join(self.stages_skipped)}")
        out += [f"run       {r}" for r in self.runs] + [f"map       {m}" for m in self.maps]
        if self.report_html:
            out += [f"report    {self.report_html}", f"markdown  {self.report_md}"]
        out.append(f"took      {self.seconds:.0f}s")
        return out


# -- what a study runs on ---------------------------------------------------------------------------------
def study_instances(config: StudyConfig, subject_name: str, n_instances: int | None = None):
    """(instances, source label) for one subject: the study file's data, or the subject's own default (an
    organism's held-out split, never seen in training; the built-in images for any other subject). Without
    n_instances, the one rule of every command (`latentprobe.data.loading.default_limit`): every instance of the
    study file's data, the first 80 of the subject's own (so `study --subject organism-X` studies the demo's
    questions)."""
    from ..data.loading import default_limit, load_instances

    limit = default_limit(config.data, config.n_instances if n_instances is None else n_instances)
    if config.data is not None:
        instances, source = load_instances(config.data, limit=limit, split=config.split,
                                           benchmark_options=_benchmark_options(subject_name, config.data))
        return instances, source
    recipe = _organism_recipe(subject_name)
    if recipe is not None:
        from ..organisms.training import organism_held_out_data

        path = organism_held_out_data(recipe, limit)
        return load_instances(str(path), split="test")
    return load_instances(None, limit=limit)


def _organism_recipe(subject_name: str):
    if not str(subject_name).startswith("organism-"):
        return None
    from ..organisms.recipes import ORGANISMS

    return ORGANISMS.get(str(subject_name).removeprefix("organism-"))


def _benchmark_options(subject_name: str, data: str) -> dict:
    """A family's own evaluation settings for a benchmark (Mirage: VSP levels 3-6), as `trace` applies them."""
    if ":" not in data or Path(data).exists():
        return {}
    from ..model.subjects import _register_builtin_families
    from ..model.subjects.families import benchmark_options

    _register_builtin_families()
    try:
        return benchmark_options(subject_name, data.partition(":")[0]) or {}
    except LatentProbeError:
        return {}


def load_study_subject(config: StudyConfig, name: str):
    """The subject as the study file says (checkpoint, protocol, device, dtype)."""
    from ..model.subjects import load_subject

    kwargs = {"checkpoint": config.checkpoint} if config.checkpoint else {}
    return load_subject(name, protocol=config.protocol, device=config.device, dtype=config.dtype, **kwargs)


def decode_config(config: StudyConfig, subject):
    from ..model.decoding import DecodeConfig

    return DecodeConfig(max_new_tokens=config.max_new_tokens or subject.max_new_tokens, seed=config.seed)


def probe_attributes(config: StudyConfig, instances) -> list[str]:
    """The study file's probe attributes, or the answer and the first cell's colour where the data have them."""
    if config.probe_attributes:
        return list(config.probe_attributes)
    keys = set(instances[0].attributes) if instances else set()
    wanted = [k for k in ("answer", "cell_0_colour") if k in keys]
    return wanted or (["answer"] if instances and instances[0].answer else [])


def subject_folder(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))


# -- the run folder ---------------------------------------------------------------------------------------
def prepare_folder(config: StudyConfig, out_dir: Path, resume: bool) -> set[str]:
    """Check the folder against ``resume`` and return the finished stages; writes nothing."""
    if not resume:
        if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
            raise LatentProbeError(f"study folder {out_dir} exists and is not empty",
                                   "choose a new --out, or pass --resume to continue the study in it")
        return set()
    stored = out_dir / STUDY_FILE
    if not stored.is_file():
        raise LatentProbeError(f"cannot resume {out_dir}: it holds no {STUDY_FILE}",
                               "run the study without --resume into a new --out")
    from .config import load_study_file

    previous = load_study_file(stored)
    if previous != config:
        differing = [f for f in config.__dataclass_fields__ if getattr(previous, f) != getattr(config, f)]
        key = differing[0]
        raise LatentProbeError(f"cannot resume {out_dir}: its study file says {key} = {getattr(previous, key)!r}, "
                               f"this run {getattr(config, key)!r}",
                               f"resume with the folder's own {STUDY_FILE} (--resume alone), or study into a new --out")
    stages = out_dir / STAGES_FILE
    if not stages.exists():
        return set()
    try:
        return set(json.loads(stages.read_text(encoding="utf-8"))["done"])
    except (ValueError, KeyError, TypeError):
        log.warning("%s is damaged; every stage is checked again", stages)
        return set()


def _mark_done(out_dir: Path, done: set[str], stage: str):
    done.add(stage)
    atomic_write_text(out_dir / STAGES_FILE, json.dumps({"done": sorted(done)}, indent=1) + "\n")


# -- the study ----------------------------------------------------------------------------------------------
def run_study(config: StudyConfig, out_dir: str | Path, *, resume: bool = False, progress: bool = False,
              say=print, title: str | None = None, prepare=None) -> StudyResult:
    """Run every stage of ``config`` into ``out_dir`` (see the module docstring); returns what was made.

    Everything that can be refused (the study file, the data, each subject's edits) is refused before the first
    model decodes. ``prepare(subject)`` may return a context manager held while that subject decodes (the tests
    script stand-in checkpoints' outputs with it).

    >>> run_study(StudyConfig(subjects=["organism-bottleneck"], n_instances=80), "runs/study")   # doctest: +SKIP
    """
    from ..runs.distributed import barrier, init_if_launched, rank_and_world

    started = time.time()
    check_config(config)
    check_kinds_registered(config)
    out_dir = Path(out_dir)
    rank, world = rank_and_world()
    init_if_launched()  # under torchrun: the ranks' barriers and the latent statistics' sums need the group
    done = prepare_folder(config, out_dir, resume)
    data = {name: study_instances(config, name) for name in config.subjects}
    for name, (instances, source) in data.items():
        if len(instances) < 2:
            raise LatentProbeError(f"{name}: the data ({source}) hold {len(instances)} instance(s); a study's donor "
                                   "edits need at least 2", "pass more data, or a larger n_instances")
    barrier()  # every rank has checked the folder before rank 0 writes into it
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / STUDY_FILE, study_toml(config))
    result = StudyResult(out_dir=out_dir)
    report_runs, started_analyses = [], {}
    # One process: each subject's readout follows its edits, and its collapse and probes (most of the report's
    # time) start at once in processes of their own, beside the next subject's decodes. Under torchrun rank 0
    # makes every readout after the ranks' edits.
    pipelined = world == 1 and "report" not in done
    attributes = probe_attributes(config, data[config.subjects[0]][0])
    if pipelined:
        from ..stats.parallel import start_processes

        start_processes(len(config.subjects), preload=["latentprobe.report.build"])  # their imports take seconds
    runs = []
    for name in config.subjects:
        instances, source = data[name]
        run_dir = out_dir / "runs" / subject_folder(name)
        runs.append(run_dir)
        stage = f"edits:{name}"
        if stage in done:
            result.stages_skipped.append(stage)
        else:
            subject = load_study_subject(config, name)
            edits = study_edits(subject, config)
            result.skipped_edits[name] = edits.skipped
            with prepare(subject) if prepare is not None else contextlib.nullcontext():
                _edits_stage(subject, instances, source, edits.interventions, run_dir, config, progress=progress,
                             resume=run_dir.exists(), shard=(rank, world) if world > 1 else None)
            result.stages_run.append(stage)
            for line in subject_lines(name, run_dir, instances, edits.interventions, time.time() - started):
                say(line)
            if rank == 0:
                _mark_done(out_dir, done, stage)
        if world == 1:
            subject_runs = _readout_stage(config, name, data, run_dir, out_dir, done, result, progress=progress,
                                          say=say)
            report_runs += subject_runs
            if pipelined:
                started_analyses.update(_start_analysis(config, attributes, subject_runs, out_dir / "report"))
    result.runs = runs
    if rank != 0:  # the other ranks' share is on disk; rank 0 makes the readouts, the maps and the report
        result.seconds = time.time() - started
        return result
    if world > 1:
        report_runs = [d for name, run_dir in zip(config.subjects, runs)
                       for d in _readout_stage(config, name, data, run_dir, out_dir, done, result,
                                               progress=progress, say=say)]
    result.runs = runs = report_runs
    if config.maps:
        for name in config.subjects:
            for kind in config.map_kinds:
                stage = f"maps:{name}:{kind}"
                folder = out_dir / "maps" / f"{subject_folder(name)}-{kind}"
                result.maps.append(folder)
                if stage in done:
                    result.stages_skipped.append(stage)
                    continue
                if folder.exists():  # an interrupted map: maps have no record-level resume, so it starts again
                    shutil.rmtree(folder)
                _map_stage(kind, config, name, data[name][0], data[name][1], folder)
                result.stages_run.append(stage)
                _mark_done(out_dir, done, stage)
    report_dir = out_dir / "report"
    result.report_md, result.report_html = report_dir / "report.md", report_dir / "report.html"
    result.verdicts = report_dir / "verdicts.csv"
    if "report" in done and not result.stages_run:  # a finished study: nothing new to report
        result.stages_skipped.append("report")
        result.seconds = time.time() - started
        return result
    from ..report.build import build_report

    md, html = build_report(runs, report_dir, attributes=attributes, seed=config.seed, n_boot=config.bootstrap,
                            probe_kwargs=_probe_kwargs(config), margins=config.margins_object(),
                            title=title or f"latentprobe study: {', '.join(config.subjects)}", say=say,
                            started=started_analyses)
    if result.maps:
        _append_maps_section(md, [m for m in result.maps if m.exists()])
    result.stages_run.append("report")
    _mark_done(out_dir, done, "report")
    result.report_md, result.report_html, result.verdicts = md, html, report_dir / "verdicts.csv"
    result.seconds = time.time() - started
    return result


def _readout_stage(config: StudyConfig, name: str, data: dict, run_dir: Path, out_dir: Path, done: set[str],
                   result: StudyResult, *, progress, say) -> list[Path]:
    """With ``readout_instances`` above the subject's edit instances: a clean trace of that many instances of the
    same data (every layer, the study's image states) into ``runs/SUBJECT-readout``, listed before the subject's
    edits store so the report's collapse and probes read it (the causal findings read the edits store). Returns
    the subject's runs as the report lists them."""
    instances, _ = data[name]
    if config.readout_instances is None or config.readout_instances <= len(instances):
        return [run_dir]
    from ..model.recording import RecordSpec
    from ..runs.trace import trace

    readout, source = study_instances(config, name, config.readout_instances)
    folder = out_dir / "runs" / f"{subject_folder(name)}-readout"
    stage = f"readout:{name}"
    if stage in done:
        result.stages_skipped.append(stage)
        return [folder, run_dir]
    subject = load_study_subject(config, name)
    trace(subject, readout, folder, config=decode_config(config, subject), batch_size=config.batch_size,
          spec=RecordSpec(layers="all", image=config.image_states), resume=folder.exists(), data_source=source,
          progress=progress)
    say(f"readout   {name:<11} {len(readout)} instances traced for collapse and probes")
    result.stages_run.append(stage)
    _mark_done(out_dir, done, stage)
    return [folder, run_dir]


def _start_analysis(config: StudyConfig, attributes: list[str], subject_runs: list[Path], report_dir: Path) -> dict:
    """The subject's collapse and probes, started in the report's processes with the report's settings."""
    from ..report.build import start_subject_analysis

    return start_subject_analysis(subject_runs, report_dir, count=len(config.subjects), attributes=attributes,
                                  seed=config.seed, n_boot=config.bootstrap, probe_kwargs=_probe_kwargs(config))


def _probe_kwargs(config: StudyConfig) -> dict:
    return dict(n_splits=config.probe_folds, inner_splits=config.probe_inner_folds, alphas=tuple(config.probe_alphas),
                n_permutations=config.probe_permutations)


def subject_lines(name: str, run_dir: Path, instances, interventions, seconds: float) -> list[str]:
    """What a finished edits stage prints: the clean accuracy and latent steps (as a trace says them), the edits
    run (placebos aside: they are every family's noise floor, not edits of their own) and the time so far; a
    warning when the clean answers are not above chance, since every effect on them is an effect on noise."""
    from ..runs.trace import at_chance, clean_summary

    summary = clean_summary(run_dir, instances)
    edits = sum(getattr(iv, "role", "edit") != "placebo" for iv in interventions)
    lines = [f"subject   {name:<11} accuracy {summary.accuracy:.2f}, latent steps {summary.mean_latent_steps:.1f}, "
             f"{edits} interventions ({seconds:.0f}s)"]
    if summary.chance is not None and at_chance(summary.n_correct, summary.n_ok, summary.chance):
        lines.append(f"warning   {name}: accuracy {summary.accuracy_line()}")
    return lines


def _edits_stage(subject, instances, source, interventions, run_dir: Path, config: StudyConfig, *, progress, resume,
                 shard):
    """The shared clean pass (every layer recorded: it is the study's trace) and every edit, in one store."""
    from ..runs.intervene import intervene

    mediators = config.mediators if subject.mediator == "latent" else ["fed_back"]
    return intervene(subject, instances, interventions, run_dir, config=decode_config(config, subject),
                     batch_size=config.batch_size, seed=config.seed, n_boot=config.bootstrap, resume=resume,
                     progress=progress, data_source=source, mediators=tuple(mediators), record_layers="all",
                     clean_image_states=config.image_states, shard=shard)


def _map_stage(kind: str, config: StudyConfig, name: str, instances, source: str, folder: Path):
    """One where-and-when map of one subject, on the first ``[maps] n_instances`` of the study's data, with the
    figures `latentprobe patch|ground|lens` draw."""
    subject = load_study_subject(config, name)
    chosen = list(instances)[:config.map_n_instances]
    dc = decode_config(config, subject)
    if kind == "patch":
        from ..report.patch_figures import draw_patching_run
        from ..where.patching import patch_map

        patch_map(subject, chosen, folder, config=dc, batch_size=config.batch_size, seed=config.seed,
                  n_boot=config.bootstrap)
        draw_patching_run(folder)
    elif kind == "ground":
        from ..report.where_figures import draw_grounding_run
        from ..where.runs import ground_run

        ground_run(subject, chosen, folder, source=source, config=dc, seed=config.seed, n_boot=config.bootstrap)
        draw_grounding_run(folder, chosen, subject.name)
    else:
        from ..report.where_figures import draw_lens_run
        from ..where.runs import lens_run

        lens_run(subject, chosen, folder, source=source, config=dc, seed=config.seed)
        draw_lens_run(folder)


def _append_maps_section(report_md: Path, folders: list[Path]):
    """The where-and-when section (grounding, lens) under the report's Markdown, and where the patching maps are."""
    from ..fileio import atomic_write_text as write

    extra = ["", "## Where and when (study maps)", ""]
    where = [f for f in folders if f.name.endswith(("-ground", "-lens"))]
    if where:
        from ..report.where_report import where_and_when_markdown

        extra.append(where_and_when_markdown(where))
    for folder in folders:
        if folder.name.endswith("-patch"):
            extra.append(f"- patching maps: `{folder}` (patching_summary.csv and figures/)")
    write(report_md, report_md.read_text(encoding="utf-8") + "\n".join(extra) + "\n")
