"""Tests for decoding image files of any supported format and mode into RGB."""

from __future__ import annotations

import csv
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facemask.data.images import (
    BACKGROUND_RGB,
    ImageTooLargeError,
    InvalidImageError,
    decode_image,
    load_rgb,
    to_rgb,
)


def _encode(img: Image.Image, file_format: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=file_format, **params)
    return buffer.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    body = kind + payload
    return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))


def _png_declaring_size(width: int, height: int) -> bytes:
    """Return a small PNG whose header declares `width` x `height` RGB pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + _png_chunk(b"IEND", b"")
    )


def test_png_named_jpg_decodes_as_png(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    path.write_bytes(_encode(Image.new("RGB", (8, 6), (10, 20, 30)), "PNG"))

    decoded = decode_image(path)

    assert decoded.format == "PNG"
    assert decoded.image.mode == "RGB"
    assert decoded.image.getpixel((0, 0)) == (10, 20, 30)


def test_webp_without_extension_decodes(tmp_path: Path) -> None:
    path = tmp_path / "picture"
    path.write_bytes(_encode(Image.new("RGB", (8, 6), (200, 100, 50)), "WEBP", lossless=True))

    decoded = decode_image(path)

    assert decoded.format == "WEBP"
    assert (decoded.width, decoded.height) == (8, 6)
    assert decoded.image.getpixel((3, 3)) == (200, 100, 50)


def test_rgba_composites_onto_white() -> None:
    img = Image.new("RGBA", (4, 1), (0, 0, 0, 0))
    img.putpixel((1, 0), (255, 0, 0, 255))
    img.putpixel((2, 0), (0, 0, 0, 128))

    decoded = decode_image(_encode(img, "PNG"))

    assert decoded.mode == "RGBA"
    assert decoded.image.mode == "RGB"
    assert decoded.image.getpixel((0, 0)) == BACKGROUND_RGB
    assert decoded.image.getpixel((1, 0)) == (255, 0, 0)
    grey = decoded.image.getpixel((2, 0))
    assert all(126 <= value <= 128 for value in grey), grey


def test_palette_transparency_composites_onto_white() -> None:
    img = Image.new("P", (2, 1), 0)
    img.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    img.putpixel((1, 0), 1)

    decoded = decode_image(_encode(img, "PNG", transparency=0))

    assert decoded.mode == "P"
    assert decoded.image.getpixel((0, 0)) == BACKGROUND_RGB
    assert decoded.image.getpixel((1, 0)) == (0, 255, 0)


def test_palette_without_transparency_keeps_colours() -> None:
    img = Image.new("P", (2, 1), 0)
    img.putpalette([0, 0, 255] + [0] * 765)

    decoded = decode_image(_encode(img, "PNG"))

    assert decoded.image.getpixel((0, 0)) == (0, 0, 255)


def test_greyscale_l_becomes_grey_rgb() -> None:
    decoded = decode_image(_encode(Image.new("L", (3, 2), 100), "PNG"))

    assert decoded.mode == "L"
    assert decoded.image.mode == "RGB"
    assert decoded.image.getpixel((2, 1)) == (100, 100, 100)


def test_sixteen_bit_png_scales_to_eight_bits() -> None:
    img = Image.new("I;16", (2, 1), 0)
    img.putpixel((0, 0), 65535)
    img.putpixel((1, 0), 100 * 257)

    decoded = decode_image(_encode(img, "PNG"))

    assert decoded.mode == "I;16"
    assert decoded.image.getpixel((0, 0)) == (255, 255, 255)
    assert decoded.image.getpixel((1, 0)) == (100, 100, 100)


def test_cmyk_jpeg_becomes_rgb() -> None:
    data = _encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=100)

    decoded = decode_image(data)

    assert decoded.mode == "CMYK"
    assert decoded.image.mode == "RGB"
    red, green, blue = decoded.image.getpixel((8, 8))
    assert red > 240, (red, green, blue)
    assert green < 15, (red, green, blue)
    assert blue < 15, (red, green, blue)


@pytest.mark.parametrize("draft_size", [None, 8])
def test_exif_orientation_six_rotates(draft_size: int | None) -> None:
    img = Image.new("RGB", (64, 32), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 8, 8))  # White mark in the stored top-left corner.
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(img, "JPEG", exif=exif, quality=100)

    decoded = decode_image(data, draft_size=draft_size)

    assert (decoded.width, decoded.height) == (32, 64)
    assert decoded.image.width < decoded.image.height
    if draft_size is None:
        assert decoded.image.size == (32, 64)
        # Orientation 6 turns the stored top-left corner into the displayed top-right corner.
        assert min(decoded.image.getpixel((31, 0))) > 200
        assert max(decoded.image.getpixel((0, 0))) < 50


def test_draft_keeps_full_size() -> None:
    data = _encode(Image.new("RGB", (800, 400), (1, 2, 3)), "JPEG")

    decoded = decode_image(data, draft_size=100)

    assert (decoded.width, decoded.height) == (800, 400)
    assert decoded.image.size == (200, 100)


@pytest.mark.parametrize("draft_size", [None, 32])
def test_truncated_jpeg_is_rejected(draft_size: int | None) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(noise), "JPEG", quality=95)

    with pytest.raises(InvalidImageError, match="cannot decode JPEG"):
        decode_image(data[: len(data) // 2], draft_size=draft_size)


@pytest.mark.parametrize(
    ("name", "content"),
    [("text.jpg", b"This is a text file, not a JPEG.\n"), ("empty.jpg", b"")],
)
def test_non_image_is_rejected(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)

    with pytest.raises(InvalidImageError, match="not a supported image"):
        decode_image(path)


def test_unsupported_format_is_rejected() -> None:
    data = _encode(Image.new("RGB", (4, 4)), "PPM")

    with pytest.raises(InvalidImageError, match="not a supported image"):
        decode_image(data)


# 10,000^2 is above DEFAULT_MAX_PIXELS but below Pillow's own limit; 100,000^2 is above both.
@pytest.mark.parametrize("side", [10_000, 100_000])
def test_huge_declared_size_is_rejected(side: int) -> None:
    data = _png_declaring_size(side, side)

    with pytest.raises(ImageTooLargeError):
        decode_image(data)


def test_max_pixels_rejects_small_image() -> None:
    data = _encode(Image.new("RGB", (20, 10)), "PNG")

    with pytest.raises(ImageTooLargeError, match="200 pixels"):
        decode_image(data, max_pixels=199)
    assert decode_image(data, max_pixels=200).image.size == (20, 10)


def test_path_bytes_and_file_object_agree(tmp_path: Path) -> None:
    img = Image.new("RGB", (5, 4), (9, 8, 7))
    data = _encode(img, "PNG")
    path = tmp_path / "a.png"
    path.write_bytes(data)

    from_path = decode_image(path)
    from_str = decode_image(str(path))
    from_bytes = decode_image(data)
    with path.open("rb") as handle:
        from_file = decode_image(handle)

    for decoded in (from_path, from_str, from_bytes, from_file):
        assert decoded.image.tobytes() == img.tobytes()
        assert (decoded.format, decoded.width, decoded.height) == ("PNG", 5, 4)


def test_load_rgb_returns_image(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(_encode(Image.new("LA", (3, 3), (50, 255)), "PNG"))

    img = load_rgb(path)

    assert img.mode == "RGB"
    assert img.getpixel((1, 1)) == (50, 50, 50)


@pytest.mark.parametrize(
    ("mode", "color", "expected"),
    [
        ("RGB", (1, 2, 3), (1, 2, 3)),
        ("RGBA", (10, 20, 30, 0), BACKGROUND_RGB),
        ("RGBA", (10, 20, 30, 255), (10, 20, 30)),
        ("LA", (70, 255), (70, 70, 70)),
        ("L", 70, (70, 70, 70)),
        ("1", 1, (255, 255, 255)),
        ("I;16", 257 * 70, (70, 70, 70)),
        ("I", 70, (70, 70, 70)),
        ("I", 257 * 70, (70, 70, 70)),
        ("F", 0.5, (128, 128, 128)),
        ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
        ("YCbCr", (255, 128, 128), (255, 255, 255)),
    ],
)
def test_to_rgb_mode(mode: str, color: object, expected: tuple[int, int, int]) -> None:
    img = Image.new(mode, (3, 2), color)

    rgb = to_rgb(img)

    assert rgb.mode == "RGB"
    assert rgb.size == (3, 2)
    assert rgb.getpixel((2, 1)) == expected


def test_real_webp_without_image_extension(real_data_root: Path) -> None:
    relpath = "mask/black3.jpg_1088Wx1632H"
    with (real_data_root / "manifest.csv").open(encoding="utf-8") as handle:
        row = next(row for row in csv.DictReader(handle) if row["path"] == relpath)

    decoded = decode_image(real_data_root / relpath)

    assert decoded.format == row["format"] == "WEBP"
    assert decoded.mode == row["mode"]
    assert (decoded.width, decoded.height) == (int(row["width"]), int(row["height"]))
    assert decoded.image.size == (decoded.width, decoded.height)
