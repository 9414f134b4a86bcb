"""The face stage that training and serving share: find faces, crop them, or fall back.

The rule, applied to the decoded picture in both places so that a model never learns from a
framing that serving does not produce:

1. The picture is downscaled so that its longer side is at most `detect_side` and the detector
   runs on it.
2. When the shorter side of that picture is at least `tile_min_side`, the detector also runs on a
   `tiles` x `tiles` grid of overlapping tiles, which finds faces too small for the whole frame.
   A tile's face is kept when it does not overlap a face already kept.
3. When nothing is found, the detector runs once more on the picture centred on a grey canvas
   `border_scale` times its size: the short-range model misses faces that fill the whole frame.
4. Each face is cropped as a square `1 + 2 * margin` times the longer side of its box, centred
   on the box and clipped to the picture.
5. A picture with no face is used whole (the fallback), and results mark it as such.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np

from facemask.faces.detector import FaceBox, FaceDetector, build_detector

GREY = 128

# Bump when the rule below changes what a search finds, so that cached searches are redone.
STAGE_RULE_VERSION = 1


@dataclass(frozen=True)
class FaceStageSettings:
    """Settings of the face stage; stored with every model trained on face crops.

    Attributes:
        detector: Name of the detector (see `facemask.faces.detector.DETECTORS`).
        min_score: Lowest detector confidence of a face.
        margin: Context added around a face box on each side, as a fraction of its longer side.
        detect_side: Longer side, in pixels, of the picture given to the detector.
        tiles: Tiles per side of the small-face grid; 1 turns tiling off.
        tile_min_side: Shorter side, in pixels at `detect_side`, from which tiling runs.
        border_scale: Canvas size of the grey-border retry relative to the picture; 1 turns
            the retry off.
        max_faces: Most faces kept per picture, highest scores first.
        decode_side: Smallest shorter side, in pixels, that JPEG files are decoded at, so that
            crops of small faces keep their detail.
    """

    detector: str = "blazeface_short_range"
    min_score: float = 0.5
    margin: float = 0.25
    detect_side: int = 640
    tiles: int = 2
    tile_min_side: int = 320
    border_scale: float = 1.6
    max_faces: int = 32
    decode_side: int = 512

    def __post_init__(self) -> None:
        if not 0.0 <= self.margin <= 2.0:
            raise ValueError(f"faces.margin must be between 0 and 2, got {self.margin}")
        if self.tiles < 1:
            raise ValueError(f"faces.tiles must be at least 1, got {self.tiles}")
        if self.border_scale < 1.0:
            raise ValueError(f"faces.border_scale must be at least 1, got {self.border_scale}")
        if self.max_faces < 1:
            raise ValueError(f"faces.max_faces must be at least 1, got {self.max_faces}")
        if self.detect_side < 64 or self.decode_side < 16:
            raise ValueError("faces.detect_side must be >= 64 and faces.decode_side >= 16")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FaceStageSettings:
        """Rebuild from `to_dict` output; unknown keys are an error."""
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown face stage keys {sorted(unknown)}")
        return cls(**dict(values))

    def draft_size(self, image_size: int, jpeg_draft: bool) -> int | None:
        """Return the `draft_size` that pictures are decoded with before the face stage."""
        return max(image_size, self.decode_side) if jpeg_draft else None

    def digest(self) -> str:
        """Return a short hash of the settings, for cache keys."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class FaceRegion:
    """One region of a picture that is given to the classifier.

    Attributes:
        box: The detected face box, or the whole picture for the fallback.
        crop: The square crop around the face (x0, y0, x1, y1, integers), or the whole picture.
        detected: False for the whole-picture fallback.
    """

    box: FaceBox
    crop: tuple[int, int, int, int]
    detected: bool = True


