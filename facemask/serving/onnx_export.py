"""Convert a logged PyTorch classifier to ONNX and check it against PyTorch on real photos.

The conversion uses torch's `torch.export`-based exporter (`torch.onnx.export(dynamo=True)`,
which needs onnxscript) with a dynamic batch dimension, so the service can run micro-batches of
any size. The check decodes and preprocesses real images the way the service does, runs them
through both models at batch size 1 and at the full count, and rejects the export when any
probability differs by `TOLERANCE` or more.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version as package_version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from facemask.data.images import SUPPORTED_FORMATS, InvalidImageError, decode_image
from facemask.faces.stage import FaceStageSettings
from facemask.serving.model_store import FACE_STAGE_KEY
from facemask.serving.preprocessing import EvalPreprocessing
from facemask.serving.runtimes import OnnxModel
from facemask.serving.served_model import ONNX_FILE, ONNX_INFO_FILE

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Largest accepted difference between an ONNX and a PyTorch probability of the same image.
TOLERANCE = 1e-4
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


class OnnxExportError(RuntimeError):
    """The model could not be converted, or the ONNX model disagrees with PyTorch."""


@dataclass(frozen=True)
class ParityCheck:
    """Result of comparing ONNX Runtime with PyTorch on the same preprocessed photos.

    Attributes:
        images: Number of photos compared.
        max_abs_diff: Largest absolute difference of any class probability.
        tolerance: The limit the difference had to stay under.
    """

    images: int
    max_abs_diff: float
    tolerance: float = TOLERANCE


def find_images(folder: Path, limit: int) -> list[Path]:
    """Return up to `limit` image files under `folder`, spread evenly over its sorted files.

    Every class folder of a data set is sampled, because the files are taken at a fixed stride
    across the whole sorted list rather than from its start.
    """
    if not folder.is_dir():
        raise OnnxExportError(f"the image folder {folder} does not exist")
    files = sorted(
        path
        for path in folder.rglob("*")
        if path.is_file() and path.suffix.lower() in _IMAGE_SUFFIXES
    )
    if not files:
        raise OnnxExportError(
            f"no image files ({', '.join(SUPPORTED_FORMATS)}) found under {folder}"
        )
    step = max(1, len(files) // limit)
    return files[::step][:limit]


def convert(module: torch.nn.Module, image_size: int, path: Path) -> None:
    """Write `module` as an ONNX file with input `images` (N, 3, size, size) and a dynamic N."""
    import torch

    example = torch.zeros(2, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1, max=1024)
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()) as progress,
        _quiet_loggers("onnxscript", "onnx_ir"),
    ):
        # A module loaded from a `pt2` file rejects train()/eval() and keeps the eval mode it
        # was exported in, but the exporter still warns that it is in training mode.
        warnings.filterwarnings("ignore", message="Exporting a model while it is in training")
        try:
            program = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},),
                external_data=False,
            )
        except Exception as exc:  # The exporter raises many error types from torch.export.
            raise OnnxExportError(f"torch.onnx.export failed: {exc}") from exc
    log.debug("torch.onnx.export output:\n%s", progress.getvalue())
    if program is None:
        raise OnnxExportError("torch.onnx.export returned no ONNX program")
    program.save(str(path), external_data=False)


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """Raise the given loggers to WARNING while the block runs, because INFO lists every pass."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def check_parity(
    module: torch.nn.Module,
    onnx_path: Path,
    preprocessing: EvalPreprocessing,
    image_files: Sequence[Path],
) -> ParityCheck:
    """Compare the probabilities of `module` and the ONNX model on real image files.

    Raises:
        OnnxExportError: No file decodes, or a probability differs by `TOLERANCE` or more.
    """
    import torch

    arrays = []
    for path in image_files:
        try:
            decoded = decode_image(path, draft_size=preprocessing.draft_size)
        except InvalidImageError as exc:
            log.warning("Skipping %s in the ONNX check: %s", path, exc)
            continue
        arrays.append(preprocessing.apply(decoded.image))
    if not arrays:
        raise OnnxExportError("none of the check images could be decoded")
    batch = np.stack(arrays)
    session = OnnxModel(onnx_path, threads=len(os.sched_getaffinity(0)))
    with torch.inference_mode():
        expected = module(torch.from_numpy(batch)).float().numpy()
    # The full batch and a batch of one exercise the dynamic batch dimension.
    differences = [
        np.abs(session(batch) - expected).max(),
        np.abs(session(batch[:1]) - expected[:1]).max(),
    ]
    max_abs_diff = float(max(differences))
    check = ParityCheck(images=len(arrays), max_abs_diff=max_abs_diff)
    if not max_abs_diff < TOLERANCE:
        raise OnnxExportError(
            f"ONNX Runtime and PyTorch probabilities differ by up to {max_abs_diff:.3g} on "
            f"{len(arrays)} images, over the tolerance of {TOLERANCE:g}"
        )
    return check


