"""Validation of command-line values: each flag's real range, checked before anything runs.

The parsers here are argparse ``type=`` callables: a bad value ends the command with argparse's one-line
``error: argument --flag: ...`` (exit code 2) instead of a silent default, a fake effect or a traceback later.
Checks that need several flags at once (a scale's range depends on the intervention kind) are plain functions
raising :class:`~latentprobe.errors.LatentProbeError`.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
from pathlib import Path

# Noise of 10,000 data standard deviations is pure noise already; larger values only overflow float32.
MAX_NOISE_SCALE = 1e4


def _number(text: str, kind, what: str):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def int_at_least(low: int, what: str = "an integer"):
    """An integer >= ``low`` (e.g. ``int_at_least(1)`` for counts, ``int_at_least(0)`` for seeds)."""

    def parse(text: str) -> int:
        value = _number(text, int, what)
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is out of range: must be >= {low}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


# numpy's legacy RandomState and scikit-learn's random_state take 0..2**32 - 1; a larger seed used to pass the
# parser, decode everything, and fail at the end (writing the index or seeding a probe).
MAX_SEED = 2**32 - 1


def seed_value(text: str) -> int:
    """A seed: a whole number 0..2**32 - 1 (checked before anything runs)."""
    value = _number(text, int, "a whole number")
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{value} is out of range: a seed must be between 0 and {MAX_SEED}")
    return value


def int_between(low: int, high: int):
    def parse(text: str) -> int:
        value = _number(text, int, "an integer")
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range: must be between {low} and {high}")
        return value

    parse.__name__ = f"integer in [{low}, {high}]"
    return parse


def positive_float(text: str) -> float:
    value = _number(text, float, "a number")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is out of range: must be > 0")
    return value


def probability_open_closed(text: str) -> float:
    """A probability in (0, 1], as top-p is."""
    value = _number(text, float, "a number")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is out of range: must be in (0, 1]")
    return value


def fraction_open(text: str) -> float:
    """A fraction strictly between 0 and 1 (a test split must leave both splits non-empty)."""
    value = _number(text, float, "a number")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{value} is out of range: must be strictly between 0 and 1")
    return value


def _comma_values(text: str, convert, empty: str, bad: str) -> list:
    """The comma-separated values of ``text`` through ``convert``; ``empty``/``bad`` explain a refusal."""
    parts = [v.strip() for v in text.split(",") if v.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"{text!r} {empty}")
    values = []
    for part in parts:
        try:
            values.append(convert(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} {bad}") from None
    return values


def layer_list(text: str):
    """'final', 'all', or a non-empty comma-separated list of hidden-state indices >= 0."""
    if text in ("final", "all"):
        return text
    values = _comma_values(text, int, "names no layer: use 'final', 'all' or e.g. 0,14,28",
                           "is not 'final', 'all' or a list of integers (e.g. 0,14,28)")
    if min(values) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: layer indices must be >= 0 (0 is the embeddings)")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{text!r} names a layer twice")
    return values


def layer_list_all(text: str):
    """'all' or a comma-separated list of hidden-state indices >= 0 (no 'final': a map needs a grid)."""
    if text == "final":
        raise argparse.ArgumentTypeError("'final' is not a grid: use 'all' or e.g. 0,14,28")
    return layer_list(text)


def step_list(text: str) -> list[int]:
    """A non-empty comma-separated list of latent step indices >= 0."""
    values = _comma_values(text, int, "names no step: e.g. --steps 0,2",
                           "is not an integer (e.g. --steps 0,2)")
    if min(values) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: latent steps count from 0")
    return values


def block_list(text: str) -> list[int]:
    """A non-empty comma-separated list of decoder block indices >= 0 (upper bound: checked against the model)."""
    values = _comma_values(text, int, "names no block: e.g. --attention-layers 0,5",
                           "is not an integer (e.g. --attention-layers 0,5)")
    if min(values) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: decoder blocks count from 0")
    return values


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def scale_list(text: str) -> list[float]:
    """A non-empty comma-separated list of finite numbers (ranges per kind: :func:`check_scales`)."""
    return _comma_values(text, _finite, "names no value: e.g. --scale 0.5,1,3",
                         "is not a finite number (e.g. --scale 0.5,1,3)")


def name_list(text: str) -> list[str]:
    """A non-empty comma-separated list of names (attributes, kinds)."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} names nothing: give comma-separated names, e.g. colour,answer")
    return names


