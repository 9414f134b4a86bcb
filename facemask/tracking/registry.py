"""Log the trained classifier as an MLflow model, register it and move the alias if it is better."""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec

from facemask.data.transforms import Preprocessing

log = logging.getLogger(__name__)

MODEL_ARTIFACT_NAME = "model"

# Packages the exported model needs at load time. Pinning them keeps MLflow from inferring
# requirements by importing the whole environment, which takes about 10 s.
_MODEL_REQUIREMENTS = ("torch", "numpy", "mlflow")


@dataclass(frozen=True)
class RegistrationResult:
    """Outcome of logging and registering one model.

    Attributes:
        model_uri: The logged model's URI (`models:/<model id>`).
        model_name: Registered model name.
        version: The new version, or None when registration was off.
        alias: The alias that was considered.
        promoted: Whether the alias now points at the new version.
        reason: Why the alias moved or stayed, in words.
    """

    model_uri: str
    model_name: str | None
    version: str | None
    alias: str | None
    promoted: bool
    reason: str


def model_signature(image_size: int, num_classes: int) -> ModelSignature:
    """Return the signature: float32 NCHW images in, float32 class probabilities out."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, image_size, image_size))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes))]),
    )


def log_model(
    model: torch.nn.Module,
    example_batch: torch.Tensor,
    class_names: Sequence[str],
    preprocessing: Preprocessing,
    extra_metadata: Mapping[str, Any] | None = None,
) -> mlflow.models.model.ModelInfo:
    """Log `model` to the active MLflow run in the `pt2` format (torch.export, no pickle).

    Args:
        model: Module mapping normalised NCHW float32 images to class probabilities.
        example_batch: At least two preprocessed images; a batch of one would freeze the
            exported batch size at 1.
        class_names: Class names in output order.
        preprocessing: The evaluation preprocessing, stored so serving repeats it exactly.
        extra_metadata: More entries for the MLmodel file's `metadata` section.
    """
    if example_batch.ndim != 4 or example_batch.shape[0] < 2:
        raise ValueError(
            f"example_batch must be NCHW with N >= 2, got {tuple(example_batch.shape)}"
        )
    model = model.eval().cpu()
    metadata = {
        "class_names": list(class_names),
        "preprocessing": preprocessing.to_dict(),
        **(extra_metadata or {}),
    }
    requirements = [f"{name}=={importlib.metadata.version(name)}" for name in _MODEL_REQUIREMENTS]
    return mlflow.pytorch.log_model(
        model,
        name=MODEL_ARTIFACT_NAME,
        serialization_format="pt2",
        signature=model_signature(preprocessing.image_size, len(class_names)),
        input_example=example_batch.float().cpu().numpy(),
        pip_requirements=requirements,
        metadata=metadata,
    )


def _alias_holder_metric(
    client: MlflowClient, name: str, alias: str, metric: str
) -> tuple[str | None, float | None]:
    try:
        holder = client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None, None
        raise
    value = None
    if holder.run_id:
        value = client.get_run(holder.run_id).data.metrics.get(metric)
    return holder.version, value


def decide_promotion(
    new_value: float | None,
    holder_version: str | None,
    holder_value: float | None,
    *,
    policy: str,
    greater_is_better: bool,
    metric: str,
) -> tuple[bool, str]:
    """Decide whether the alias moves to the new version; returns (promote, reason)."""
    if policy == "never":
        return False, "promotion policy is 'never'"
    if policy == "always":
        return True, "promotion policy is 'always'"
    if policy != "better":
        raise ValueError(f"registry.promote={policy!r} is invalid; use better, always or never")
    if holder_version is None:
        return True, "no version held the alias"
    if new_value is None:
        return False, f"the new model has no {metric} to compare"
    if holder_value is None:
        return True, f"version {holder_version} has no {metric} to compare"
    better = new_value > holder_value if greater_is_better else new_value < holder_value
    comparison = f"{metric} {new_value:.4f} vs {holder_value:.4f} of version {holder_version}"
    return better, ("better: " if better else "not better: ") + comparison


def register_and_promote(
    model_uri: str,
    run_id: str,
    *,
    model_name: str,
    alias: str,
    metrics: Mapping[str, float],
    policy: str = "better",
    compare_metric: str = "test/acc",
    greater_is_better: bool = True,
) -> RegistrationResult:
    """Register `model_uri` as a new version of `model_name` and move `alias` by `policy`.

    The version is tagged with the compared metric and the decision either way.
    """
    client = MlflowClient()
    holder_version, holder_value = _alias_holder_metric(client, model_name, alias, compare_metric)
    version = str(mlflow.register_model(model_uri, model_name, tags={"run_id": run_id}).version)
    new_value = metrics.get(compare_metric)
    promote, reason = decide_promotion(
        new_value,
        holder_version,
        holder_value,
        policy=policy,
        greater_is_better=greater_is_better,
        metric=compare_metric,
    )
    if promote:
        client.set_registered_model_alias(model_name, alias, version)
    client.set_model_version_tag(model_name, version, "alias_decision", reason)
    if new_value is not None:
        client.set_model_version_tag(model_name, version, compare_metric, f"{new_value:.6f}")
    log.info(
        "Registered %s version %s; alias %r %s (%s)",
        model_name,
        version,
        alias,
        "moved to it" if promote else f"stays on version {holder_version}",
        reason,
    )
    return RegistrationResult(model_uri, model_name, version, alias, promote, reason)
