"""Turn uploaded image bytes into class probabilities per face and per image.

With the face stage, an upload is decoded at the stage's draft size
(`FaceStageSettings.draft_size`), and the stage finds its faces or falls back to the whole
picture. Each crop then gets the evaluation preprocessing, resizing and normalisation. Here
`EvalPreprocessing` applies it, which gives the same values as the albumentations transform
without torch. The per-face and image-level results are those of
`facemask.faces.pipeline.classify_regions`, which training's checks and `facemask evaluate` use.

Without the face stage, the steps are those of `facemask.data.transforms.preprocess_file`:
`decode_image` with the model's draft size (JPEG draft mode), then the same preprocessing of
the whole picture.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from facemask.data.images import decode_image
from facemask.faces.detector import FaceBox
from facemask.faces.pipeline import FaceResult, combine
from facemask.faces.stage import FaceSearch
from facemask.monitoring.properties import image_properties

if TYPE_CHECKING:
    from facemask.faces.stage import FaceStage
    from facemask.serving.served_model import ServedModel


@dataclass(frozen=True)
class PreparedImage:
    """A decoded upload, cut into the regions that the model classifies.

    Attributes:
        arrays: Normalised CHW float32 model inputs, one per region of `search`.
        search: The regions, in the pixels of the decoded picture: one per face found, or the
            whole picture. JPEG draft mode may decode a picture smaller than the upload.
        width: Width of the upload in pixels, after EXIF orientation.
        height: Height of the upload in pixels, after EXIF orientation.
        face_search: Whether the face stage searched the picture.
        properties: `image_properties` of the decoded picture, logged with the prediction.
    """

    arrays: list[np.ndarray]
    search: FaceSearch
    width: int
    height: int
    face_search: bool
    properties: dict[str, Any]

    def upload_box(self, box: FaceBox) -> tuple[float, float, float, float]:
        """Return `box` of the decoded picture in the upload's pixels, as (x0, y0, x1, y1)."""
        # Multiplying before dividing keeps the whole-picture box exact: (0, 0, width, height).
        return (
            min(box.x0 * self.width / self.search.width, float(self.width)),
            min(box.y0 * self.height / self.search.height, float(self.height)),
            min(box.x1 * self.width / self.search.width, float(self.width)),
            min(box.y1 * self.height / self.search.height, float(self.height)),
        )


@dataclass(frozen=True)
class Prediction:
    """Class probabilities of one image and of each region in it.

    Attributes:
        probabilities: Image-level probability per class name, in the model's class order.
            With several faces, `no_mask` is the highest `no_mask` probability of any face
            (see `facemask.faces.pipeline.combine`).
        label: The image-level class with the highest probability.
        faces: One result per face, with its box in the upload's pixels. When no face was
            found or the stage did not run, one whole-image result with `detected` False.
        counts: Faces per class. The whole image counts once when no face was found.
        face_search: Whether the face stage searched the picture.
        properties: `image_properties` of the input.
    """

    probabilities: dict[str, float]
    label: str
    faces: list[FaceResult]
    counts: dict[str, int]
    face_search: bool
    properties: dict[str, Any]

    @property
    def face_found(self) -> bool:
        """True when the face stage found at least one face."""
        return any(face.detected for face in self.faces)


class Predictor:
    """Decode, search for faces, preprocess and classify images with one loaded model.

    Methods are blocking and thread-safe: call them from worker threads.

    Args:
        bundle: The served model.
        max_pixels: Largest accepted image in pixels, or None for no limit.
        faces: Use the face stage of `bundle` (`bundle.face_stage`), when it has one.
    """

    def __init__(self, bundle: ServedModel, max_pixels: int | None, faces: bool = True):
        self.bundle = bundle
        self.max_pixels = max_pixels
        self.face_stage: FaceStage | None = bundle.face_stage if faces else None

    def prepare(self, data: bytes, faces: bool = True) -> PreparedImage:
        """Decode one image file, find its faces and preprocess each region.

        Args:
            data: The image file.
            faces: Run the face stage, when this predictor has one; False classifies the whole
                picture, decoded as without a face stage.

        Raises:
            ImageTooLargeError: The declared pixel count exceeds `max_pixels`.
            InvalidImageError: The data is not a supported image, or fails to decode.
        """
        preprocessing = self.bundle.preprocessing
        stage = self.face_stage if faces else None
        if stage is None:
            decoded = decode_image(
                data, draft_size=preprocessing.draft_size, max_pixels=self.max_pixels
            )
            arrays = [preprocessing.apply(decoded.image)]
            search = FaceSearch.whole_picture(decoded.image.width, decoded.image.height)
        else:
            draft_size = stage.settings.draft_size(
                preprocessing.image_size, preprocessing.jpeg_draft
            )
            decoded = decode_image(data, draft_size=draft_size, max_pixels=self.max_pixels)
            rgb = np.asarray(decoded.image)
            search = stage.search(rgb)
            arrays = [preprocessing.apply(np.ascontiguousarray(crop)) for crop in search.crops(rgb)]
        return PreparedImage(
            arrays=arrays,
            search=search,
            width=decoded.width,
            height=decoded.height,
            face_search=stage is not None,
            properties=image_properties(decoded),
        )

    def infer(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run the model on model inputs in one batch; return one probability row per input."""
        if not arrays:
            return []
        return list(self.bundle.model(np.stack(arrays)))

    def result(self, image: PreparedImage, rows: Sequence[np.ndarray]) -> Prediction:
        """Combine the probability rows of an image's regions into its prediction.

        The rows are those of `image.arrays`, in order. The steps are those of
        `facemask.faces.pipeline.classify_regions`, with boxes scaled to the upload's pixels.
        """
        names = self.bundle.class_names
        faces = []
        for region, row in zip(image.search.regions, rows, strict=True):
            by_class = {name: float(value) for name, value in zip(names, row, strict=True)}
            faces.append(
                FaceResult(
                    box=image.upload_box(region.box),
                    score=region.box.score,
                    probabilities=by_class,
                    label=max(by_class, key=by_class.get),
                    detected=region.detected,
                )
            )
        picture = combine([face.probabilities for face in faces], names)
        counts = dict.fromkeys(names, 0)
        for face in faces:
            counts[face.label] += 1
        return Prediction(
            probabilities=picture,
            label=max(picture, key=picture.get),
            faces=faces,
            counts=counts,
            face_search=image.face_search,
            properties=image.properties,
        )

    def classify(self, images: Sequence[PreparedImage]) -> list[Prediction]:
        """Run the model on the regions of prepared images in one batch."""
        rows = self.infer([array for image in images for array in image.arrays])
        predictions = []
        start = 0
        for image in images:
            end = start + len(image.arrays)
            predictions.append(self.result(image, rows[start:end]))
            start = end
        return predictions

    def predict(self, data: bytes, faces: bool = True) -> Prediction:
        """Decode, search, preprocess and classify one image file; raises like `prepare`."""
        return self.classify([self.prepare(data, faces)])[0]
