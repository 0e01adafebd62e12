"""The study file: every choice a study makes, as TOML, checked before any model runs.

A study file has one table per concern. Every key has a default (``study --print-config`` shows them all); a file
names only what it changes. The run folder keeps the resolved file (``study.toml``) so a study is reproducible
and editable: ``latentprobe study --config RUN/study.toml --out NEW`` runs it again.

    [study]     subjects, checkpoint, protocol, data, split, n_instances, seed
    [decoding]  batch_size, max_new_tokens, device, dtype
    [edits]     information, disruption, noise_scales, noise_relative_to, semantics, mediators, placebo, controls
    [analyses]  probe_attributes, probe_folds, probe_inner_folds, probe_alphas, probe_permutations, bootstrap,
                image_states
    [maps]      enabled, kinds, n_instances
    [margins]   the verdicts' `Margins` fields (answer_change, change_ratio, ...)

The information edits put in values the model computed for another real input (they decide latent -> answer);
the disruption edits put it off its distribution (reported beside the verdict). Which is which is the verdict
rules' own classification (`latentprobe.verdicts.causal.edit_role`); the file is refused when it disagrees.
``placebo`` and ``controls`` name kinds that join the study when the intervention registry has them (a version
without them runs the rest and says which were skipped).

>>> config = StudyConfig(subjects=["organism-bottleneck"])
>>> parse_study_toml(study_toml(config)) == config
True
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI (pyproject.toml asks for it there)
    import tomli as tomllib

from ..cli_types import MAX_NOISE_SCALE
from ..errors import LatentProbeError
from ..stats.probes import DEFAULT_ALPHAS, DEFAULT_INNER_SPLITS, DEFAULT_PERMUTATIONS

# The paper's edits plus this project's additions; kinds a version lacks (placebo, the 2026 controls) are skipped.
DEFAULT_INFORMATION = ("image-swap", "question-swap", "patch", "text-swap")
DEFAULT_DISRUPTION = ("noise", "constant", "image-blank", "text-shuffle")
DEFAULT_NOISE_SCALES = (1.0, 3.0)  # x the per-dimension std of the clean latents; 3 is ROME's "strong" corruption
DEFAULT_PLACEBO = ("placebo", "input-placebo", "text-placebo")  # the names branch r3-organisms registers
DEFAULT_CONTROLS = ("no-latent", "markers-only", "dummy", "mean-step")
DEFAULT_MEDIATORS = ("fed_back", "all_layers")
MAP_KINDS = ("patch", "ground", "lens")
IMAGE_STATES = ("all", "mean")
DEVICES = ("cpu", "cuda", "auto", "mps")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class StudyConfig:
    """Every choice of a study (see the module docstring for the file's tables)."""

    # [study]
    subjects: list[str] = field(default_factory=list)
    checkpoint: str | None = None
    protocol: str | None = None
    data: str | None = None  # FILE.jsonl or BENCH:FOLDER; None = the subject's own default data
    split: str | None = None
    n_instances: int | None = None  # None = every instance of `data`; the first 80 of the subject's own data
    seed: int = 0
    # [decoding]
    batch_size: int = 8
    max_new_tokens: int | None = None  # None = the subject's own budget
    device: str = "cpu"
    dtype: str = "float32"
    # [edits]
    information: list[str] = field(default_factory=lambda: list(DEFAULT_INFORMATION))
    disruption: list[str] = field(default_factory=lambda: list(DEFAULT_DISRUPTION))
    noise_scales: list[float] = field(default_factory=lambda: list(DEFAULT_NOISE_SCALES))
    noise_relative_to: str = "std"
    semantics: list[str] = field(default_factory=lambda: ["recompute"])
    mediators: list[str] = field(default_factory=lambda: list(DEFAULT_MEDIATORS))
    placebo: list[str] = field(default_factory=lambda: list(DEFAULT_PLACEBO))
    controls: list[str] = field(default_factory=lambda: list(DEFAULT_CONTROLS))
    # [analyses]
    probe_attributes: list[str] = field(default_factory=list)  # empty = "answer" and "cell_0_colour" where present
    probe_folds: int = 5
    probe_inner_folds: int = DEFAULT_INNER_SPLITS
    probe_alphas: list[float] = field(default_factory=lambda: list(DEFAULT_ALPHAS))  # ridge strengths
    probe_permutations: int = DEFAULT_PERMUTATIONS
    bootstrap: int = 1000
    # Instances of the collapse and probe readouts, when more than the edits' n_instances: they need clean decodes
    # only (a second, cheap trace of the first readout_instances of the same data), and a probe that must show
    # `limited` (an interval inside a 0.1 margin) needs a few hundred. None = the edits' instances.
    readout_instances: int | None = None
    # What the clean pass keeps of the image tokens. "all": every token, so the collapse verdict is measured
    # against a single token (one latent is one token); "mean": a store smaller by the number of image tokens, but
    # collapse can then never be affirmed `not collapsed` (the mean of T tokens varies about T times less).
    image_states: str = "all"
    # [maps]
    maps: bool = False
    map_kinds: list[str] = field(default_factory=lambda: list(MAP_KINDS))
    map_n_instances: int = 64
    # [margins]: only the fields set here; the rest are `Margins()` defaults
    margins: dict[str, float] = field(default_factory=dict)

    def margins_object(self):
        """The verdicts' `Margins` with this study's overrides."""
        from ..verdicts.margins import Margins

        return Margins(**self.margins)


# table name -> (file key -> attribute name); [margins] is read separately
_TABLES: dict[str, dict[str, str]] = {
    "study": {k: k for k in ("subjects", "checkpoint", "protocol", "data", "split", "n_instances", "seed")},
    "decoding": {k: k for k in ("batch_size", "max_new_tokens", "device", "dtype")},
    "edits": {k: k for k in ("information", "disruption", "noise_scales", "noise_relative_to", "semantics",
                             "mediators", "placebo", "controls")},
    "analyses": {k: k for k in ("probe_attributes", "probe_folds", "probe_inner_folds", "probe_alphas",
                                "probe_permutations", "bootstrap", "readout_instances", "image_states")},
    "maps": {"enabled": "maps", "kinds": "map_kinds", "n_instances": "map_n_instances"},
}
_COMMENTS = {
    "study": "what is studied: subject(s), checkpoint, data (FILE.jsonl or BENCH:FOLDER; absent = the subject's "
             "own data), n_instances (absent = every instance of data, or 80 of the subject's own), seed",
    "decoding": "how it decodes (greedy); max_new_tokens absent = the subject's own budget",
    "edits": "information edits decide latent -> answer; disruption edits are reported beside it; noise_scales x "
             "the clean latents' per-dimension std; placebo and controls run when this version registers them",
    "analyses": "probes (ridge, grouped folds, control task, permutation p-values) and bootstrap resamples; "
                "readout_instances: instances of the collapse and probe readouts when more than the edits' (a "
                "second clean trace; absent = the edits' instances); "
                "image_states: every image token of the clean pass (all: collapse is measured against a single "
                "token) or their mean (a smaller store; collapse then cannot read `not collapsed`)",
    "maps": "where and when (latentprobe patch / ground / lens), on n_instances of the data",
    "margins": "equivalence margins of the verdicts (latentprobe.verdicts.Margins); absent keys keep the defaults",
}


def _bad(problem: str, fix: str):
    raise LatentProbeError(problem, fix)


def parse_study_toml(text: str, source: str = "the study file") -> StudyConfig:
    """A `StudyConfig` from TOML text, refused in one line when a table or key is unknown or a value wrong."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        _bad(f"{source} is not valid TOML: {exc}", "fix the line it names (see `latentprobe study --print-config`)")
    values: dict[str, Any] = {}
    for table, entries in raw.items():
        if table == "margins":
            if not isinstance(entries, dict):
                _bad(f"{source}: [margins] must be a table", "write [margins] then key = value lines")
            from ..verdicts.margins import Margins

            defaults = Margins()  # keep only what differs: a file that states the defaults equals one that omits them
            values["margins"] = {k: v for k, v in entries.items() if getattr(defaults, k, None) != v}
            continue
        if table not in _TABLES:
            _bad(f"{source}: unknown table [{table}]", f"use {', '.join(f'[{t}]' for t in [*_TABLES, 'margins'])}")
        if not isinstance(entries, dict):
            _bad(f"{source}: {table} must be a table", f"write [{table}] then key = value lines")
        for key, value in entries.items():
            if key not in _TABLES[table]:
                _bad(f"{source}: unknown key {key!r} in [{table}]", f"choose from {', '.join(_TABLES[table])}")
            values[_TABLES[table][key]] = value
    config = StudyConfig(**values)
    check_config(config, source)
    return config


def load_study_file(path: str | Path) -> StudyConfig:
    """Read and check a study file (``--config``)."""
    path = Path(path)
    if not path.is_file():
        _bad(f"study file {path} not found", "pass a file written by `latentprobe study --print-config` or a run's "
                                            "study.toml")
    return parse_study_toml(path.read_text(encoding="utf-8"), str(path))


def study_toml(config: StudyConfig) -> str:
    """The study file for ``config`` (every key, so it states every choice; None values are left out: TOML has
    no null, and an absent key means the default)."""
    from ..verdicts.margins import Margins

    lines = []
    for table, keys in _TABLES.items():
        lines += [*_comment(_COMMENTS[table]), f"[{table}]"]
        for key, attribute in keys.items():
            value = getattr(config, attribute)
            if value is not None:
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    lines += [*_comment(_COMMENTS["margins"]), "[margins]"]
    shown = {f.name: getattr(Margins(), f.name) for f in dataclasses.fields(Margins)}
    shown.update(config.margins)
    lines += [f"{key} = {_toml_value(value)}" for key, value in shown.items() if value is not None]
    return "\n".join(lines) + "\n"


def _comment(text: str) -> list[str]:
    import textwrap

    return [f"# {line}" for line in textwrap.wrap(text, 110)]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf") if not math.isnan(value) \
            else "nan"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise LatentProbeError(f"cannot write {value!r} into a study file", "use numbers, strings, booleans or lists")


# -- checks -------------------------------------------------------------------------------------------------
def _whole(value, name, low, source, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _bad(f"{source}: {name} = {value!r} is not a whole number >= {low}", f"set {name} to {low} or more")


def _names(value, name, source, allow_empty=True):
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        _bad(f"{source}: {name} = {value!r} is not a list of names", f'write e.g. {name} = ["a", "b"]')
    if not allow_empty and not value:
        _bad(f"{source}: {name} is empty", f"name at least one in {name}")
    if len(set(value)) != len(value):
        _bad(f"{source}: {name} lists a name twice ({value})", "list each once")


def _optional_text(value, name, source):
    if value is not None and (not isinstance(value, str) or not value.strip()):
        _bad(f"{source}: {name} = {value!r} is not a non-empty string", f'write {name} = "..." or leave it out')


def check_config(config: StudyConfig, source: str = "the study") -> None:
    """Refuse, in one line naming the key, every value that cannot work; runs no model and reads no data."""
    from ..verdicts.causal import edit_role
    from ..verdicts.margins import Margins

    _names(config.subjects, "subjects", source, allow_empty=False)
    for name in ("checkpoint", "protocol", "data", "split"):
        _optional_text(getattr(config, name), name, source)
    if config.checkpoint is not None and len(config.subjects) > 1:
        _bad(f"{source}: one checkpoint for {len(config.subjects)} subjects", "study one subject per checkpoint")
    _whole(config.n_instances, "n_instances", 2, source, allow_none=True)  # donor edits need another instance
    _whole(config.readout_instances, "readout_instances", 2, source, allow_none=True)
    _whole(config.seed, "seed", 0, source)
    _whole(config.batch_size, "batch_size", 1, source)
    _whole(config.max_new_tokens, "max_new_tokens", 1, source, allow_none=True)
    if config.device not in DEVICES and not str(config.device).startswith("cuda:"):
        _bad(f"{source}: device = {config.device!r} is unknown", f"choose from {', '.join(DEVICES)} or cuda:N")
    if config.dtype not in DTYPES:
        _bad(f"{source}: dtype = {config.dtype!r} is unknown", f"choose from {', '.join(DTYPES)}")
    for name in ("information", "disruption", "semantics", "mediators", "placebo", "controls", "probe_attributes",
                 "map_kinds"):
        _names(getattr(config, name), name, source)
    if not config.information:
        _bad(f"{source}: no information edit", "latent -> answer is decided on information edits: keep at least one "
                                               f"of {', '.join(DEFAULT_INFORMATION)}")
    for role in ("information", "disruption"):
        for kind in getattr(config, role):
            if edit_role(kind) != role:
                _bad(f"{source}: {kind} is listed under {role}, but the verdict rules judge it as {edit_role(kind)}",
                     f"move {kind} to {edit_role(kind)}")
    both = set(config.information) & set(config.disruption)
    if both:
        _bad(f"{source}: {', '.join(sorted(both))} listed as both information and disruption", "list each kind once")
    if not isinstance(config.noise_scales, list) or not config.noise_scales and "noise" in config.disruption:
        _bad(f"{source}: noise_scales = {config.noise_scales!r} names no scale", "e.g. noise_scales = [1.0, 3.0]")
    for scale in config.noise_scales:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (
                math.isfinite(scale) and 0 < scale <= MAX_NOISE_SCALE):
            _bad(f"{source}: noise scale {scale!r} is out of range", f"use numbers in (0, {MAX_NOISE_SCALE:g}]")
    if config.noise_relative_to not in ("std", "norm"):
        _bad(f"{source}: noise_relative_to = {config.noise_relative_to!r} is unknown", "choose std or norm")
    for semantics in config.semantics:
        if semantics not in ("recompute", "pin"):
            _bad(f"{source}: semantics {semantics!r} is unknown", "choose from recompute, pin")
    if not config.semantics:
        _bad(f"{source}: semantics is empty", 'use semantics = ["recompute"]')
    from ..runs.intervene import MEDIATORS

    for mediator in config.mediators:
        if mediator not in MEDIATORS:
            _bad(f"{source}: mediator {mediator!r} is unknown", f"choose from {', '.join(MEDIATORS)}")
    if "fed_back" not in config.mediators:
        _bad(f"{source}: mediators lacks fed_back, the definition the verdicts decide on", "keep fed_back")
    _whole(config.probe_folds, "probe_folds", 2, source)
    _whole(config.probe_inner_folds, "probe_inner_folds", 2, source)
    _whole(config.probe_permutations, "probe_permutations", 0, source)
    _whole(config.bootstrap, "bootstrap", 1, source)
    if not isinstance(config.probe_alphas, list) or not config.probe_alphas or not all(
            not isinstance(c, bool) and isinstance(c, (int, float)) and math.isfinite(c) and c > 0
            for c in config.probe_alphas):
        _bad(f"{source}: probe_alphas = {config.probe_alphas!r} must be positive numbers", "e.g. [1.0, 10.0]")
    if config.image_states not in IMAGE_STATES:
        _bad(f"{source}: image_states = {config.image_states!r} is unknown",
             f"choose from {', '.join(IMAGE_STATES)} (all: the collapse verdict's single-token yardstick)")
    if not isinstance(config.maps, bool):
        _bad(f"{source}: [maps] enabled = {config.maps!r} is not true or false", "write enabled = true or false")
    for kind in config.map_kinds:
        if kind not in MAP_KINDS:
            _bad(f"{source}: map kind {kind!r} is unknown", f"choose from {', '.join(MAP_KINDS)}")
    _whole(config.map_n_instances, "[maps] n_instances", 2, source)
    known = {f.name for f in dataclasses.fields(Margins)}
    for key, value in config.margins.items():
        if key not in known:
            _bad(f"{source}: unknown margin {key!r}", f"choose from {', '.join(sorted(known))}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            _bad(f"{source}: margin {key} = {value!r} is not a finite number", "write a number")
    try:
        config.margins_object()
    except (ValueError, TypeError) as exc:  # Margins checks its own ranges
        _bad(f"{source}: [margins] {exc}", "see `latentprobe study --print-config` for the defaults")
