"""Classify every face of a picture, and the picture as a whole, the same way everywhere.

Serving, the end-of-training checks and `facemask evaluate` all go through `classify_faces`,
so a number measured offline is a number of the served pipeline.

The picture-level result keeps the response of a model without a face stage. A picture counts as
`no_mask` when any face in it is unmasked, so its `no_mask` probability is the highest `no_mask`
probability of its faces and the other classes share the rest in proportion.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from facemask.faces.stage import FaceSearch, FaceStage

# The class that decides a picture with several faces: one unmasked face makes it unmasked.
ANY_FACE_CLASS = "no_mask"

Prepare = Callable[[np.ndarray], np.ndarray]
Infer = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class FaceResult:
    """One classified region.

    Attributes:
        box: (x0, y0, x1, y1) of the face in the picture's pixels; the whole picture when
            `detected` is False.
        score: Detector confidence; 0 for the whole-picture fallback.
        probabilities: Probability per class name.
        label: The most probable class.
        detected: False for the whole-picture fallback.
    """

    box: tuple[float, float, float, float]
    score: float
    probabilities: dict[str, float]
    label: str
    detected: bool


@dataclass(frozen=True)
class PictureResult:
    """Classified regions of one picture and the picture-level verdict."""

    faces: list[FaceResult]
    probabilities: dict[str, float]
    label: str

    @property
    def fallback(self) -> bool:
        return not any(face.detected for face in self.faces)

    def counts(self, class_names: Sequence[str]) -> dict[str, int]:
        """Faces per class (the whole picture counts once when no face was found)."""
        counts = dict.fromkeys(class_names, 0)
        for face in self.faces:
            counts[face.label] += 1
        return counts


def combine(
    face_probabilities: Sequence[dict[str, float]], class_names: Sequence[str]
) -> dict[str, float]:
    """Return picture-level probabilities from the probabilities of its faces."""
    if len(face_probabilities) == 1 or ANY_FACE_CLASS not in class_names:
        if len(face_probabilities) == 1:
            return dict(face_probabilities[0])
        return {name: float(np.mean([p[name] for p in face_probabilities])) for name in class_names}
    worst = max(face_probabilities, key=lambda p: p[ANY_FACE_CLASS])
    top = worst[ANY_FACE_CLASS]
    rest = 1.0 - worst[ANY_FACE_CLASS]
    others = [name for name in class_names if name != ANY_FACE_CLASS]
    other_total = sum(worst[name] for name in others)
    result = {ANY_FACE_CLASS: top}
    for name in others:
        share = worst[name] / other_total if other_total > 0 else 1.0 / len(others)
        result[name] = rest * share
    return {name: float(result[name]) for name in class_names}


def classify_regions(
    rgb: np.ndarray,
    search: FaceSearch,
    prepare: Prepare,
    infer: Infer,
    class_names: Sequence[str],
) -> PictureResult:
    """Classify the regions `search` found in `rgb` in one batch."""
    crops = search.crops(rgb)
    batch = np.stack([prepare(np.ascontiguousarray(crop)) for crop in crops]).astype(np.float32)
    probabilities = np.asarray(infer(batch), dtype=np.float64)
    faces = []
    for region, row in zip(search.regions, probabilities, strict=True):
        by_class = {name: float(value) for name, value in zip(class_names, row, strict=True)}
        box = region.box
        faces.append(
            FaceResult(
                box=(box.x0, box.y0, box.x1, box.y1),
                score=box.score,
                probabilities=by_class,
                label=max(by_class, key=by_class.get),
                detected=region.detected,
            )
        )
    picture = combine([face.probabilities for face in faces], class_names)
    return PictureResult(faces, picture, max(picture, key=picture.get))


def classify_faces(
    rgb: np.ndarray,
    stage: FaceStage | None,
    prepare: Prepare,
    infer: Infer,
    class_names: Sequence[str],
) -> PictureResult:
    """Find the faces of `rgb` and classify each; with `stage` None, classify the whole picture."""
    if stage is None:
        search = FaceSearch.whole_picture(rgb.shape[1], rgb.shape[0])
    else:
        search = stage.search(rgb)
    return classify_regions(rgb, search, prepare, infer, class_names)
