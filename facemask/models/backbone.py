"""Create timm backbones, and explain how to train offline when weights cannot be downloaded."""

from __future__ import annotations

import pickle
from pathlib import Path

import timm
from torch import nn


class BackboneError(ValueError):
    """An unknown model name or an unusable weights file."""


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights could not be downloaded or loaded."""


def create_backbone(
    name: str,
    num_classes: int,
    *,
    pretrained: bool = True,
    weights_file: str | Path | None = None,
) -> nn.Module:
    """Create a timm model with a fresh `num_classes`-way classifier head.

    Args:
        name: A timm model name, such as `resnet18`.
        num_classes: Number of output classes.
        pretrained: Start from timm's pretrained weights, downloaded through its normal
            mechanism (the Hugging Face Hub cache).
        weights_file: A local timm checkpoint (`.safetensors`, `.pth` or `.bin`) to start from
            instead of downloading; implies pretrained weights.

    Raises:
        BackboneError: `name` is not a timm model, or `weights_file` does not exist.
        PretrainedWeightsError: The weights could not be downloaded or loaded.
    """
    if num_classes < 2:
        raise BackboneError(f"num_classes must be at least 2, got {num_classes}")
    if not timm.is_model(name):
        similar = timm.list_models(f"*{name.split('_')[0]}*")[:10]
        hint = f" Similar names: {', '.join(similar)}." if similar else ""
        raise BackboneError(f"model.name={name!r} is not a timm model.{hint}")
    if weights_file is not None:
        return _create_from_file(name, num_classes, Path(weights_file).expanduser())
    if not pretrained:
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    try:
        return timm.create_model(name, pretrained=True, num_classes=num_classes)
    except (OSError, RuntimeError, ValueError) as exc:
        # Offline, huggingface_hub raises LocalEntryNotFoundError, an OSError subclass.
        raise PretrainedWeightsError(
            f"could not download the pretrained weights of {name!r}: {exc}\n"
            "Either train from scratch with model.pretrained=false, or download the weights "
            "elsewhere and pass the file with model.weights_file=PATH."
        ) from exc


def _create_from_file(name: str, num_classes: int, path: Path) -> nn.Module:
    if not path.is_file():
        raise BackboneError(f"model.weights_file={str(path)!r} does not exist or is not a file")
    try:
        # timm loads `file` with weights_only=True (or safetensors) and drops the classifier
        # when num_classes differs from the checkpoint's.
        return timm.create_model(
            name,
            pretrained=True,
            num_classes=num_classes,
            pretrained_cfg_overlay={"file": str(path)},
        )
    except (
        OSError,
        RuntimeError,
        ValueError,
        KeyError,
        pickle.UnpicklingError,
    ) as exc:
        raise PretrainedWeightsError(
            f"could not load model.weights_file={str(path)!r} into {name!r}: {exc}\n"
            "The file must be a timm checkpoint of the same architecture."
        ) from exc
