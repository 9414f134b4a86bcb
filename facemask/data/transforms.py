"""Image preprocessing for evaluation and augmentation for training, built with albumentations.

The evaluation preprocessing is described by a `Preprocessing` record that is stored with every
logged model, so that serving rebuilds exactly the transform the model was tested with.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image

from facemask.data.images import ImageSource, decode_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """Evaluation preprocessing: decode, resize to a square, normalise.

    Attributes:
        image_size: Side of the square model input in pixels.
        mean: Per-channel mean subtracted after scaling pixels to [0, 1].
        std: Per-channel standard deviation divided by after subtracting the mean.
        resize: `stretch` resizes both sides to `image_size` without keeping the aspect ratio,
            so the whole photo stays in view.
        jpeg_draft: Whether JPEG files are decoded at a reduced scale no smaller than
            `image_size` (see `facemask.data.images.decode_image`).
    """

    image_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: str = "stretch"
    jpeg_draft: bool = True

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise ValueError(f"image_size must be at least 16 pixels, got {self.image_size}")
        if self.resize != "stretch":
            raise ValueError(f"unsupported resize mode {self.resize!r}; supported: 'stretch'")

    @property
    def draft_size(self) -> int | None:
        """The `draft_size` to decode with, or None when draft decoding is off."""
        return self.image_size if self.jpeg_draft else None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable description."""
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Preprocessing:
        """Rebuild from `to_dict` output; unknown keys are an error."""
        known = {name for name in cls.__dataclass_fields__}
        unknown = set(values) - known
        if unknown:
            raise ValueError(
                f"unknown preprocessing keys {sorted(unknown)}; known: {sorted(known)}"
            )
        kwargs = dict(values)
        for key in ("mean", "std"):
            if key in kwargs:
                kwargs[key] = tuple(float(v) for v in kwargs[key])
        return cls(**kwargs)


@dataclass(frozen=True)
class Augmentation:
    """Strengths of the training augmentations.

    Attributes:
        scale_min: Smallest area fraction kept by the random resized crop (1.0 disables it).
        hflip: Probability of a horizontal flip.
        rotate: Maximum rotation in degrees, applied with probability 0.3.
        color_jitter: Brightness, contrast and saturation change (fraction), applied with
            probability 0.5; hue changes by a tenth of it.
        strength: One factor on the crop, rotation and colour changes, for searches that tune
            all of them at once: 0 turns them off, 1 keeps the values above, 2 doubles them.
            The crop never keeps less than 8% of the area. Flips are not scaled.
    """

    scale_min: float = 0.6
    hflip: float = 0.5
    rotate: float = 15.0
    color_jitter: float = 0.2
    strength: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.strength <= 4.0:
            raise ValueError(f"augment.strength must be between 0 and 4, got {self.strength}")
        if not 0.0 < self.scale_min <= 1.0:
            raise ValueError(f"augment.scale_min must be in (0, 1], got {self.scale_min}")

    def scaled(self) -> Augmentation:
        """Return the augmentation with `strength` applied and set back to 1."""
        if self.strength == 1.0:
            return self
        return Augmentation(
            scale_min=max(0.08, 1.0 - (1.0 - self.scale_min) * self.strength),
            hflip=self.hflip,
            rotate=self.rotate * self.strength,
            color_jitter=self.color_jitter * self.strength,
        )


