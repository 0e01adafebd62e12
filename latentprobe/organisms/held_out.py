"""An organism's own held-out questions for the notebook path: ``lp.organism_data("bottleneck", 80)``.

The organisms were trained on the mental-transformation task at 112 x 112 px; their held-out split (600 questions,
disjoint from the training split) is what every command runs them on when no data is given. This returns it as
`Instance` objects, generated once into the latentprobe cache (only the images asked for are written).
"""

from __future__ import annotations

from ..data.loading import DEFAULT_INSTANCES
from ..errors import LatentProbeError


def organism_data(name: str, n: int = DEFAULT_INSTANCES) -> list:
    """The first ``n`` (default 80, the commands' default) of organism ``name``'s held-out split, at the 112-px
    size it was trained at; ``name`` with or without the ``organism-`` prefix; ``n`` up to 600.

    >>> [i.split for i in organism_data("bottleneck", 2)]
    ['test', 'test']
    """
    from ..data.instances import load_jsonl
    from .recipes import ORGANISMS
    from .training import organism_held_out_data

    short = str(name).removeprefix("organism-")
    if short not in ORGANISMS:
        import difflib

        close = difflib.get_close_matches(short, list(ORGANISMS), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise LatentProbeError(f"no organism named {name!r}{hint}", f"choose one of {', '.join(sorted(ORGANISMS))}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise LatentProbeError(f"n={n!r} is not a whole number >= 1", "ask for 1 to 600 held-out questions")
    return load_jsonl(organism_held_out_data(ORGANISMS[short], n), split="test")
