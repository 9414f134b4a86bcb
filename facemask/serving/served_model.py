"""Load the model that the service runs, with ONNX Runtime when an ONNX export exists.

`facemask export --format onnx` writes `model.onnx` and `facemask_onnx.json` (class names,
preprocessing, face stage settings, the parity check against PyTorch) into the export folder,
logs the same two files under `onnx/` in the registered version's run, and tags the version
with their URI (`facemask.onnx_artifact_uri`). With `runtime=auto` the service runs that ONNX
model and does not import torch; without an export it loads the logged PyTorch model.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facemask.faces.stage import FaceStage, FaceStageSettings
from facemask.serving import model_store
from facemask.serving.faces import build_face_stage
from facemask.serving.model_store import ModelBundle, ModelLoadError, one_line
from facemask.serving.preprocessing import EvalPreprocessing
from facemask.serving.runtimes import (
    RUNTIMES,
    InferenceRuntime,
    OnnxModel,
    TorchModel,
    describe,
    release_free_memory,
)

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
ONNX_INFO_FILE = "facemask_onnx.json"
# Artifact folder of the ONNX files in the registered version's run.
ONNX_ARTIFACT_PATH = "onnx"
# Model version tag whose value is the `runs:/RUN_ID/onnx` URI of the version's ONNX files.
ONNX_VERSION_TAG = "facemask.onnx_artifact_uri"

_EXPORT_HINT = "write one with `facemask export models:/NAME@ALIAS --format onnx --out DIR`"


@dataclass
class ServedModel:
    """A model ready to serve, with what the service reports about it.

    Attributes:
        model: The runtime that maps a float32 NCHW batch to class probabilities.
        class_names: Class names in output order.
        preprocessing: The evaluation preprocessing stored with the model.
        name: Registered model name, or None for a model that is not in the registry.
        version: Registered version, or None for a model that is not in the registry.
        alias: The alias the URI named, if any.
        run_id: The MLflow run that logged the model, if known.
        uri: The model URI as requested.
        runtime: The runtime in words, such as `onnx` or `torch (float32)`.
        test_metrics: The run's `test/*` metrics.
        face_settings: The face stage settings stored with the model, or None when its
            metadata has none.
        face_stage: The loaded face stage, or None when it has not been built.
    """

    model: InferenceRuntime
    class_names: list[str]
    preprocessing: EvalPreprocessing
    name: str | None
    version: str | None
    alias: str | None
    run_id: str | None
    uri: str
    runtime: str
    test_metrics: dict[str, float] = field(default_factory=dict)
    face_settings: FaceStageSettings | None = None
    face_stage: FaceStage | None = None


def load_served_model(
    uri: str,
    tracking_uri: str,
    runtime: str = "auto",
    threads: int = 1,
    torch_dtype: str = "float32",
    faces: bool = True,
) -> ServedModel:
    """Load the model at `uri` with the chosen runtime and check it on a zero batch.

    Args:
        uri: A registered model URI (`models:/NAME@ALIAS`, `models:/NAME/VERSION`), any other
            MLflow model URI, or a local folder written by `facemask export`.
        tracking_uri: The MLflow tracking URI; a local folder is loaded without it.
        runtime: `onnx`, `torch`, or `auto` (ONNX when the model has an ONNX export).
        threads: Intra-op threads of the runtime.
        torch_dtype: `float32` or `bfloat16`, for the torch runtime.
        faces: Also load the face detector of the model's face stage settings.

    Raises:
        ModelLoadError: The model or the face detector cannot be found or loaded, or
            `runtime=onnx` was requested for a model without an ONNX export. The message is
            one line that ends with the fix.
    """
    if runtime not in RUNTIMES:
        raise ModelLoadError(f"runtime={runtime!r} is invalid; use one of {RUNTIMES}")
    folder = model_store.local_model_dir(uri)
    served = None
    if runtime != "torch" and folder is not None:
        served = _onnx_from_folder(uri, folder, runtime, threads)
    elif runtime != "torch":
        served = _onnx_from_registry(uri, tracking_uri, runtime, threads)
    if served is None:
        served = _from_torch(uri, tracking_uri, threads, torch_dtype)
    if faces:
        served.face_stage = build_face_stage(served.face_settings)
    release_free_memory()
    _log_loaded(served)
    return served


def _from_torch(uri: str, tracking_uri: str, threads: int, torch_dtype: str) -> ServedModel:
    import torch

    torch.set_num_threads(threads)
    served = served_from_bundle(model_store.load_model_bundle(uri, tracking_uri), torch_dtype)
    if torch_dtype != "float32":
        # The bfloat16 path runs other kernels; run it once before the first request.
        check_output_shape(served)
    return served


def served_from_bundle(bundle: ModelBundle, torch_dtype: str = "float32") -> ServedModel:
    """Wrap a PyTorch `ModelBundle` from `load_model_bundle` for serving with torch."""
    model = TorchModel(bundle.model, torch_dtype)
    return ServedModel(
        model=model,
        class_names=bundle.class_names,
        preprocessing=EvalPreprocessing.from_dict(bundle.preprocessing.to_dict()),
        name=bundle.name,
        version=bundle.version,
        alias=bundle.alias,
        run_id=bundle.run_id,
        uri=bundle.uri,
        test_metrics=bundle.test_metrics,
        runtime=describe(model),
        face_settings=bundle.face_stage,
    )


def _onnx_from_folder(uri: str, folder: Path, runtime: str, threads: int) -> ServedModel | None:
    if not (folder / ONNX_FILE).is_file():
        if runtime == "onnx":
            raise ModelLoadError(
                f"Cannot load the model folder {str(folder)!r} with runtime=onnx: it has no "
                f"{ONNX_FILE}; {_EXPORT_HINT}, or serve it with runtime=torch"
            )
        return None
    export_file = folder / model_store.EXPORT_INFO_FILE
    try:
        exported = json.loads(export_file.read_text()) if export_file.is_file() else {}
        return _load_onnx(folder, uri, threads, registry=exported)
    except (ModelLoadError, OSError, ValueError) as exc:
        raise ModelLoadError(
            f"Cannot load the ONNX model in {str(folder)!r}: {one_line(exc)}; {_EXPORT_HINT}, "
            "or serve the PyTorch model with runtime=torch"
        ) from exc


def _onnx_from_registry(
    uri: str, tracking_uri: str, runtime: str, threads: int
) -> ServedModel | None:
    """Load the ONNX export of a registered version; None when it has none and runtime=auto."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    where = f"model {uri!r} from MLflow tracking URI {model_store.redact_uri(tracking_uri)!r}"
    try:
        model_store.check_sqlite_store(tracking_uri)
        client = MlflowClient(tracking_uri)
        version = model_store.registered_version(client, uri)
    except (ModelLoadError, MlflowException, OSError) as exc:
        if runtime == "onnx":
            raise ModelLoadError(f"Cannot load {where}: {one_line(exc)}") from exc
        # The torch path reports the same failure with its full advice.
        return None
    artifact_uri = None if version is None else version.tags.get(ONNX_VERSION_TAG)
    if artifact_uri is None:
        if runtime == "onnx":
            raise ModelLoadError(
                f"Cannot load {where} with runtime=onnx: the version has no ONNX export "
                f"(no {ONNX_VERSION_TAG} tag); {_EXPORT_HINT}, or use runtime=torch"
            )
        return None
    registry = {
        "name": version.name,
        "version": str(version.version),
        "alias": model_store.registered_alias(uri),
    }
    scratch = Path(tempfile.mkdtemp(prefix="facemask-onnx-"))
    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=artifact_uri, dst_path=str(scratch), tracking_uri=tracking_uri
        )
        served = _load_onnx(Path(local), uri, threads, registry=registry)
    except (ModelLoadError, MlflowException, OSError, ValueError) as exc:
        raise ModelLoadError(
            f"Cannot load the ONNX export {artifact_uri} of {where}: {one_line(exc)}; export it "
            "again, or serve the PyTorch model with runtime=torch"
        ) from exc
    finally:
        # The session keeps its own copy of the model in memory, so the download is deleted.
        shutil.rmtree(scratch, ignore_errors=True)
    served.test_metrics = model_store.run_test_metrics(client, served.run_id)
    return served


