"""Simple properties of an input image, logged with every prediction so input drift is visible."""

from __future__ import annotations

from typing import Any

import numpy as np

from facemask.data.images import DecodedImage

# Brightness and contrast are computed on a copy at most this many pixels wide or high, which
# changes them by well under 1% and keeps the cost per request negligible.
_PROPERTY_SIDE = 128


def image_properties(decoded: DecodedImage) -> dict[str, Any]:
    """Return width, height, mode and format of the file, and brightness and contrast.

    Brightness is the mean and contrast the standard deviation of the greyscale picture, both
    scaled to [0, 1].
    """
    small = decoded.image.convert("L")
    small.thumbnail((_PROPERTY_SIDE, _PROPERTY_SIDE))
    grey = np.asarray(small, dtype=np.float32) / 255.0
    return {
        "width": decoded.width,
        "height": decoded.height,
        "mode": decoded.mode,
        "format": decoded.format,
        "brightness": round(float(grey.mean()), 4),
        "contrast": round(float(grey.std()), 4),
    }
