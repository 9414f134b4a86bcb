"""The entry point that training calls after its test step: run the checks and log them."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import torch

from facemask.checks.framing import run_framing_check
from facemask.checks.gradcam import run_gradcam_check
from facemask.checks.ood import run_ood_check
from facemask.checks.pictures import PictureClassifier
from facemask.checks.settings import CheckSettings
from facemask.data.transforms import Preprocessing
from facemask.faces.stage import FaceStageSettings

log = logging.getLogger(__name__)

# Local folder, under the run's output folder, of the files that the checks write.
CHECKS_DIR = "checks"


def run_checks(
    *,
    client: mlflow.MlflowClient,
    run_id: str,
    model: torch.nn.Module,
    class_names: list[str],
    preprocessing: Preprocessing,
    face_stage: FaceStageSettings | None,
    test_paths: Sequence[Path],
    test_labels: Sequence[int],
    ood_root: Path | str | None,
    output_dir: Path,
    settings: CheckSettings | Mapping[str, Any],
) -> dict[str, float]:
    """Run the enabled checks and log their metrics and files to MLflow run `run_id`.

    Files go to `output_dir/checks/{ood,framing,gradcam}` and to the artifact folders of the
    same names. A file that fails to decode is counted and skipped.

    Args:
        model: Maps normalised NCHW float32 to class probabilities; must be in eval mode.
        face_stage: The model's face stage settings; None for a model of whole pictures.
        test_paths: The test split's pictures.
        test_labels: Class index of each test picture.
        ood_root: Folder with one sub-folder per class; None skips the OOD check.
        settings: `CheckSettings`, or a mapping of its fields such as
            `OmegaConf.to_container(cfg.checks)`.

    Returns:
        The logged metrics, named `ood/...`, `framing/...` and `cam/...`.

    Raises:
        CheckError: The OOD folder does not match the model's classes, or a setting is invalid.
        ValueError: The model is in training mode, or the test paths and labels differ in number.
    """
    if not isinstance(settings, CheckSettings):
        settings = CheckSettings.from_dict(settings)
    if len(test_paths) != len(test_labels):
        raise ValueError(
            f"got {len(test_paths)} test paths but {len(test_labels)} test labels; "
            "pass one label per path"
        )
    folder = Path(output_dir) / CHECKS_DIR
    classifier = PictureClassifier(
        model, class_names, preprocessing, face_stage, batch_size=settings.batch_size
    )
    metrics: dict[str, float] = {}

    if not settings.ood:
        log.info("OOD check skipped: checks.ood is false")
    elif ood_root is None:
        log.info("OOD check skipped: data.ood_root is not set")
    else:
        metrics |= _run_and_log(
            "OOD", client, run_id, "ood", run_ood_check, classifier, Path(ood_root), folder / "ood"
        )

    if settings.framing:
        metrics |= _run_and_log(
            "Framing",
            client,
            run_id,
            "framing",
            run_framing_check,
            classifier,
            test_paths,
            test_labels,
            settings.zoom_out_scale,
            folder / "framing",
        )
    else:
        log.info("Framing check skipped: checks.framing is false")

    if settings.gradcam and settings.cam_per_class > 0:
        metrics |= _run_and_log(
            "Grad-CAM",
            client,
            run_id,
            "gradcam",
            run_gradcam_check,
            classifier,
            test_paths,
            test_labels,
            settings.cam_per_class,
            settings.cam_seed,
            folder / "gradcam",
        )
    else:
        log.info("Grad-CAM check skipped: checks.gradcam is false or checks.cam_per_class is 0")
    return metrics


def _run_and_log(
    check: str,
    client: mlflow.MlflowClient,
    run_id: str,
    artifact_path: str,
    function: Callable[..., tuple[dict[str, float], list[Path]]],
    *args: Any,
) -> dict[str, float]:
    """Run one check function, log its metrics and files to the run, and return the metrics."""
    started = time.perf_counter()
    metrics, files = function(*args)
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    for path in files:
        client.log_artifact(run_id, str(path), artifact_path=artifact_path)
    log.info("%s check finished in %.1f s", check, time.perf_counter() - started)
    return metrics