def mlmodel_face_stage(folder: Path) -> FaceStageSettings | None:
    """Return the `face_stage` metadata of the MLflow model in `folder`, if it has any.

    Raises:
        OnnxExportError: The metadata is not a valid set of face stage settings.
    """
    import yaml

    mlmodel = folder / "MLmodel"
    if not mlmodel.is_file():
        return None
    metadata = (yaml.safe_load(mlmodel.read_text()) or {}).get("metadata") or {}
    return _face_stage_settings(metadata.get(FACE_STAGE_KEY))


def _face_stage_settings(value: Any) -> FaceStageSettings | None:
    if value is None or isinstance(value, FaceStageSettings):
        return value
    if not isinstance(value, Mapping):
        raise OnnxExportError(f"the {FACE_STAGE_KEY} metadata is not a mapping: {value!r}")
    try:
        return FaceStageSettings.from_dict(value)
    except (TypeError, ValueError) as exc:
        raise OnnxExportError(f"invalid {FACE_STAGE_KEY} metadata: {exc}") from exc


def write_onnx_export(
    module: torch.nn.Module,
    class_names: Sequence[str],
    preprocessing: EvalPreprocessing,
    image_files: Sequence[Path],
    folder: Path,
    source: dict[str, Any],
    face_stage: FaceStageSettings | Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `model.onnx` and `facemask_onnx.json` into `folder` after the parity check.

    Args:
        module: The PyTorch model: normalised NCHW float32 images to class probabilities.
        class_names: Class names in output order.
        preprocessing: The evaluation preprocessing stored with the model.
        image_files: Real photos for the parity check.
        folder: An existing folder; both files are replaced if present.
        source: Registry and run details (name, version, run_id, URIs) stored in the JSON file.
        face_stage: The face stage settings stored with the model. None copies the
            `face_stage` metadata of the MLflow model in `folder`, when it has one.

    Returns:
        The contents of `facemask_onnx.json`. It has a `face_stage` key only when the model has
        face stage settings.

    Raises:
        OnnxExportError: The conversion failed, the ONNX model disagrees with PyTorch, or the
            face stage settings are invalid.
    """
    settings = _face_stage_settings(face_stage)
    if settings is None:
        settings = mlmodel_face_stage(folder)
    onnx_path = folder / ONNX_FILE
    convert(module, preprocessing.image_size, onnx_path)
    try:
        check = check_parity(module, onnx_path, preprocessing, image_files)
    except OnnxExportError:
        onnx_path.unlink(missing_ok=True)
        raise
    info = {
        **source,
        "class_names": list(class_names),
        "preprocessing": preprocessing.to_dict(),
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "check": {
            "images": check.images,
            "max_abs_diff": check.max_abs_diff,
            "tolerance": check.tolerance,
        },
        "versions": {
            name: package_version(name) for name in ("torch", "onnx", "onnxscript", "onnxruntime")
        },
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if settings is not None:
        info[FACE_STAGE_KEY] = settings.to_dict()
    (folder / ONNX_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    log.info(
        "Converted the model to ONNX: ONNX Runtime matches PyTorch on %d images (max "
        "probability difference %.2g)",
        check.images,
        check.max_abs_diff,
    )
    return info
