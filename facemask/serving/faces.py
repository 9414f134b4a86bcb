"""The face stage of the service: building it from a model's settings, and its JSON form."""

from __future__ import annotations

import logging
import threading
from typing import Any

from facemask.faces.pipeline import FaceResult
from facemask.faces.stage import FaceStage, FaceStageSettings
from facemask.serving.model_store import FACE_STAGE_KEY, ModelLoadError, one_line

log = logging.getLogger(__name__)

# Decimals of the box coordinates in responses, in pixels of the uploaded image.
BOX_DECIMALS = 1

# Face stages built in this process, by settings, kept until exit. A dropped stage can hang the
# process: when the garbage collector frees a MediaPipe detector in the same pass as its
# dispatcher's worker thread (mediapipe 1.2.3), the detector's `__del__` waits forever for that
# thread. A dropped FastAPI app is such cyclic garbage, and tests create many apps.
_stages: dict[FaceStageSettings, FaceStage] = {}
_stages_lock = threading.Lock()


def build_face_stage(settings: FaceStageSettings | None) -> FaceStage:
    """Return the face stage with a model's settings, or with the defaults when it has none.

    Stages are shared within the process: the same settings return the same stage, whose
    detector is safe to call from several threads.

    Raises:
        ModelLoadError: The detector is unknown, or its model file is missing or fails to load.
    """
    if settings is None:
        settings = FaceStageSettings()
        log.info(
            "The model has no %s metadata (it was trained on whole images, or before the face "
            "stage existed), so the face stage runs with the default settings %s",
            FACE_STAGE_KEY,
            settings.to_dict(),
        )
    with _stages_lock:
        stage = _stages.get(settings)
        if stage is not None:
            return stage
        try:
            stage = FaceStage(settings)
        except (ImportError, OSError, ValueError, RuntimeError) as exc:
            # OSError includes FaceModelMissingError. MediaPipe raises RuntimeError on a bad
            # file, and ImportError means that mediapipe is not installed.
            raise ModelLoadError(
                f"Cannot load the face detector {settings.detector!r}: {one_line(exc)}. Or set "
                "faces=false to classify whole images without the face stage"
            ) from exc
        _stages[settings] = stage
        return stage


def describe_face_stage(
    stage: FaceStage | None, settings: FaceStageSettings | None
) -> dict[str, Any]:
    """Return the `face_stage` entry of `GET /info`.

    Args:
        stage: The face stage that requests use, or None when `faces: false` turned it off.
        settings: The settings stored with the model, or None when it has none.
    """
    effective = stage.settings if stage is not None else settings or FaceStageSettings()
    return {
        "enabled": stage is not None,
        "detector": stage.detector.name if stage is not None else effective.detector,
        "settings": effective.to_dict(),
        "settings_source": "model metadata" if settings is not None else "defaults",
    }


def face_json(face: FaceResult) -> dict[str, Any]:
    """Return one entry of the response's `faces` list."""
    return {
        "box": [round(value, BOX_DECIMALS) for value in face.box],
        "score": round(face.score, 4),
        "probabilities": dict(face.probabilities),
        "label": face.label,
    }
