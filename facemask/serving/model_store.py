"""Load a logged classifier and its metadata from MLflow for serving."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from facemask.faces.stage import FaceStageSettings

# torch, MLflow and the albumentations behind `Preprocessing` take seconds to import, and
# serving with ONNX Runtime from a folder needs none of them, so they are imported where used.
if TYPE_CHECKING:
    import torch
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.tracking import MlflowClient

    from facemask.data.transforms import Preprocessing

log = logging.getLogger(__name__)

# Keys of the /predict response next to the class probabilities; a class may not use them.
RESERVED_RESPONSE_KEYS = frozenset(
    {
        "label",
        "model_version",
        "request_id",
        "filename",
        "error",
        "faces",
        "counts",
        "face_found",
        "face_search",
    }
)

# Metadata key of the face stage settings (`FaceStageSettings.to_dict()`), in the MLmodel file
# and in `facemask_onnx.json`. Training writes null for a model trained on whole images.
FACE_STAGE_KEY = "face_stage"

# Written by `facemask export` next to MLmodel: registry name, version, alias, test metrics.
EXPORT_INFO_FILE = "facemask_export.json"

_REGISTERED_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")


class ModelLoadError(RuntimeError):
    """The model, its registry entry or its metadata could not be loaded."""


@dataclass
class ModelBundle:
    """A loaded model with what serving needs to know about it.

    Attributes:
        model: Module mapping normalised NCHW float32 images to class probabilities.
        class_names: Class names in output order.
        preprocessing: The evaluation preprocessing stored with the model.
        name: Registered model name, or None for a model that is not in the registry.
        version: Registered version, or None for a model that is not in the registry.
        alias: The alias the URI named, if any.
        run_id: The MLflow run that logged the model, if known.
        uri: The model URI as requested.
        test_metrics: The run's `test/*` metrics.
        face_stage: The face stage settings stored with the model, or None when its metadata
            has none.
    """

    model: torch.nn.Module
    class_names: list[str]
    preprocessing: Preprocessing
    name: str | None
    version: str | None
    alias: str | None
    run_id: str | None
    uri: str
    test_metrics: dict[str, float] = field(default_factory=dict)
    face_stage: FaceStageSettings | None = None


def redact_uri(uri: str) -> str:
    """Return `uri` with any password in its user-info part replaced by `***`."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def one_line(exc: BaseException) -> str:
    """Return the exception message on one line, without a final full stop."""
    return " ".join(str(exc).split()).rstrip(".") or type(exc).__name__


def check_sqlite_store(tracking_uri: str) -> None:
    """Raise ModelLoadError when `tracking_uri` names a SQLite file that does not exist."""
    # MLflow creates a missing SQLite file, which would hide a wrong path behind "model not found".
    if not tracking_uri.startswith("sqlite:///"):
        return
    path = Path(tracking_uri.removeprefix("sqlite:///").split("?", 1)[0])
    if str(path) != ":memory:" and not path.is_file():
        raise ModelLoadError(f"the MLflow database {path} does not exist")


def registered_version(client: MlflowClient, uri: str) -> ModelVersion | None:
    """Return the model version that a `models:/NAME@ALIAS|VERSION` URI names, else None."""
    match = _REGISTERED_URI.match(uri)
    if match is None:
        return None
    if match["alias"] is not None:
        return client.get_model_version_by_alias(match["name"], match["alias"])
    return client.get_model_version(match["name"], match["version"])


def registered_alias(uri: str) -> str | None:
    """Return the alias of a `models:/NAME@ALIAS` URI, else None."""
    match = _REGISTERED_URI.match(uri)
    return None if match is None else match["alias"]


def resolve_registered(
    client: MlflowClient, uri: str
) -> tuple[str | None, str | None, str | None, str]:
    """Return (name, version, alias, version-pinned URI) for a `models:/NAME@ALIAS|VERSION` URI.

    Any other URI comes back unchanged, with None for the name, version and alias.
    """
    model_version = registered_version(client, uri)
    if model_version is None:
        return None, None, None, uri
    name, version = model_version.name, str(model_version.version)
    alias = registered_alias(uri)
    # Metadata and weights are read from the version the alias pointed at when the lookup ran.
    return name, version, alias, f"models:/{name}/{version}"


