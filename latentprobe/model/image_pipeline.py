"""Each family's image preprocessing as its authors run it, part of the family's spec and of every manifest.

Qwen2.5-VL's processor resizes an image itself (to multiples of 28 within its pixel budget). Some authors resize
first, with ``qwen_vl_utils`` (``fetch_image``: `smart_resize` to a pixel budget, then ``PIL.Image.resize``, whose
default filter for RGB is bicubic), and hand the processor an image that is already a multiple of 28: LVR's
evaluation (VincentLeebang/lvr evaluation/evaluation.py calls ``process_vision_info`` with no budget: 4 to 16384 x
28 x 28 pixels) and Monet's inference (256 to 8192 x 28 x 28, inference/load_and_gen_vllm.py). The two paths give
the same grid but different pixel values (up to 0.64 normalised on a 150 x 100 image, REFERENCE.md section 5), so
a family run the other way is run on other inputs than its authors'.

`smart_resize` is qwen_vl_utils' rule (qwen-vl-utils 0.0.14, src/qwen_vl_utils/vision_process.py), restated here
because that package imports torchvision at module level, which this project does not install.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import InstanceError

PATCH_FACTOR = 28  # Qwen2.5-VL: 14-pixel patches merged 2 x 2
MAX_RATIO = 200  # qwen_vl_utils refuses images more elongated than this
QWEN_VL_UTILS_MIN_PIXELS = 4 * 28 * 28  # IMAGE_MIN_TOKEN_NUM * factor ** 2
QWEN_VL_UTILS_MAX_PIXELS = 16384 * 28 * 28  # IMAGE_MAX_TOKEN_NUM * factor ** 2


def smart_resize(height: int, width: int, factor: int = PATCH_FACTOR, min_pixels: int = QWEN_VL_UTILS_MIN_PIXELS,
                 max_pixels: int = QWEN_VL_UTILS_MAX_PIXELS) -> tuple[int, int]:
    """(height, width) as qwen_vl_utils resizes an image: both multiples of ``factor``, the area inside
    [min_pixels, max_pixels], the aspect ratio kept as closely as possible.

    >>> smart_resize(100, 150)
    (112, 140)
    """
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise InstanceError(f"an image of {width} x {height} pixels is more elongated than {MAX_RATIO}:1",
                            "crop or pad it (qwen_vl_utils, which this family's authors use, refuses it too)")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class ImagePipeline:
    """How a family's images reach the processor.

    ``resize``: ``"processor"`` (the image as loaded; the processor's own resize, Qwen's default) or
    ``"qwen_vl_utils"`` (`smart_resize` within ``min_pixels``..``max_pixels``, bicubic, before the processor).
    """

    resize: str = "processor"
    min_pixels: int | None = None
    max_pixels: int | None = None
    source: str = "Qwen2.5-VL's processor defaults"

    def __post_init__(self):
        if self.resize not in ("processor", "qwen_vl_utils"):
            raise ValueError(f"unknown image resize {self.resize!r}")

    def prepare(self, image: Any) -> Any:
        """The image as the family's authors hand it to the processor."""
        if self.resize == "processor":
            return image
        from PIL import Image

        width, height = image.size
        new_height, new_width = smart_resize(height, width, PATCH_FACTOR,
                                             self.min_pixels or QWEN_VL_UTILS_MIN_PIXELS,
                                             self.max_pixels or QWEN_VL_UTILS_MAX_PIXELS)
        if (new_width, new_height) == (width, height):
            return image
        return image.resize((new_width, new_height), Image.Resampling.BICUBIC)

    def describe(self) -> dict[str, Any]:
        return asdict(self)


PROCESSOR_DEFAULT = ImagePipeline()
LVR_PIPELINE = ImagePipeline("qwen_vl_utils", QWEN_VL_UTILS_MIN_PIXELS, QWEN_VL_UTILS_MAX_PIXELS,
                             "VincentLeebang/lvr evaluation/evaluation.py: qwen_vl_utils.process_vision_info with "
                             "its default budget, then the processor")
MONET_PIPELINE = ImagePipeline("qwen_vl_utils", 256 * 28 * 28, 8192 * 28 * 28,
                               "NOVAglow646/Monet inference/load_and_gen_vllm.py: 256-8192 x 28 x 28 pixels")
# Mirage: the VSP map images go to the processor as the benchmark ships them (no pre-resize is documented for
# it in REFERENCE.md; not checked against its src/test.py this round).
MIRAGE_PIPELINE = ImagePipeline("processor", None, None,
                                "Mirage: VSP maps as shipped, resized by the processor (no qwen_vl_utils step known)")
