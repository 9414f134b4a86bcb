"""Decode, search and classify pictures as serving does, with many pictures per model call."""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from facemask.data.images import decode_image
from facemask.data.transforms import Preprocessing, build_eval_transform
from facemask.faces.pipeline import PictureResult, classify_regions
from facemask.faces.stage import FaceRegion, FaceSearch, FaceStage, FaceStageSettings

log = logging.getLogger(__name__)

# Errors of one picture that a check counts and skips. Decoding raises InvalidImageError (a
# ValueError) or OSError, and the face detector raises ValueError or RuntimeError on pixels that
# it cannot process.
PICTURE_ERRORS = (OSError, ValueError, RuntimeError)

# Skipped files named one by one in the log. The log counts the rest, and skipped.csv lists all.
MAX_SKIPPED_IN_LOG = 5

Item = TypeVar("Item")


@dataclass(frozen=True)
class SkippedPicture:
    """A file that a check could not use, and why."""

    path: Path
    reason: str


class PictureClassifier:
    """The served pipeline of one model: decode, face stage, evaluation transform, model.

    Args:
        model: Maps normalised NCHW float32 to class probabilities; must be in eval mode.
        class_names: Class names in the model's output order.
        preprocessing: The model's evaluation preprocessing.
        face_stage: The model's face stage settings; None for a model of whole pictures.
        batch_size: Maximum number of crops in one model call.

    Raises:
        ValueError: The model is in training mode.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        class_names: Sequence[str],
        preprocessing: Preprocessing,
        face_stage: FaceStageSettings | None,
        batch_size: int = 32,
    ):
        if model.training:
            # BatchNorm layers would update their statistics with every check picture.
            raise ValueError("the model is in training mode; call model.eval() before the checks")
        self.model = model
        self.class_names = list(class_names)
        self.preprocessing = preprocessing
        self.face_stage = face_stage
        self.batch_size = batch_size
        self.stage = FaceStage(face_stage) if face_stage is not None else None
        self._locator: FaceStage | None = self.stage
        if face_stage is not None:
            self.draft_size = face_stage.draft_size(
                preprocessing.image_size, preprocessing.jpeg_draft
            )
        else:
            self.draft_size = preprocessing.draft_size
        self.transform = build_eval_transform(preprocessing)
        parameter = next(model.parameters(), None)
        self.device = parameter.device if parameter is not None else torch.device("cpu")

    @property
    def locator(self) -> FaceStage:
        """The face stage of the checks: the model's, or a default one for a whole-picture model."""
        if self._locator is None:
            self._locator = FaceStage(FaceStageSettings())
        return self._locator

    def decode(self, path: Path) -> np.ndarray:
        """Decode a file into HWC uint8 RGB pixels at the model's draft size."""
        return np.asarray(decode_image(path, draft_size=self.draft_size).image)

    def prepare(self, crop: np.ndarray) -> np.ndarray:
        """Apply the evaluation transform to HWC uint8 RGB pixels; returns CHW float32."""
        return self.transform(image=crop)["image"].numpy()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Return the model's class probabilities of an NCHW float32 batch."""
        with torch.inference_mode():
            output = self.model(torch.from_numpy(batch).to(self.device))
        return output.float().cpu().numpy()

    def search(self, rgb: np.ndarray) -> FaceSearch:
        """Return the regions that `classify_faces` classifies: the faces, or the whole picture."""
        if self.stage is None:
            return FaceSearch.whole_picture(rgb.shape[1], rgb.shape[0])
        return self.stage.search(rgb)

    def classify(self, items: Sequence[tuple[np.ndarray, FaceSearch]]) -> list[PictureResult]:
        """Classify the regions of many pictures with at most `batch_size` crops per model call.

        Each picture's result equals `classify_faces(rgb, stage, ...)` when its search is the
        one `search` returns. Only the model calls span several pictures: one call per picture
        was several times slower in a measurement on two CPU cores (resnet18, 128 pixels).
        """
        if not items:
            return []
        prepared = [
            self.prepare(np.ascontiguousarray(crop))
            for rgb, search in items
            for crop in search.crops(rgb)
        ]
        rows = [
            self.infer(np.stack(prepared[start : start + self.batch_size]).astype(np.float32))
            for start in range(0, len(prepared), self.batch_size)
        ]
        probabilities = np.concatenate(rows)
        results = []
        start = 0
        for rgb, search in items:
            picture_rows = probabilities[start : start + len(search.regions)]
            start += len(search.regions)
            # The crops were prepared and classified above. classify_regions gets a prepare step
            # that does nothing and this picture's rows, and combines them by the served rule.
            results.append(
                classify_regions(
                    rgb,
                    search,
                    _skip_prepare,
                    lambda _batch, picture_rows=picture_rows: picture_rows,
                    self.class_names,
                )
            )
        return results


def _skip_prepare(crop: np.ndarray) -> np.ndarray:
    return np.zeros(1, dtype=np.float32)


def top_face(search: FaceSearch) -> FaceRegion | None:
    """Return the detected region with the highest detector score, or None without a face."""
    detected = [region for region in search.regions if region.detected]
    if not detected:
        return None
    return max(detected, key=lambda region: region.box.score)


def chunks(items: Sequence[Item], size: int) -> Iterator[Sequence[Item]]:
    """Yield consecutive slices of at most `size` items."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def report_skipped(check: str, skipped: Sequence[SkippedPicture], folder: Path) -> list[Path]:
    """Log the skipped files of a check and write them to `folder/skipped.csv`.

    Returns:
        The written file, or no path when no file was skipped.
    """
    if not skipped:
        return []
    shown = "; ".join(f"{item.path}: {item.reason}" for item in skipped[:MAX_SKIPPED_IN_LOG])
    more = len(skipped) - MAX_SKIPPED_IN_LOG
    suffix = f"; and {more} more in skipped.csv" if more > 0 else ""
    log.warning("%s check skipped %d file(s): %s%s", check, len(skipped), shown, suffix)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "skipped.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "reason"])
        writer.writerows([str(item.path), item.reason] for item in skipped)
    return [path]


def write_csv(rows: Sequence[dict[str, object]], path: Path) -> Path:
    """Write rows that share their keys to a CSV file with a header row, and return `path`."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path
