"""Turn uploaded image bytes into class probabilities, with the preprocessing of evaluation.

The steps are those of `facemask.data.transforms.preprocess_file`, which training's test stage
uses: `decode_image` with the model's draft size, then the evaluation transform.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import albumentations as A
import torch

from facemask.data.images import decode_image
from facemask.data.transforms import build_eval_transform, image_to_tensor
from facemask.monitoring.properties import image_properties
from facemask.serving.model_store import ModelBundle


@dataclass(frozen=True)
class PreparedImage:
    """A decoded upload, ready for the model.

    Attributes:
        tensor: The normalised CHW float32 model input.
        properties: `image_properties` of the decoded picture, logged with the prediction.
    """

    tensor: torch.Tensor
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

    def __init__(self, bundle: ModelBundle, max_pixels: int | None):
        self.bundle = bundle
        self.max_pixels = max_pixels
        self._local = threading.local()

    def _transform(self) -> A.Compose:
        # One transform per thread, because albumentations does not document Compose as
        # thread-safe.
        transform = getattr(self._local, "transform", None)
        if transform is None:
            transform = build_eval_transform(self.bundle.preprocessing)
            self._local.transform = transform
        return transform

    def prepare(self, data: bytes) -> PreparedImage:
        """Decode one image file and apply the evaluation transform.

        Raises:
            ImageTooLargeError: The declared pixel count exceeds `max_pixels`.
            InvalidImageError: The data is not a supported image, or fails to decode.
        """
        decoded = decode_image(
            data,
            draft_size=self.bundle.preprocessing.draft_size,
            max_pixels=self.max_pixels,
        )
        properties = image_properties(decoded)
        tensor = image_to_tensor(decoded.image, self._transform())
        return PreparedImage(tensor=tensor, properties=properties)

    def classify(self, images: Sequence[PreparedImage]) -> list[Prediction]:
        """Run the model on prepared images in one batch."""
        if not images:
            return []
        batch = torch.stack([image.tensor for image in images]).float()
        with torch.inference_mode():
            probabilities = self.bundle.model(batch).float().cpu()
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