def _load_onnx(folder: Path, uri: str, threads: int, registry: dict[str, Any]) -> ServedModel:
    info_file = folder / ONNX_INFO_FILE
    if not info_file.is_file():
        raise ModelLoadError(f"{info_file.name} is missing next to {ONNX_FILE}")
    info = json.loads(info_file.read_text())
    if "class_names" not in info or "preprocessing" not in info:
        raise ModelLoadError(f"{info_file.name} has no class_names or preprocessing")
    class_names = model_store.check_class_names(info["class_names"])
    try:
        preprocessing = EvalPreprocessing.from_dict(info["preprocessing"])
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"invalid preprocessing in {info_file.name}: {exc}") from exc
    face_settings = model_store.face_stage_from_metadata(info)
    try:
        model = OnnxModel(folder / ONNX_FILE, threads)
    except Exception as exc:  # onnxruntime raises its own exception types on a bad file.
        raise ModelLoadError(f"ONNX Runtime cannot load {ONNX_FILE}: {one_line(exc)}") from exc
    served = ServedModel(
        model=model,
        class_names=class_names,
        preprocessing=preprocessing,
        name=registry.get("name"),
        version=registry.get("version"),
        alias=registry.get("alias"),
        run_id=info.get("run_id"),
        uri=uri,
        test_metrics={str(k): float(v) for k, v in registry.get("test_metrics", {}).items()},
        runtime=describe(model),
        face_settings=face_settings,
    )
    check_output_shape(served)
    return served


def check_output_shape(served: ServedModel) -> None:
    """Run a zero batch of 2 images and check that the output is (2, classes)."""
    size = served.preprocessing.image_size
    try:
        output = served.model(np.zeros((2, 3, size, size), dtype=np.float32))
    except Exception as exc:  # Runtimes raise their own exception types on a bad graph.
        raise ModelLoadError(f"the model failed on a zero batch: {one_line(exc)}") from exc
    expected = (2, len(served.class_names))
    if tuple(output.shape) != expected:
        raise ModelLoadError(
            f"the model returned shape {tuple(output.shape)} for 2 images, expected {expected}"
        )


def _log_loaded(served: ServedModel) -> None:
    log.info(
        "Serving model %s (name %s, version %s, run %s, classes %s, input %d px) with runtime %s "
        "and face detector %s",
        served.uri,
        served.name,
        served.version,
        served.run_id,
        served.class_names,
        served.preprocessing.image_size,
        served.runtime,
        "none" if served.face_stage is None else served.face_stage.detector.name,
    )
