"""Interventions: small named objects that each edit one thing.

Three targets, following the causal chain input X -> latent tokens Z -> answer Y:

* ``latent`` (the mediator): `LatentNoise`, `LatentConstant` (zero / dataset mean / fixed random of matched
  norm), `LatentPatch` (another instance's latent at the same step), `LatentDrop` (run fewer steps),
  `LatentShuffle` (feed the clean latents in another order), `LatentFunction` (your own callable), and
  `PinLatents` (feed given vectors; used for the mediation runs Y(x0, Z(x1)) and Y(x1, Z(x0))).
  Each acts at chosen latent steps (None = all) on the fed-back vector (``layer=None``) or on a chosen layer's
  output at the latent positions (``layer=L``, 1..N). For an edit at some steps, ``semantics`` says what
  happens after it: ``"recompute"`` lets later latent steps be computed from the edited one; ``"pin"`` sets
  every later step to its clean value. Both are meaningful and differ; they are distinct interventions.
  Component controls and the text-model ablations (`controls`): `NoLatent` (no latent phase), `MarkersOnly`
  (start and end markers, no slots), `DummyToken` (a token's input embedding in every slot), `OracleLatents` /
  `OracleOther` (the latents' training targets, own or another instance's, from an `OracleSource`),
  `NormNoise` (sigma = s x mean||h|| / sqrt(d)) and `StepMean` (each step's dataset mean).
* ``input`` (the treatment): `ImageSwap`, `ImageNoise`, `ImageBlank`, `ImageMask`, `QuestionSwap`, `NoImage`.
* ``text`` (a text mediator, CapImagine): `TextSwap`, `TextTruncate`, `TextShuffle`.
* a placebo per family (role ``placebo``, the noise floor of every effect): `LatentPlacebo` (``placebo``: the
  row's own latents re-fed through the edit machinery), `InputPlacebo` (``input-placebo``: the clean input
  re-decoded as an edited one) and `TextPlacebo` (``text-placebo``: the row's own span forced back). `intervene`
  adds the placebo of every family it edits unless told not to.

Scales are relative to the data, never absolute: noise of ``scale`` s with ``relative_to="std"`` adds
s x (per-dimension std of the clean latents over the dataset) x N(0, 1) per dimension (ROME's "3x std" is
s = 3); with ``relative_to="norm"`` it adds s x (mean clean latent norm) / sqrt(D) x N(0, 1), so the noise
norm is about s times a typical latent's norm. Every random draw is seeded by (seed, instance id, step),
so a row's edit does not depend on its batch.

    >>> from latentprobe.interventions import LatentNoise
    >>> noise = LatentNoise(scale=3.0, relative_to="std", steps=[0], semantics="pin", seed=1)
    >>> noise.name
    'noise(scale=3,rel=std,steps=0,sem=pin)'

Layout: `base` (the `Intervention` base, `register_intervention` and the kind tables), `latent`, `input`, `text`
(one module per family), `hooks` (runners that edit inside the forward: `LayerEditHooks`, `PinLatentStates`,
`NNsightRunner`) and `factory` (`make_interventions`, `derangement`). Add a kind by subclassing a family base
and decorating it with ``@register_intervention("my-kind")``.
"""

from .base import KINDS_BY_TARGET, Intervention, _fmt, _seed_for, register_intervention
from .latent import (BoundEdit, LatentConstant, LatentDrop, LatentFunction, LatentIntervention, LatentNoise,
                     LatentPatch, LatentPlacebo, LatentShuffle, LatentStats, LatentZero, PinLatents, RowBinding,
                     _all_reduce_sum, _noise, _steps_and_layer_from_site, _take_steps)
from .input import (ImageBlank, ImageMask, ImageNoise, ImageSwap, InputIntervention, InputPlacebo, NoImage,
                    QuestionSwap)
from .text import TextIntervention, TextPlacebo, TextShuffle, TextSwap, TextTruncate
from .controls import (CONTROL_KINDS, DummyToken, MarkersOnly, NoLatent, NormNoise, OracleLatents, OracleOther,
                       OracleSource, StepMean, step_means)
from .hooks import LayerEditHooks, NNsightRunner, PinLatentStates
from .factory import derangement, make_interventions

# the per-target kind tables, as before the split (live views of the registry)
LATENT_KINDS = KINDS_BY_TARGET["latent"]
INPUT_KINDS = KINDS_BY_TARGET["input"]
TEXT_KINDS = KINDS_BY_TARGET["text"]

__all__ = ["Intervention", "register_intervention", "KINDS_BY_TARGET", "LATENT_KINDS", "INPUT_KINDS", "TEXT_KINDS",
           "make_interventions", "derangement",
           "LatentIntervention", "LatentStats", "RowBinding", "BoundEdit", "LatentNoise", "LatentConstant",
           "LatentZero", "LatentPatch", "LatentPlacebo", "LatentDrop", "LatentShuffle", "PinLatents",
           "LatentFunction", "InputIntervention", "InputPlacebo", "ImageSwap", "ImageNoise", "ImageBlank", "ImageMask",
           "QuestionSwap", "NoImage",
           "TextIntervention", "TextPlacebo", "TextSwap", "TextTruncate", "TextShuffle",
           "CONTROL_KINDS", "NoLatent", "MarkersOnly", "DummyToken", "OracleLatents", "OracleOther", "OracleSource",
           "NormNoise", "StepMean", "step_means",
           "LayerEditHooks", "PinLatentStates", "NNsightRunner"]
