"""Decode any supported image file into an RGB picture, the same way in training and serving.

Files are recognised by their content, not their extension, so a PNG named `.jpg` or a WEBP file
without an extension decodes normally. Every decode is strict: a truncated file is an error, not a
partly grey picture.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow format names accepted as input. Anything else is rejected before decoding.
SUPPORTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

# 50 megapixels is larger than any camera frame this tool expects (8K UHD is 33 MP) and small
# enough that one decoded image stays under 200 MB of memory.
DEFAULT_MAX_PIXELS = 50_000_000

# Transparent areas are composited onto white, the usual page background of web images.
BACKGROUND_RGB = (255, 255, 255)

ImageSource = str | os.PathLike[str] | bytes | BinaryIO


class InvalidImageError(ValueError):
    """A file that is not a supported image, or that fails to decode."""


class ImageTooLargeError(InvalidImageError):
    """An image whose declared pixel count exceeds the configured maximum."""


@dataclass(frozen=True)
class DecodedImage:
    """An RGB picture with the properties of the file it came from.

    Attributes:
        image: The decoded picture in mode RGB, EXIF orientation applied.
        format: The Pillow format name of the file, such as `JPEG`.
        mode: The Pillow mode of the file before conversion, such as `RGBA` or `CMYK`.
        width: The width of the picture in pixels after EXIF orientation, before any draft
            reduction.
        height: The height of the picture in pixels after EXIF orientation, before any draft
            reduction.
    """

    image: Image.Image
    format: str
    mode: str
    width: int
    height: int


def decode_image(
    source: ImageSource,
    *,
    draft_size: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> DecodedImage:
    """Decode an image file into RGB.

    Args:
        source: A path, the file's bytes, or a binary file object.
        draft_size: If set, JPEG files are decoded at the smallest power-of-two reduction that
            keeps both sides at or above this many pixels. This is several times faster for
            large photos and changes the result only slightly, so training and serving must use
            the same value.
        max_pixels: Images that declare more pixels than this are rejected before decoding,
            which protects against decompression bombs. `None` disables the check.

    Raises:
        ImageTooLargeError: The declared size exceeds `max_pixels`.
        InvalidImageError: The data is not a supported image, or fails to decode.
    """
    fp: str | os.PathLike[str] | BinaryIO = (
        io.BytesIO(source) if isinstance(source, bytes) else source
    )
    try:
        # Pillow warns above its own pixel limit and raises at twice that limit. The explicit
        # `max_pixels` check below replaces both.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp, formats=SUPPORTED_FORMATS)
    except UnidentifiedImageError as exc:
        raise InvalidImageError(
            f"not a supported image; supported formats: {', '.join(SUPPORTED_FORMATS)}"
        ) from exc
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(str(exc)) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImageError(f"cannot read image header: {exc}") from exc

    with img:
        width, height = img.size
        if width <= 0 or height <= 0:
            raise InvalidImageError(f"image has an empty size {width}x{height}")
        if max_pixels is not None and width * height > max_pixels:
            raise ImageTooLargeError(
                f"image declares {width}x{height} = {width * height} pixels, "
                f"more than the limit of {max_pixels}"
            )
        file_format = img.format or "unknown"
        file_mode = img.mode
        if draft_size is not None and file_format == "JPEG":
            img.draft(img.mode, (draft_size, draft_size))
        try:
            # Pillow raises on truncated data unless PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set,
            # which this project never does.
            img.load()
            rgb = to_rgb(_apply_exif_orientation(img))
        except Exception as exc:  # Pillow's decoders raise many exception types on bad data.
            raise InvalidImageError(f"cannot decode {file_format} image: {exc}") from exc
        if rgb.size != img.size:
            # EXIF orientations 5 to 8 swap the axes, and the reported size follows the picture.
            width, height = height, width
    return DecodedImage(image=rgb, format=file_format, mode=file_mode, width=width, height=height)


def load_rgb(source: ImageSource, *, draft_size: int | None = None) -> Image.Image:
    """Decode an image file into an RGB picture; see `decode_image`."""
    return decode_image(source, draft_size=draft_size).image


def _apply_exif_orientation(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError):
        # A damaged EXIF block is no reason to reject the picture itself.
        return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded picture of any Pillow mode to RGB.

    Transparency (alpha channels and palette transparency) is composited onto white. 16-bit and
    32-bit greyscale are scaled to 8 bits. CMYK, greyscale, bilevel and palette pictures use
    Pillow's own conversions.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND_RGB + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_l(img).convert("RGB")
    return img.convert("RGB")


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    values = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        values = values / 257.0
    elif img.mode == "F" and values.size and float(values.max()) <= 1.0:
        # Float images usually store intensities in [0, 1].
        values = values * 255.0
    elif values.size and float(values.max()) > 255.0:
        # 32-bit integer images usually hold 16-bit data (TIFF, PNG read as `I`).
        values = values / 257.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
