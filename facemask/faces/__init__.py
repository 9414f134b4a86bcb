"""Face detection and cropping, shared by training and serving."""

from facemask.faces.detector import (
    BlazeFaceDetector,
    FaceBox,
    FaceDetector,
    FaceModelMissingError,
    build_detector,
)
from facemask.faces.stage import FaceRegion, FaceSearch, FaceStage, FaceStageSettings

__all__ = [
    "BlazeFaceDetector",
    "FaceBox",
    "FaceDetector",
    "FaceModelMissingError",
    "FaceRegion",
    "FaceSearch",
    "FaceStage",
    "FaceStageSettings",
    "build_detector",
]