@dataclass(frozen=True)
class Framing:
    """Augmentations that make framing, resolution and compression useless as class evidence.

    Development photos differ by class in how they are framed (tight face crops against wider
    web photos) and in size and quality, so a model can learn those instead of masks. Each
    augmentation runs with its own probability; 0 turns it off.

    Attributes:
        zoom_out: Probability of shrinking the picture onto a larger canvas, filled with grey or
            with the picture mirrored at its edges, as a wider shot of the same scene.
        zoom_out_min: Smallest size of the shrunk picture relative to the canvas.
        low_res: Probability of downscaling and upscaling again, as from a low-resolution camera.
        low_res_min: Smallest downscale factor.
        blur: Probability of a Gaussian blur with a kernel of 3 to 7 pixels.
        jpeg: Probability of JPEG compression at quality 30 to 90.
    """

    zoom_out: float = 0.0
    zoom_out_min: float = 0.5
    low_res: float = 0.0
    low_res_min: float = 0.2
    blur: float = 0.0
    jpeg: float = 0.0

    def __post_init__(self) -> None:
        for name in ("zoom_out", "low_res", "blur", "jpeg"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"framing.{name} is a probability, got {value}")
        if not 0.1 <= self.zoom_out_min <= 1.0:
            raise ValueError(f"framing.zoom_out_min must be in [0.1, 1], got {self.zoom_out_min}")
        if not 0.05 <= self.low_res_min < 1.0:
            raise ValueError(f"framing.low_res_min must be in [0.05, 1), got {self.low_res_min}")

    def steps(self) -> list[A.BasicTransform]:
        """Return the albumentations steps, to run on the model-sized picture."""
        steps: list[A.BasicTransform] = []
        if self.zoom_out > 0:
            scale = (self.zoom_out_min, 1.0)
            steps.append(
                A.OneOf(
                    [
                        A.Affine(scale=scale, border_mode=cv2.BORDER_CONSTANT, fill=114, p=1.0),
                        A.Affine(scale=scale, border_mode=cv2.BORDER_REFLECT_101, p=1.0),
                    ],
                    p=self.zoom_out,
                )
            )
        if self.low_res > 0:
            steps.append(A.Downscale(scale_range=(self.low_res_min, 0.9), p=self.low_res))
        if self.blur > 0:
            steps.append(A.GaussianBlur(blur_limit=(3, 7), p=self.blur))
        if self.jpeg > 0:
            steps.append(A.ImageCompression(quality_range=(30, 90), p=self.jpeg))
        return steps


def _normalise_and_tensor(pre: Preprocessing) -> list[A.BasicTransform]:
    return [A.Normalize(mean=pre.mean, std=pre.std, max_pixel_value=255.0), ToTensorV2()]


def build_eval_resize(pre: Preprocessing) -> A.Resize:
    """Build the first step of the evaluation transform, which stretches to a uint8 square."""
    return A.Resize(pre.image_size, pre.image_size, area_for_downscale="image")


def build_eval_transform(pre: Preprocessing) -> A.Compose:
    """Build the evaluation transform: resize to a square, normalise, HWC uint8 to CHW float."""
    return A.Compose([build_eval_resize(pre), *_normalise_and_tensor(pre)])


def build_train_transform(
    pre: Preprocessing, aug: Augmentation, framing: Framing | None = None
) -> A.Compose:
    """Build the training transform: random crop, framing changes, flip, rotation and colour."""
    size = pre.image_size
    aug = aug.scaled()
    steps: list[A.BasicTransform] = []
    if aug.scale_min < 1.0:
        steps.append(
            A.RandomResizedCrop(
                size=(size, size), scale=(aug.scale_min, 1.0), area_for_downscale="image"
            )
        )
    else:
        steps.append(A.Resize(size, size, area_for_downscale="image"))
    if framing is not None:
        steps.extend(framing.steps())
    if aug.hflip > 0:
        steps.append(A.HorizontalFlip(p=aug.hflip))
    if aug.rotate > 0:
        steps.append(
            A.Affine(rotate=(-aug.rotate, aug.rotate), border_mode=cv2.BORDER_REPLICATE, p=0.3)
        )
    if aug.color_jitter > 0:
        jitter = aug.color_jitter
        steps.append(
            A.ColorJitter(
                brightness=jitter, contrast=jitter, saturation=jitter, hue=jitter / 10, p=0.5
            )
        )
    return A.Compose([*steps, *_normalise_and_tensor(pre)])


def image_to_tensor(image: Image.Image, transform: A.Compose) -> torch.Tensor:
    """Apply an albumentations transform to an RGB picture and return a CHW float tensor."""
    return transform(image=np.asarray(image))["image"]


def preprocess_file(source: ImageSource, pre: Preprocessing) -> torch.Tensor:
    """Decode one image file and apply the evaluation preprocessing; returns a CHW tensor."""
    image = decode_image(source, draft_size=pre.draft_size).image
    return image_to_tensor(image, build_eval_transform(pre))
