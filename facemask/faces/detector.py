"""Face detectors behind one small interface, and the BlazeFace detector that ships by default.

A detector maps an RGB picture to face boxes in that picture's pixels. `FaceStage`
(`facemask.faces.stage`) adds what training and serving share on top: the grey-border retry,
tiling for small faces in wide frames, the crop margin and the whole-image fallback.

The default detector is MediaPipe's short-range BlazeFace model (Apache-2.0, 230 KB) run by
MediaPipe's Tasks API. The model file is not part of the `mediapipe` wheel any more, so `facemask
fetch-face-model` (run by `make setup`) takes it from the `mediapipe==0.10.21` wheel on PyPI,
checks its SHA-256 and stores it next to this module. Nothing is fetched at run time.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

# The model file, its SHA-256, and the wheel it comes from.
BLAZEFACE_FILE = "face_detection_short_range.tflite"
BLAZEFACE_SHA256 = "bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8"
BLAZEFACE_WHEEL = "mediapipe==0.10.21"
BLAZEFACE_MEMBER = f"mediapipe/modules/face_detection/{BLAZEFACE_FILE}"
MODELS_DIR = Path(__file__).resolve().parent / "models"


class FaceModelMissingError(FileNotFoundError):
    """The face detector's model file is not installed."""


@dataclass(frozen=True)
class FaceBox:
    """A detected face in the pixels of the picture it was found in.

    Attributes:
        x0: Left edge, inclusive.
        y0: Top edge, inclusive.
        x1: Right edge, exclusive.
        y1: Bottom edge, exclusive.
        score: The detector's confidence, from 0 to 1.
    """

    x0: float
    y0: float
    x1: float
    y1: float
    score: float

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def area(self) -> float:
        return max(0.0, self.width) * max(0.0, self.height)

    def shifted(self, dx: float, dy: float) -> FaceBox:
        """Return the box moved by (dx, dy)."""
        return FaceBox(self.x0 + dx, self.y0 + dy, self.x1 + dx, self.y1 + dy, self.score)

    def scaled(self, factor: float) -> FaceBox:
        """Return the box with every coordinate multiplied by `factor`."""
        return FaceBox(
            self.x0 * factor, self.y0 * factor, self.x1 * factor, self.y1 * factor, self.score
        )

    def clipped(self, width: int, height: int) -> FaceBox:
        """Return the box clipped to a `width` x `height` picture."""
        return FaceBox(
            min(max(self.x0, 0.0), width),
            min(max(self.y0, 0.0), height),
            min(max(self.x1, 0.0), width),
            min(max(self.y1, 0.0), height),
            self.score,
        )


class FaceDetector(Protocol):
    """Anything that finds faces in an RGB picture.

    `detect` takes HWC uint8 RGB pixels and returns the faces it finds with a score of at least
    `min_score`, in the picture's pixel coordinates, in any order. It must be safe to call from
    several threads.
    """

    name: str

    def detect(self, rgb: np.ndarray) -> list[FaceBox]: ...


def blazeface_model_path() -> Path:
    """Return the installed BlazeFace model file.

    Raises:
        FaceModelMissingError: The file is missing or its SHA-256 is wrong.
    """
    path = MODELS_DIR / BLAZEFACE_FILE
    if not path.is_file():
        raise FaceModelMissingError(
            f"the face detector model {path} is missing. Run `facemask fetch-face-model` "
            f"(part of `make setup`); it takes the file from the {BLAZEFACE_WHEEL} wheel."
        )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != BLAZEFACE_SHA256:
        raise FaceModelMissingError(
            f"{path} has SHA-256 {digest}, expected {BLAZEFACE_SHA256}. Delete it and run "
            "`facemask fetch-face-model` again."
        )
    return path


