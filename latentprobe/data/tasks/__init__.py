"""Procedurally generated tasks with ground truth, for training tiny model organisms and checking analyses.

Three tasks, each a module with `generate(n, seed, image_size=56, ...) -> list[GeneratedInstance]`:

- `transform`: colour grid + "after flipping/rotating/swapping, what colour is cell X?" (aux image: the result)
- `path`: grid map + move sequence, "does it reach the goal?" / "what does it end on?" (aux image: the route)
- `digits`: two real handwritten digits, "their sum?" / "is the left larger?" (disjoint scans per split)

>>> import tempfile
>>> from latentprobe.data import load_jsonl
>>> data = make_task("transform", n=12, seed=0, out_dir=tempfile.mkdtemp())
>>> test = load_jsonl(data, split="test")
>>> len(test), chance_accuracy(test), test[0].options
(3, 0.25, ['red', 'green', 'blue', 'yellow'])
"""

from .common import COLOUR_NAMES, PALETTE, PATCH_SIZE, GeneratedInstance
from .writer import GENERATOR_VERSIONS, TASKS, chance_accuracy, make_task

__all__ = ["TASKS", "GENERATOR_VERSIONS", "make_task", "chance_accuracy", "GeneratedInstance",
           "PALETTE", "COLOUR_NAMES", "PATCH_SIZE"]
