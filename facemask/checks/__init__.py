"""Checks at the end of every training run: OOD validation, framing invariance and Grad-CAM.

Every check classifies pictures the way serving does (`facemask.faces.pipeline`), so its numbers
hold for the served model. `run_checks` runs the enabled checks, logs their metrics and files to
the MLflow run, and returns the metrics.
"""

from facemask.checks.framing import face_crop, zoom_out
from facemask.checks.ood import list_ood_files
from facemask.checks.pictures import PictureClassifier
from facemask.checks.runner import run_checks
from facemask.checks.settings import CheckError, CheckSettings

__all__ = [
    "CheckError",
    "CheckSettings",
    "PictureClassifier",
    "face_crop",
    "list_ood_files",
    "run_checks",
    "zoom_out",
]