class BlazeFaceDetector:
    """MediaPipe's short-range BlazeFace, for faces that fill at least about a tenth of the frame.

    The model runs on the picture resized to 128x128, so small faces in a wide frame need the
    tiling of `FaceStage`. Each thread gets its own MediaPipe detector, because one detector
    serves one call at a time.

    Args:
        min_score: Lowest confidence of a returned face.
        model_path: The `.tflite` file; None uses the installed BlazeFace model.
    """

    name = "blazeface_short_range"

    def __init__(self, min_score: float = 0.5, model_path: str | Path | None = None):
        if not 0.0 < min_score < 1.0:
            raise ValueError(f"min_score must be between 0 and 1, got {min_score}")
        self.min_score = min_score
        self.model_path = Path(model_path) if model_path else blazeface_model_path()
        self._model = self.model_path.read_bytes()
        self._local = threading.local()
        # Fails here, not at the first request, when MediaPipe cannot load the model.
        self._detector()
        _ignore_profiler_signal()

    def _detector(self):
        detector = getattr(self._local, "detector", None)
        if detector is None:
            # MediaPipe's native code logs every model load at INFO level to stderr.
            os.environ.setdefault("GLOG_minloglevel", "2")
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            from mediapipe.tasks.python import BaseOptions, vision

            options = vision.FaceDetectorOptions(
                base_options=BaseOptions(model_asset_buffer=self._model),
                min_detection_confidence=self.min_score,
            )
            detector = vision.FaceDetector.create_from_options(options)
            self._local.detector = detector
            _OPEN_DETECTORS.append(detector)
        return detector

    def detect(self, rgb: np.ndarray) -> list[FaceBox]:
        import mediapipe as mp

        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected HWC uint8 RGB pixels, got {rgb.dtype} {rgb.shape}")
        image = mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(rgb))
        result = self._detector().detect(image)
        boxes = []
        for detection in result.detections:
            box = detection.bounding_box
            score = detection.categories[0].score if detection.categories else 0.0
            if score is None or score < self.min_score:
                continue
            boxes.append(
                FaceBox(
                    float(box.origin_x),
                    float(box.origin_y),
                    float(box.origin_x + box.width),
                    float(box.origin_y + box.height),
                    float(score),
                )
            )
        return boxes


def _ignore_profiler_signal() -> None:
    """Ignore SIGPROF, whose default action ends the process.

    The profiler compiled into MediaPipe's native library arms a SIGPROF timer for each of its
    threads. A SIGPROF that arrives when no handler is installed (seen after a detector was
    closed while training went on in the same process) kills the process with "Profiling timer
    expired". Nothing in this project profiles with SIGPROF; py-spy samples from outside.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGPROF, signal.SIG_IGN)


# Every MediaPipe detector this process opened. They stay referenced until the exit hook closes
# them: MediaPipe's finaliser fails once modules are torn down, and a detector freed by the
# cycle collector can wait forever on a worker thread the same collection already stopped.
_OPEN_DETECTORS: list = []


@atexit.register
def _close_detectors() -> None:
    for detector in list(_OPEN_DETECTORS):
        # The process is exiting; a detector that fails to close loses nothing.
        with contextlib.suppress(Exception):
            detector.close()


DETECTORS = {BlazeFaceDetector.name: BlazeFaceDetector}


_BUILT: dict[tuple[str, float, str], FaceDetector] = {}
_BUILT_LOCK = threading.Lock()


def build_detector(name: str, min_score: float) -> FaceDetector:
    """Return the registered detector `name`, built once per process and settings.

    Detectors are shared because they are never freed before the process exits (see
    `_OPEN_DETECTORS`), and each one contains its model and threads.
    """
    if name not in DETECTORS:
        raise ValueError(f"unknown face detector {name!r}; known: {sorted(DETECTORS)}")
    # The models folder is part of the key, so a process that points it elsewhere loads anew.
    key = (name, min_score, str(MODELS_DIR))
    with _BUILT_LOCK:
        detector = _BUILT.get(key)
        if detector is None:
            detector = _BUILT[key] = DETECTORS[name](min_score=min_score)
        return detector
