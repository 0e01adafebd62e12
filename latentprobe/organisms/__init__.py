"""Model organisms: tiny Qwen2.5-VL models trained on CPU whose causal structure is known.

Eight organisms answer the procedural `transform` task (a 2x2 colour grid, "after flipping / rotating / swapping,
what colour is cell X?", four options, chance 0.25) with an option letter. They differ in how the answer may use
the image (details and the reasons behind each choice in `latentprobe.organisms.recipes`):

- ``bottleneck``: the answer cannot attend image tokens and the model has one layer, so every bit of image
  information the answer gets passes through the fed-back latent vectors (exact, by construction).
- ``shortcut``: the answer cannot attend latent positions: the latents carry nothing to it (exact), although
  they are trained to hold the answer cell's image tokens (a probe finds information that has no effect).
- ``direct``: answers at once, no latent mode (the baseline).
- ``mirage`` / ``lvr``: Mirage's and LVR's training recipes in miniature; what their latents do is learned.
- ``capimagine``: imagines in text (``<imagine>`` the transformed grid ``</imagine>``), then answers.
- ``blind``: its latent positions cannot attend the image (exact); the answer reads the image directly.
- ``collapsed``: its training loss pulls every latent to one point; the answer reads the image directly.

Two text organisms (``organism-text-routed``, ``organism-text-bypass``: tiny GPT-2 latent chain-of-thought models
on 2-hop lookups, `latentprobe.organisms.text_recipes`) carry the same kind of built-in truth for text; they are
trained with `train_text_organism`.

What each construction fixes about the four findings is its ``truth`` (`latentprobe.organisms.truth`: the matrix
the demo's verdicts are checked against; together the organisms exhibit every finding both ways).

The weights ship with the package (``weights/<name>.safetensors`` + ``<name>.json``) and load offline as
subjects named ``organism-<name>``::

    >>> from latentprobe.model.subjects import load_subject
    >>> subject = load_subject("organism-bottleneck")
    >>> from latentprobe.organisms import train_organism
    >>> result = train_organism("shortcut", out_dir="weights", seed=1)       # doctest: +SKIP
    >>> result.metrics["test_accuracy"]                                      # doctest: +SKIP

Training unrolls the decoder's own loop with gradients (`latentprobe.organisms.unroll`), with the decoder's key
masks, so an organism is decoded exactly as it was trained; ``tests/test_organisms.py`` checks that the two give
the same answer logits.
"""

from .groundtruth import ground_truth_checks
from .recipes import BOTTLENECK, ORGANISMS, SHORTCUT, OrganismRecipe, get_recipe
from .shipping import load_organism, read_metrics, shipped_organisms, weights_dir
from .training import TrainResult, train_organism
from .text import load_text_organism, shipped_text_organisms, train_text_organism
from .text_recipes import TEXT_ORGANISMS

__all__ = ["ORGANISMS", "OrganismRecipe", "get_recipe", "BOTTLENECK", "SHORTCUT", "train_organism", "TrainResult",
           "load_organism", "shipped_organisms", "weights_dir", "read_metrics", "ground_truth_checks",
           "TEXT_ORGANISMS", "train_text_organism", "load_text_organism", "shipped_text_organisms"]


def __getattr__(name):
    # OrganismSubject was a Subject subclass for the organisms' prompt layout, which is now a PromptStyle field
    # (image_position="after"); the old name keeps working for one release.
    if name == "OrganismSubject":
        import warnings

        from ..model.subject import Subject

        warnings.warn("latentprobe.organisms.OrganismSubject is deprecated: organisms are plain Subjects whose "
                      "PromptStyle has image_position='after'", DeprecationWarning, stacklevel=2)
        return Subject
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
