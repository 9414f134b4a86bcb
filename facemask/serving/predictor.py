"""Turn uploaded image bytes into class probabilities, with the preprocessing of evaluation.

The steps are those of `facemask.data.transforms.preprocess_file`, which training's test stage
uses: `decode_image` with the model's draft size (JPEG draft mode), then resizing and
normalisation, here with `EvalPreprocessing`, which gives the same values without torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from facemask.data.images import decode_image
from facemask.monitoring.properties import image_properties

if TYPE_CHECKING:
    from facemask.serving.served_model import ServedModel


@dataclass(frozen=True)
class PreparedImage:
    """A decoded upload, ready for the model.

    Attributes:
        array: The normalised CHW float32 model input.
        properties: `image_properties` of the decoded picture, logged with the prediction.
    """

    array: np.ndarray
    properties: dict[str, Any]


@dataclass(frozen=True)
class Prediction:
    """Class probabilities of one image.

    Attributes:
        probabilities: Probability per class name, in the model's class order.
        label: The class with the highest probability.
        properties: `image_properties` of the input.
    """

    probabilities: dict[str, float]
    label: str
    properties: dict[str, Any]


class Predictor:
    """Decode, preprocess and classify images with one loaded model.

    Methods are blocking and thread-safe: call them from worker threads.
    """

    def __init__(self, bundle: ServedModel, max_pixels: int | None):
        self.bundle = bundle
        self.max_pixels = max_pixels

    def prepare(self, data: bytes) -> PreparedImage:
        """Decode one image file and apply the evaluation preprocessing.

        Raises:
            ImageTooLargeError: The declared pixel count exceeds `max_pixels`.
            InvalidImageError: The data is not a supported image, or fails to decode.
        """
        preprocessing = self.bundle.preprocessing
        decoded = decode_image(
            data, draft_size=preprocessing.draft_size, max_pixels=self.max_pixels
        )
        properties = image_properties(decoded)
        return PreparedImage(array=preprocessing.apply(decoded.image), properties=properties)

    def classify(self, images: Sequence[PreparedImage]) -> list[Prediction]:
        """Run the model on prepared images in one batch."""
        if not images:
            return []
        batch = np.stack([image.array for image in images])
        probabilities = self.bundle.model(batch)
        names = self.bundle.class_names
        predictions = []
        for image, row in zip(images, probabilities.tolist(), strict=True):
            by_class = {name: float(value) for name, value in zip(names, row, strict=True)}
            label = names[max(range(len(row)), key=row.__getitem__)]
            predictions.append(Prediction(by_class, label, image.properties))
        return predictions

    def predict(self, data: bytes) -> Prediction:
        """Decode, preprocess and classify one image file; raises like `prepare`."""
        return self.classify([self.prepare(data)])[0]