def output_folder(text: str) -> str:
    """A folder to write into: refused when it is a file, a broken or looping link, or cannot be created."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the output folder is empty")
    path = Path(text)
    try:
        if path.is_symlink():
            os.stat(path)  # follows the link: a loop or a dangling target raises here
        if path.exists() and not path.is_dir():
            raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    except OSError as exc:
        reason = "a symbolic link loop" if exc.errno == errno.ELOOP else (exc.strerror or str(exc))
        raise argparse.ArgumentTypeError(f"{text} cannot be used as a folder: {reason}") from None
    # The nearest existing ancestor must be a writable folder, or every write later fails.
    ancestor = path.absolute()
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise argparse.ArgumentTypeError(f"{text} cannot be created: {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text}: {ancestor} is not writable")
    return text


def device_name(text: str) -> str:
    """A torch device that exists here: 'cpu', 'auto', 'cuda', 'cuda:N' or 'mps'."""
    import torch

    kind, _, number = text.partition(":")
    if kind == "auto" and not number:
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError("'auto' spreads a model over GPUs, and this torch sees none")
        return text
    if kind not in ("cpu", "cuda", "mps") or (number and not number.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (cpu, cuda, cuda:N, mps, auto)")
    if kind == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "a CUDA build that finds no GPU"
            raise argparse.ArgumentTypeError(f"{text!r}: this torch ({torch.__version__}) is {build}; "
                                             "use --device cpu or install a CUDA torch")
        if number and int(number) >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: only {torch.cuda.device_count()} GPU(s) are visible")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise argparse.ArgumentTypeError("'mps' is not available with this torch")
    return text


# -- checks across flags ------------------------------------------------------------------------------------
_SCALE_RANGES = {
    # kind: (low, high, low inclusive, integer, meaning)
    "noise": (0.0, MAX_NOISE_SCALE, True, False, "noise scale (x data std or x mean norm)"),
    "noise-norm": (0.0, MAX_NOISE_SCALE, True, False, "noise scale (x mean norm / sqrt(d) per dimension)"),
    "image-noise": (0.0, MAX_NOISE_SCALE, True, False, "image-noise level (x pixel std)"),
    "image-mask": (0.0, 1.0, True, False, "fraction of the image masked"),
    "text-truncate": (0.0, 1.0, True, False, "fraction of the text kept"),
    "drop": (0.0, 10_000.0, True, True, "number of latent steps kept"),
}


def check_scales(kinds: list[str], scales: list[float] | None) -> None:
    """Refuse a --scale value outside the real range of every kind it is applied to."""
    from .errors import LatentProbeError

    if scales is None:
        return
    users = [k for k in kinds if k in _SCALE_RANGES]
    if not users:
        raise LatentProbeError(f"--scale is given but none of the kinds {', '.join(kinds)} takes a scale",
                               f"--scale applies to {', '.join(_SCALE_RANGES)}; leave it out")
    for kind in users:
        low, high, _, integer, meaning = _SCALE_RANGES[kind]
        for value in scales:
            if integer and value != int(value):
                raise LatentProbeError(f"--scale {value:g} for {kind}: the {meaning} must be a whole number",
                                       "e.g. --kind drop --scale 0,1,2")
            if not low <= value <= high:
                raise LatentProbeError(f"--scale {value:g} is out of range for {kind}: the {meaning} must be "
                                       f"between {low:g} and {high:g}", "pass a value in that range")


SEMANTICS = ("recompute", "pin")


def check_semantics(text: str) -> list[str]:
    from .errors import LatentProbeError

    values = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in values if s not in SEMANTICS]
    if not values or bad:
        raise LatentProbeError(f"--semantics {text!r} is not a list of {' / '.join(SEMANTICS)}",
                               "e.g. --semantics recompute,pin")
    return values


# -- the parser: short usage on a bad value, close-match suggestions, real defaults ----------------------------
def close_matches(word: str, choices, n: int = 3) -> list[str]:
    """The choices closest to a mistyped ``word`` (difflib's ratio, cutoff 0.6), best first."""
    import difflib

    return difflib.get_close_matches(str(word), [str(c) for c in choices], n=n, cutoff=0.6)


def did_you_mean(word: str, choices) -> str:
    """" (did you mean X?)" for the closest choice, "" when none is close."""
    matches = close_matches(word, choices, n=1)
    return f" (did you mean {matches[0]}?)" if matches else ""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are two lines: a one-line usage pointing at --help, and the problem, with the
    closest flag or command when one was mistyped (argparse on Python < 3.14 prints the whole usage, 20 lines
    for `trace`, and suggests nothing)."""

    def error(self, message: str):
        import re

        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown:
            parser = self._parser_for()
            hints = []
            for word in unknown.group(1).split():
                if word.startswith("-"):
                    flag = word.split("=", 1)[0]
                    hint = did_you_mean(flag, parser._option_string_actions)
                    hints.append(f"{word}{hint}")
                else:
                    hints.append(word)
            return parser._exit_with(f"unrecognized arguments: {' '.join(hints)}")
        choice = re.match(r"argument (\S+): invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            options = [c.strip().strip("'") for c in choice.group(3).split(",")]
            message += did_you_mean(choice.group(2), options)
        return self._exit_with(message)

    def _exit_with(self, message: str):
        import sys

        sys.stderr.write(f"usage: {self.prog} [options]   (see `{self.prog} --help`)\n")
        self.exit(2, f"{self.prog}: error: {message}\n")

    def _parser_for(self) -> "Parser":
        """The (sub-)command parser the command line chose: the top-level parser reports unrecognized arguments
        for all of them, so their suggestions must come from the sub-command's own flags."""
        import sys

        argv = sys.argv[1:] if self._argv is None else self._argv
        parser = self
        while True:
            chosen = None
            for action in parser._actions:
                if isinstance(action, argparse._SubParsersAction):
                    chosen = next((action.choices[t] for t in argv if t in action.choices), None)
            if chosen is None:
                return parser
            parser = chosen

    _argv = None

    def parse_args(self, args=None, namespace=None):
        self._argv = None if args is None else list(args)
        return super().parse_args(args, namespace)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help when it has a real default the help does not already state:
    never on a required flag, a switch, or a default of None (whose meaning the help says in words)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.required or action.default in (None, "", argparse.SUPPRESS) or action.nargs == 0
                or "default" in text.lower()):
            return text
        return super()._get_help_string(action)


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every (sub)command's --help shows each option's default after its meaning."""
    parser.formatter_class = DefaultsHelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                show_defaults(child)


# -- output folders: never overwritten without being asked ---------------------------------------------------
def refuse_existing(out, what: str = "--out", allow_overwrite: bool = False) -> None:
    """Refuse an output folder that exists and holds anything (before any model runs or file is written)."""
    from .errors import LatentProbeError

    folder = Path(out)
    if folder.is_dir() and any(folder.iterdir()):
        fix = "choose a new folder" + (", or pass --overwrite to replace it (the old one is removed only once the "
                                       "new one is complete)" if allow_overwrite else ", or delete it first")
        raise LatentProbeError(f"{what} {out} exists and is not empty", fix)


class fresh_output:
    """``with fresh_output(out, overwrite, inputs) as staging:`` write into ``staging``; on success it becomes
    ``out`` in one rename (an existing ``out`` is moved aside first and deleted after), so ``out`` never holds a
    mix of an old and a new result and a failed run leaves the old one untouched. Refuses a non-empty ``out``
    unless ``overwrite``, and an ``out`` that is or contains one of ``inputs`` (replacing it would delete them)."""

    def __init__(self, out, overwrite: bool, inputs=()):
        from .errors import LatentProbeError

        self.out = Path(out)
        target = self.out.resolve()
        for given in inputs:
            source = Path(given).resolve()
            if source == target or target in source.parents:
                raise LatentProbeError(f"--out {out} holds the input {given}",
                                       "write the result to a folder outside the runs it reads")
        if not overwrite:
            refuse_existing(out, allow_overwrite=True)

    def __enter__(self):
        import tempfile

        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.new-", dir=self.out.parent))
        return self.staging

    def __exit__(self, kind, value, traceback):
        import shutil
        import tempfile

        from .fileio import _umask

        if kind is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            return False
        os.chmod(self.staging, 0o777 & ~_umask())  # mkdtemp makes 0700 folders; results are as readable as any
        if self.out.exists():
            aside = tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent)
            os.rmdir(aside)
            os.rename(self.out, aside)
            os.rename(self.staging, self.out)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(self.staging, self.out)
        return False