@dataclass(frozen=True)
class FaceSearch:
    """Result of the face search in one picture.

    Attributes:
        regions: The regions to classify: one per face, or the whole picture when none.
        width: Width of the searched picture in pixels.
        height: Height of the searched picture in pixels.
    """

    regions: list[FaceRegion] = field(default_factory=list)
    width: int = 0
    height: int = 0

    @classmethod
    def whole_picture(cls, width: int, height: int) -> FaceSearch:
        """Return the search result that uses the whole picture (no face found, or no search)."""
        whole = FaceBox(0.0, 0.0, float(width), float(height), 0.0)
        return cls([FaceRegion(whole, (0, 0, width, height), detected=False)], width, height)

    @property
    def fallback(self) -> bool:
        """True when no face was found and the whole picture is used."""
        return not any(region.detected for region in self.regions)

    @property
    def faces(self) -> int:
        return sum(region.detected for region in self.regions)

    def crops(self, rgb: np.ndarray) -> list[np.ndarray]:
        """Cut the regions out of `rgb`, the picture that was searched."""
        return [rgb[y0:y1, x0:x1] for x0, y0, x1, y1 in (r.crop for r in self.regions)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "width": self.width,
            "height": self.height,
            "regions": [
                {"box": asdict(r.box), "crop": list(r.crop), "detected": r.detected}
                for r in self.regions
            ],
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FaceSearch:
        regions = [
            FaceRegion(FaceBox(**r["box"]), tuple(int(v) for v in r["crop"]), bool(r["detected"]))
            for r in values["regions"]
        ]
        return cls(regions, int(values["width"]), int(values["height"]))


def overlap_of_smaller(a: FaceBox, b: FaceBox) -> float:
    """Return the intersection area over the smaller box's area."""
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    if width <= 0 or height <= 0:
        return 0.0
    smaller = min(a.area, b.area)
    return width * height / smaller if smaller > 0 else 0.0


def square_crop(box: FaceBox, margin: float, width: int, height: int) -> tuple[int, int, int, int]:
    """Return the square around `box` with `margin` on each side, clipped to the picture."""
    side = max(box.width, box.height) * (1.0 + 2.0 * margin)
    cx = (box.x0 + box.x1) / 2.0
    cy = (box.y0 + box.y1) / 2.0
    x0 = max(0, int(round(cx - side / 2)))
    y0 = max(0, int(round(cy - side / 2)))
    x1 = min(width, int(round(cx + side / 2)))
    y1 = min(height, int(round(cy + side / 2)))
    if x1 - x0 < 2 or y1 - y0 < 2:
        return 0, 0, width, height
    return x0, y0, x1, y1


class FaceStage:
    """Find the face regions of pictures with one detector and one set of settings.

    Args:
        settings: The stage settings.
        detector: A detector; None builds `settings.detector`.
    """

    def __init__(
        self, settings: FaceStageSettings | None = None, detector: FaceDetector | None = None
    ):
        self.settings = settings or FaceStageSettings()
        self.detector = detector or build_detector(self.settings.detector, self.settings.min_score)

    def search(self, rgb: np.ndarray) -> FaceSearch:
        """Find the face regions of HWC uint8 RGB pixels."""
        height, width = rgb.shape[:2]
        scale = min(1.0, self.settings.detect_side / max(height, width))
        small = rgb
        if scale < 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        boxes = self._find(small)
        boxes = sorted(boxes, key=lambda b: -b.score)[: self.settings.max_faces]
        regions = []
        for box in boxes:
            box = box.scaled(1.0 / scale).clipped(width, height)
            if box.width < 1 or box.height < 1:
                continue
            regions.append(FaceRegion(box, square_crop(box, self.settings.margin, width, height)))
        if not regions:
            return FaceSearch.whole_picture(width, height)
        return FaceSearch(regions, width, height)

    def _find(self, rgb: np.ndarray) -> list[FaceBox]:
        boxes = self.detector.detect(rgb)
        height, width = rgb.shape[:2]
        if self.settings.tiles > 1 and min(height, width) >= self.settings.tile_min_side:
            boxes = _merge(boxes, self._tile_boxes(rgb))
        if not boxes and self.settings.border_scale > 1.0:
            boxes = self._border_retry(rgb)
        return [b.clipped(width, height) for b in boxes]

    def _tile_boxes(self, rgb: np.ndarray) -> list[FaceBox]:
        height, width = rgb.shape[:2]
        n = self.settings.tiles
        # Tiles overlap by a quarter of their size, so a face on a seam is whole in one tile.
        tile_w = width / (n - (n - 1) * 0.25)
        tile_h = height / (n - (n - 1) * 0.25)
        found: list[FaceBox] = []
        for row in range(n):
            for col in range(n):
                x0 = int(round(col * tile_w * 0.75))
                y0 = int(round(row * tile_h * 0.75))
                x1 = min(width, int(round(x0 + tile_w)))
                y1 = min(height, int(round(y0 + tile_h)))
                tile = rgb[y0:y1, x0:x1]
                found.extend(box.shifted(x0, y0) for box in self.detector.detect(tile))
        return found

    def _border_retry(self, rgb: np.ndarray) -> list[FaceBox]:
        height, width = rgb.shape[:2]
        pad_x = int(round(width * (self.settings.border_scale - 1.0) / 2))
        pad_y = int(round(height * (self.settings.border_scale - 1.0) / 2))
        canvas = cv2.copyMakeBorder(
            rgb, pad_y, pad_y, pad_x, pad_x, cv2.BORDER_CONSTANT, value=(GREY, GREY, GREY)
        )
        return [box.shifted(-pad_x, -pad_y) for box in self.detector.detect(canvas)]


def _merge(kept: list[FaceBox], extra: list[FaceBox], threshold: float = 0.3) -> list[FaceBox]:
    """Add the `extra` boxes, best first, that overlap no box kept so far."""
    merged = list(kept)
    for box in sorted(extra, key=lambda b: -b.score):
        if all(overlap_of_smaller(box, other) < threshold for other in merged):
            merged.append(box)
    return merged
