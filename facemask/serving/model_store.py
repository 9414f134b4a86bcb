"""Load a logged classifier and its metadata from MLflow for serving."""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import mlflow
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import get_model_info
from mlflow.tracking import MlflowClient

from facemask.data.transforms import Preprocessing

log = logging.getLogger(__name__)

# Keys of the /predict response next to the class probabilities; a class may not use them.
RESERVED_RESPONSE_KEYS = frozenset({"label", "model_version", "request_id", "filename", "error"})

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


def redact_uri(uri: str) -> str:
    """Return `uri` with any password in its user-info part replaced by `***`."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()).rstrip(".") or type(exc).__name__


def _check_sqlite_store(tracking_uri: str) -> None:
    # MLflow creates a missing SQLite file, which would hide a wrong path behind "model not found".
    if not tracking_uri.startswith("sqlite:///"):
        return
    path = Path(tracking_uri.removeprefix("sqlite:///").split("?", 1)[0])
    if str(path) != ":memory:" and not path.is_file():
        raise ModelLoadError(f"the MLflow database {path} does not exist")


def _resolve_registered(
    client: MlflowClient, uri: str
) -> tuple[str | None, str | None, str | None, str]:
    """Return (name, version, alias, version-pinned URI) for a `models:/NAME@ALIAS|VERSION` URI."""
    match = _REGISTERED_URI.match(uri)
    if match is None:
        return None, None, None, uri
    name, alias = match["name"], match["alias"]
    if alias is not None:
        model_version = client.get_model_version_by_alias(name, alias)
    else:
        model_version = client.get_model_version(name, match["version"])
    version = str(model_version.version)
    # Metadata and weights are read from the version the alias pointed at when the lookup ran.
    return name, version, alias, f"models:/{name}/{version}"


def _test_metrics(client: MlflowClient, run_id: str | None) -> dict[str, float]:
    if not run_id:
        return {}
    try:
        metrics = client.get_run(run_id).data.metrics
    except MlflowException as exc:
        log.warning("Cannot read the metrics of run %s: %s", run_id, _one_line(exc))
        return {}
    return {key: float(value) for key, value in sorted(metrics.items()) if key.startswith("test/")}


def _metadata(metadata: dict[str, Any] | None) -> tuple[list[str], Preprocessing]:
    metadata = metadata or {}
    if "class_names" not in metadata or "preprocessing" not in metadata:
        raise ModelLoadError(
            "the model has no class_names or preprocessing metadata, so it was not logged by "
            "facemask training"
        )
    class_names = [str(name) for name in metadata["class_names"]]
    clashes = RESERVED_RESPONSE_KEYS.intersection(class_names)
    if clashes:
        raise ModelLoadError(f"class names {sorted(clashes)} clash with response keys")
    try:
        preprocessing = Preprocessing.from_dict(metadata["preprocessing"])
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"invalid preprocessing metadata: {exc}") from exc
    return class_names, preprocessing


def warm_up(model: torch.nn.Module, image_size: int, num_classes: int) -> None:
    """Run one forward pass on a zero batch and check the output shape."""
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


def load_model_bundle(uri: str, tracking_uri: str) -> ModelBundle:
    """Load the model at `uri` with its class names, preprocessing, version and test metrics.

    Raises:
        ModelLoadError: The store, the registered model, the alias or version, the model files
            or their metadata are missing or invalid. The message is one line that names the
            URI, the tracking URI and how to fix it.
    """
    try:
        return _load(uri, tracking_uri)
    except (ModelLoadError, MlflowException, OSError) as exc:
        raise ModelLoadError(
            f"Cannot load model {uri!r} from MLflow tracking URI {redact_uri(tracking_uri)!r}: "
            f"{_one_line(exc)}. Train and register a model first (python train.py "
            "data.root=PATH), or choose one that exists with model.version=N, model.alias=NAME "
            "or model.uri=URI"
        ) from exc


def _load(uri: str, tracking_uri: str) -> ModelBundle:
    _check_sqlite_store(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    name, version, alias, pinned_uri = _resolve_registered(client, uri)
    info = get_model_info(pinned_uri)
    class_names, preprocessing = _metadata(info.metadata)

    try:
        model = mlflow.pytorch.load_model(pinned_uri)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"the model files could not be loaded: {_one_line(exc)}") from exc
    _set_eval_mode(model)
    try:
        warm_up(model, preprocessing.image_size, len(class_names))
    except (RuntimeError, AssertionError) as exc:
        # torch.export programs raise AssertionError when an input breaks a shape guard.
        raise ModelLoadError(f"the model failed on a zero batch: {_one_line(exc)}") from exc

    bundle = ModelBundle(
        model=model,
        class_names=class_names,
        preprocessing=preprocessing,
        name=name,
        version=version,
        alias=alias,
        run_id=info.run_id,
        uri=uri,
        test_metrics=_test_metrics(client, info.run_id),
    )
    log.info(
        "Loaded model %s (name %s, version %s, run %s, classes %s, input %d px)",
        uri,
        name,
        version,
        info.run_id,
        class_names,
        preprocessing.image_size,
    )
    return bundle
