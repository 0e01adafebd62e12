"""Input interventions: edits of the treatment, the instance itself (its images or its question)."""

from __future__ import annotations

from abc import abstractmethod

import numpy as np

from ..errors import LatentProbeError
from .base import MAX_NOISE_SCALE, Intervention, _seed_for, checked_scale, register_intervention

class InputIntervention(Intervention):
    """Edits the instance itself (images or question); the latents are then whatever the model makes of it.
    Implement `apply`; set ``edits_images = False`` when the edit is on the question."""

    target = "input"

    edits_images = True  # False: the edit is on the question

    @abstractmethod
    def apply(self, instance, images: list, donor=None, donor_images: list | None = None) -> tuple[list, str | None]:
        """Return (images, question override or None)."""

    def not_applied_reason(self, instance, images: list, donor=None, donor_images: list | None = None) -> str | None:
        """Why this edit cannot be made for this instance (None: it can)."""
        if self.needs_donor and (donor is None or (self.edits_images and donor_images is None)):
            return "the donor instance failed in the clean run"
        if self.edits_images and not images:
            return "the instance has no image to edit"
        return None


@register_intervention("input-placebo")
class InputPlacebo(InputIntervention):
    """The noise floor of input edits: the clean input itself, re-encoded and re-decoded exactly as an edited input
    is (a fresh prefill in the edited runs' batch layout, with both mediation runs, the clean prefill reused)."""

    kind = "input-placebo"
    role = "placebo"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def not_applied_reason(self, instance, images, donor=None, donor_images=None):
        return None  # the clean input can always be run again, with or without images

    def apply(self, instance, images, donor=None, donor_images=None):
        return list(images), None


@register_intervention("image-swap")
class ImageSwap(InputIntervention):
    kind = "image-swap"
    needs_images = True
    needs_donor = True

    def __init__(self, seed: int = 0):
        self.seed = seed

    def apply(self, instance, images, donor=None, donor_images=None):
        return list(donor_images), None


@register_intervention("image-noise")
class ImageNoise(InputIntervention):
    """Gaussian pixel noise with standard deviation ``level`` x 255 (level 0.1 = 10% of the range)."""

    kind = "image-noise"
    needs_images = True

    # one per --scale, read as the noise level (default 0.5)
    scale_param, scale_default = "level", 0.5

    def __init__(self, level: float = 0.5, seed: int = 0):
        self.level = checked_scale("image-noise level", level, 0.0, MAX_NOISE_SCALE, "e.g. --scale 0.1,0.5")
        self.seed = seed

    def params(self):
        return {"level": self.level}

    def apply(self, instance, images, donor=None, donor_images=None):
        from PIL import Image

        out = []
        for k, img in enumerate(images):
            rng = np.random.default_rng(_seed_for(self.seed, instance.id, k, "pixels"))
            pixels = np.asarray(img, dtype=np.float32)
            noisy = pixels + rng.normal(0.0, self.level * 255.0, size=pixels.shape)
            out.append(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)))
        return out, None


@register_intervention("image-blank")
class ImageBlank(InputIntervention):
    kind = "image-blank"
    needs_images = True

    def __init__(self, colour: str = "gray", seed: int = 0):
        self.colour = colour
        self.seed = seed

    def params(self):
        return {"colour": self.colour}

    def apply(self, instance, images, donor=None, donor_images=None):
        from PIL import Image

        value = {"gray": (128, 128, 128), "black": (0, 0, 0), "white": (255, 255, 255)}.get(self.colour)
        if value is None:
            raise LatentProbeError(f"unknown blank colour {self.colour!r}", "use gray, black or white")
        return [Image.new("RGB", img.size, value) for img in images], None


@register_intervention("image-mask")
class ImageMask(InputIntervention):
    """A gray box over a region: ``region`` center / top / bottom / left / right, covering ``fraction`` of each side."""

    kind = "image-mask"
    needs_images = True

    # one per --scale, read as the masked fraction of each side (default 0.5)
    scale_param, scale_default = "fraction", 0.5

    def __init__(self, region: str = "center", fraction: float = 0.5, seed: int = 0):
        if region not in ("center", "top", "bottom", "left", "right"):
            raise LatentProbeError(f"unknown mask region {region!r}", "use center, top, bottom, left or right")
        fraction = checked_scale("image-mask fraction", fraction, 0.0, 1.0, "e.g. --scale 0.25,0.5")
        self.region, self.fraction, self.seed = region, fraction, seed

    def params(self):
        return {"region": self.region, "fraction": self.fraction}

    def apply(self, instance, images, donor=None, donor_images=None):
        out = []
        for img in images:
            pixels = np.asarray(img).copy()
            h, w = pixels.shape[:2]
            bh, bw = int(round(h * self.fraction)), int(round(w * self.fraction))
            y0, x0 = {"center": ((h - bh) // 2, (w - bw) // 2), "top": (0, 0), "bottom": (h - bh, 0),
                      "left": (0, 0), "right": (0, w - bw)}[self.region]
            if self.region in ("top", "bottom"):
                bw, x0 = w, 0
            if self.region in ("left", "right"):
                bh, y0 = h, 0
            pixels[y0:y0 + bh, x0:x0 + bw] = 128
            from PIL import Image

            out.append(Image.fromarray(pixels))
        return out, None


@register_intervention("question-swap")
class QuestionSwap(InputIntervention):
    """Ask another instance's question about this instance's image (options and gold stay this instance's)."""

    kind = "question-swap"
    needs_donor = True
    edits_images = False

    def __init__(self, seed: int = 0):
        self.seed = seed

    def apply(self, instance, images, donor=None, donor_images=None):
        return images, donor.question


@register_intervention("no-image")
class NoImage(InputIntervention):
    kind = "no-image"
    needs_images = True

    def __init__(self, seed: int = 0):
        self.seed = seed

    def apply(self, instance, images, donor=None, donor_images=None):
        return [], None
