"""The evaluation preprocessing of a logged model, applied with OpenCV and NumPy only.

`facemask.data.transforms` builds the same steps with albumentations, which imports torch
(about 3 s and 300 MiB). Serving with ONNX Runtime needs neither, so this module repeats the
two steps of `build_eval_transform` with the operations albumentations 2.0 runs for them:

- `A.Resize(size, size, area_for_downscale="image")`: `cv2.resize` with `INTER_AREA` when
  either side shrinks, else `INTER_LINEAR`, skipped when the size already matches.
- `A.Normalize(mean, std, max_pixel_value=255)` on uint8 pixels: a float32 lookup table per
  channel, `(value - mean * 255) * (1 / (std * 255))`.

The results are bit-identical to the albumentations transform; tests/test_serving.py checks it
on real photos.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from PIL import Image

MAX_PIXEL_VALUE = 255.0
_FIELDS = ("image_size", "mean", "std", "resize", "jpeg_draft")


@dataclass(frozen=True)
class EvalPreprocessing:
    """Resize to a square and normalise, as stored in a model's `preprocessing` metadata.

    The fields and their checks are those of `facemask.data.transforms.Preprocessing`.

    Attributes:
        image_size: Side of the square model input in pixels.
        mean: Per-channel mean subtracted after scaling pixels to [0, 1].
        std: Per-channel standard deviation divided by after subtracting the mean.
        resize: `stretch`, the only mode: both sides go to `image_size`.
        jpeg_draft: Whether JPEG files are decoded at a reduced scale no smaller than
            `image_size`.
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "stretch"
    jpeg_draft: bool = True

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise ValueError(f"image_size must be at least 16 pixels, got {self.image_size}")
        if self.resize != "stretch":
            raise ValueError(f"unsupported resize mode {self.resize!r}; supported: 'stretch'")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values each, got {self.mean} and {self.std}")
        # Float32 lookup tables of shape (3, 256), computed as albumentations' Normalize does.
        mean = np.array(self.mean, dtype=np.float32) * MAX_PIXEL_VALUE
        denominator = np.reciprocal(np.array(self.std, dtype=np.float32) * MAX_PIXEL_VALUE)
        table = (np.arange(256, dtype=np.float32) - mean.reshape(-1, 1)) * denominator.reshape(
            -1, 1
        )
        object.__setattr__(self, "_table", table)

    @property
    def draft_size(self) -> int | None:
        """The `draft_size` to decode with, or None when draft decoding is off."""
        return self.image_size if self.jpeg_draft else None

    def to_dict(self) -> dict[str, Any]:
        """Return the metadata form, equal to `Preprocessing.to_dict()` of the same values."""
        return {
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "resize": self.resize,
            "jpeg_draft": self.jpeg_draft,
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> EvalPreprocessing:
        """Build from a model's `preprocessing` metadata; unknown keys are an error."""
        unknown = set(values) - set(_FIELDS)
        if unknown:
            raise ValueError(
                f"unknown preprocessing keys {sorted(unknown)}; known: {sorted(_FIELDS)}"
            )
        kwargs = dict(values)
        # The defaults of `Preprocessing`, for metadata written before a field existed.
        kwargs.setdefault("image_size", 224)
        kwargs.setdefault("mean", (0.485, 0.456, 0.406))
        kwargs.setdefault("std", (0.229, 0.224, 0.225))
        kwargs["image_size"] = int(kwargs["image_size"])
        for key in ("mean", "std"):
            kwargs[key] = tuple(float(value) for value in kwargs[key])
        return cls(**kwargs)

    def apply(self, image: Image.Image, out: np.ndarray | None = None) -> np.ndarray:
        """Resize and normalise an RGB picture into a CHW float32 array.

        Args:
            image: A picture in mode RGB.
            out: An array of shape (3, image_size, image_size) and dtype float32 to write
                into; a new one is allocated when None.
        """
        pixels = np.asarray(image)
        size = self.image_size
        height, width = pixels.shape[:2]
        if (height, width) != (size, size):
            shrinks = size < height or size < width
            interpolation = cv2.INTER_AREA if shrinks else cv2.INTER_LINEAR
            pixels = cv2.resize(pixels, (size, size), interpolation=interpolation)
        if out is None:
            out = np.empty((3, size, size), dtype=np.float32)
        table: np.ndarray = self._table  # type: ignore[attr-defined]
        for channel in range(3):
            np.take(table[channel], pixels[:, :, channel], out=out[channel])
        return out