def run_test_metrics(client: MlflowClient, run_id: str | None) -> dict[str, float]:
    """Return the `test/*` metrics of run `run_id`, or {} when it is unknown or unreadable."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return {}
    try:
        metrics = client.get_run(run_id).data.metrics
    except MlflowException as exc:
        log.warning("Cannot read the metrics of run %s: %s", run_id, one_line(exc))
        return {}
    return {key: float(value) for key, value in sorted(metrics.items()) if key.startswith("test/")}


def check_class_names(names: Sequence[Any]) -> list[str]:
    """Return the class names as strings; raise ModelLoadError if one is a response key."""
    class_names = [str(name) for name in names]
    clashes = RESERVED_RESPONSE_KEYS.intersection(class_names)
    if clashes:
        raise ModelLoadError(f"class names {sorted(clashes)} clash with response keys")
    return class_names


def face_stage_from_metadata(metadata: Mapping[str, Any] | None) -> FaceStageSettings | None:
    """Return the `face_stage` settings of a model's metadata; None when absent or null.

    Raises:
        ModelLoadError: The value is not a mapping of valid `FaceStageSettings` fields.
    """
    value = (metadata or {}).get(FACE_STAGE_KEY)
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ModelLoadError(
            f"invalid {FACE_STAGE_KEY} metadata: expected a mapping, got {type(value).__name__}"
        )
    try:
        return FaceStageSettings.from_dict(value)
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"invalid {FACE_STAGE_KEY} metadata: {one_line(exc)}") from exc


def _metadata(metadata: dict[str, Any] | None) -> tuple[list[str], Preprocessing]:
    from facemask.data.transforms import Preprocessing

    metadata = metadata or {}
    if "class_names" not in metadata or "preprocessing" not in metadata:
        raise ModelLoadError(
            "the model has no class_names or preprocessing metadata, so it was not logged by "
            "facemask training"
        )
    class_names = check_class_names(metadata["class_names"])
    try:
        preprocessing = Preprocessing.from_dict(metadata["preprocessing"])
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"invalid preprocessing metadata: {exc}") from exc
    return class_names, preprocessing


def warm_up(model: torch.nn.Module, image_size: int, num_classes: int) -> None:
    """Run one forward pass on a zero batch and check the output shape."""
    import torch

    with torch.inference_mode():
        output = model(torch.zeros(2, 3, image_size, image_size))
    if tuple(output.shape) != (2, num_classes):
        raise ModelLoadError(
            f"the model returned shape {tuple(output.shape)} for 2 images, "
            f"expected (2, {num_classes})"
        )


def _set_eval_mode(model: torch.nn.Module) -> None:
    # A torch.export program rejects eval(); it keeps the mode it was exported in, and
    # training exports it in eval mode.
    with contextlib.suppress(NotImplementedError):
        model.eval()


def local_model_dir(uri: str) -> Path | None:
    """Return the folder that `uri` names when it is a local path or `file://` URI, else None."""
    parts = urlsplit(uri)
    if parts.scheme == "file":
        return Path(parts.path)
    if parts.scheme and len(parts.scheme) > 1:
        # Keep one-letter schemes out of this branch: they are Windows drive letters.
        return None
    return Path(uri).expanduser()


def load_model_bundle(uri: str, tracking_uri: str) -> ModelBundle:
    """Load the model at `uri` with its class names, preprocessing, version and test metrics.

    A local folder (a path or `file://` URI), such as one written by `facemask export`, is
    loaded without contacting `tracking_uri`. Its registry name, version and test metrics come
    from `facemask_export.json` in the folder when that file exists.

    Raises:
        ModelLoadError: The store, the registered model, the alias or version, the model files
            or their metadata are missing or invalid. The message is one line that names the
            URI, the tracking URI and how to fix it.
    """
    from mlflow.exceptions import MlflowException

    folder = local_model_dir(uri)
    if folder is not None:
        try:
            return _load_folder(uri, folder)
        except (ModelLoadError, MlflowException, OSError, ValueError) as exc:
            raise ModelLoadError(
                f"Cannot load the model folder {str(folder)!r}: {one_line(exc)}. Write one with "
                "`facemask export models:/NAME@ALIAS --out DIR`, or serve a registered model "
                "with model.alias=NAME or model.uri=models:/NAME@ALIAS"
            ) from exc
    try:
        return _load(uri, tracking_uri)
    except (ModelLoadError, MlflowException, OSError) as exc:
        raise ModelLoadError(
            f"Cannot load model {uri!r} from MLflow tracking URI {redact_uri(tracking_uri)!r}: "
            f"{one_line(exc)}. Train and register a model first (python train.py "
            "data.root=PATH), or choose one that exists with model.version=N, model.alias=NAME "
            "or model.uri=URI"
        ) from exc


@contextlib.contextmanager
def _pickle_disallowed() -> Iterator[None]:
    """Set MLflow's `MLFLOW_ALLOW_PICKLE_DESERIALIZATION` to false for the block.

    MLflow (3.17) allows pickle by default. With it off, `mlflow.pytorch.load_model` rejects
    pickle-format models and checks that a `pt2` archive contains only tensors and plain data
    before `torch.export.load` unpickles it.
    """
    name = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
    previous = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def check_pytorch_flavor(flavors: Mapping[str, Any]) -> None:
    """Raise ModelLoadError unless the model has a `pytorch` flavor that ships no code.

    MLflow puts a model's `code_paths` folder first on `sys.path` while loading, so a module
    there would shadow any later import.
    """
    conf = flavors.get("pytorch")
    if not isinstance(conf, Mapping):
        raise ModelLoadError("the model has no pytorch flavor in its MLmodel file")
    if conf.get("code"):
        raise ModelLoadError(
            f"the model ships code ({conf['code']!r}), which serving never imports; log it "
            "again without code_paths"
        )


def _load_model(
    model_uri: str, metadata: dict[str, Any] | None
) -> tuple[torch.nn.Module, list[str], Preprocessing]:
    """Load and warm up the model at `model_uri`; return it with its classes and preprocessing.

    Only `pt2` models (torch.export) whose archive contains no pickled objects load. A
    pickle-format model is rejected before any of it is unpickled: `pickle_module` keeps
    MLflow from importing the module named in `pickle_module_info.txt`, and torch refuses
    `weights_only=True` with an explicit pickle module.
    """
    import mlflow.pytorch

    class_names, preprocessing = _metadata(metadata)
    try:
        with _pickle_disallowed():
            model = mlflow.pytorch.load_model(model_uri, pickle_module=pickle, weights_only=True)
    except (RuntimeError, ValueError, TypeError, pickle.UnpicklingError) as exc:
        raise ModelLoadError(f"the model files could not be loaded: {one_line(exc)}") from exc
    _set_eval_mode(model)
    try:
        warm_up(model, preprocessing.image_size, len(class_names))
    except (RuntimeError, AssertionError) as exc:
        # torch.export programs raise AssertionError when an input breaks a shape guard.
        raise ModelLoadError(f"the model failed on a zero batch: {one_line(exc)}") from exc
    return model, class_names, preprocessing


def _load_folder(uri: str, folder: Path) -> ModelBundle:
    from mlflow.models import Model

    if not (folder / "MLmodel").is_file():
        raise ModelLoadError(f"{folder / 'MLmodel'} does not exist")
    # Model.load reads MLmodel only. get_model_info would also query the tracking store for the
    # logged model, which creates ./mlflow.db when no tracking URI is set (MLflow 3).
    info = Model.load(str(folder / "MLmodel"))
    check_pytorch_flavor(info.flavors)
    model, class_names, preprocessing = _load_model(str(folder), info.metadata)
    export_file = folder / EXPORT_INFO_FILE
    exported = json.loads(export_file.read_text()) if export_file.is_file() else {}
    bundle = ModelBundle(
        model=model,
        class_names=class_names,
        preprocessing=preprocessing,
        name=exported.get("name"),
        version=exported.get("version"),
        alias=exported.get("alias"),
        run_id=info.run_id,
        uri=uri,
        test_metrics={str(k): float(v) for k, v in exported.get("test_metrics", {}).items()},
        face_stage=face_stage_from_metadata(info.metadata),
    )
    _log_loaded(bundle)
    return bundle


def _load(uri: str, tracking_uri: str) -> ModelBundle:
    import mlflow
    from mlflow.models import get_model_info
    from mlflow.tracking import MlflowClient

    check_sqlite_store(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    name, version, alias, pinned_uri = resolve_registered(client, uri)
    info = get_model_info(pinned_uri)
    check_pytorch_flavor(info.flavors)
    model, class_names, preprocessing = _load_model(pinned_uri, info.metadata)
    bundle = ModelBundle(
        model=model,
        class_names=class_names,
        preprocessing=preprocessing,
        name=name,
        version=version,
        alias=alias,
        run_id=info.run_id,
        uri=uri,
        test_metrics=run_test_metrics(client, info.run_id),
        face_stage=face_stage_from_metadata(info.metadata),
    )
    _log_loaded(bundle)
    return bundle


def _log_loaded(bundle: ModelBundle) -> None:
    log.info(
        "Loaded model %s (name %s, version %s, run %s, classes %s, input %d px)",
        bundle.uri,
        bundle.name,
        bundle.version,
        bundle.run_id,
        bundle.class_names,
        bundle.preprocessing.image_size,
    )
