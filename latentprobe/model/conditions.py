"""The input conditions a subject expects, and warnings when the data do not meet them.

A model organism was trained on one task at one image size; shown the same task at another size (or another
task) it answers at chance, and every effect measured on it is then an effect on noise. A subject may carry
``input_conditions`` (a dict with ``image_size``, ``task`` and a ``why`` sentence); the random-weight ``tiny``
subject answers at chance by construction. `condition_warnings` says so before a run starts.
"""

from __future__ import annotations

from typing import Sequence

from ..data.instances import Instance

# How many images are opened (header only) to compare sizes: enough to catch a mismatched data set.
_SIZE_SAMPLE = 8


def expected_conditions(subject) -> dict:
    """The subject's declared input conditions ({} when it declares none)."""
    return dict(getattr(subject, "input_conditions", None) or {})


def condition_warnings(subject, instances: Sequence[Instance], source: str | None = None) -> list[str]:
    """Sentences naming every way ``instances`` differ from what ``subject`` expects (empty when they match)."""
    out = []
    if str(getattr(subject, "checkpoint", "")).startswith("tiny-random"):
        out.append(f"{subject.name} has random weights: its answers are at chance by construction; use it to try "
                   "the commands, and a trained subject (e.g. organism-bottleneck) for results")
    wanted = expected_conditions(subject)
    if not wanted or not instances:
        return out
    task = wanted.get("task")
    tasks = sorted({inst.task for inst in instances if inst.task})
    if task and tasks and tasks != [task]:
        out.append(f"{subject.name} was trained on the {task!r} task but the data hold {', '.join(tasks)}"
                   f"{' (' + source + ')' if source else ''}: expect chance accuracy")
    size = wanted.get("image_size")
    if size:
        sizes = image_sizes(instances[:_SIZE_SAMPLE])
        off = sorted({s for s in sizes if s != (size, size)})
        if off:
            shown = ", ".join(f"{w}x{h}" for w, h in off[:3])
            out.append(f"{subject.name} expects {size}x{size}-pixel images ({wanted.get('why', 'its training size')})"
                       f" but the data hold {shown}: expect chance accuracy (`latentprobe data make "
                       f"{task or 'TASK'} --image-size {size}` makes matching data)")
    return out


class ConditionWarning(UserWarning):
    """The data are not what the subject expects (another task, another image size): its answers will be at
    chance. Raised by the library entry points (`run_with_cache`, `trace`, `intervene`) for notebook users; the
    command line prints the same sentences itself."""


def warn_about_conditions(subject, instances: Sequence[Instance], source: str | None = None) -> None:
    """`warnings.warn` each way ``instances`` differ from what ``subject`` expects (random weights excepted: the
    tiny test subject is random on purpose)."""
    import warnings

    for line in condition_warnings(subject, instances, source):
        if "has random weights" not in line:
            warnings.warn(line, ConditionWarning, stacklevel=3)


def image_sizes(instances: Sequence[Instance]) -> list[tuple[int, int]]:
    """(width, height) of each readable image (headers only; unreadable ones fail later, in their instance)."""
    from PIL import Image

    sizes = []
    for inst in instances:
        for path in inst.images:
            try:
                with Image.open(path) as img:
                    sizes.append(tuple(img.size))
            except Exception:  # reported with its reason when the instance runs
                continue
    return sizes
