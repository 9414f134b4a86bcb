"""Settings of the checks that run at the end of every training run."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any


class CheckError(ValueError):
    """A check cannot run with the given data or settings, such as a missing OOD class folder."""


@dataclass(frozen=True)
class CheckSettings:
    """Switches and parameters of the end-of-training checks.

    Attributes:
        ood: Classify the pictures of the OOD folder (`data.ood_root`) when it is set.
        framing: Classify the test pictures as they are, cut to their face and zoomed out.
        gradcam: Draw Grad-CAM maps for a sample of test pictures and measure how much of the
            positive attribution falls on the face.
        zoom_out_scale: Canvas size of the zoomed-out framing relative to the picture, per side.
        cam_per_class: Test pictures per class in the Grad-CAM sample.
        cam_seed: Seed of the Grad-CAM sample; a fixed seed keeps the sample the same across
            runs on the same test split.
        batch_size: Pictures decoded and searched before each model call, and the most crops
            in one model call.
    """

    ood: bool = True
    framing: bool = True
    gradcam: bool = True
    zoom_out_scale: float = 2.0
    cam_per_class: int = 6
    cam_seed: int = 0
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.zoom_out_scale < 1.0:
            raise CheckError(f"checks.zoom_out_scale must be at least 1, got {self.zoom_out_scale}")
        if self.cam_per_class < 0:
            raise CheckError(f"checks.cam_per_class must be 0 or more, got {self.cam_per_class}")
        if self.batch_size < 1:
            raise CheckError(f"checks.batch_size must be at least 1, got {self.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> CheckSettings:
        """Build from a mapping such as `OmegaConf.to_container(cfg.checks)`.

        Raises:
            CheckError: A key is unknown or a value is invalid.
        """
        known = set(cls.__dataclass_fields__)
        unknown = set(values) - known
        if unknown:
            raise CheckError(f"unknown checks keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**dict(values))
