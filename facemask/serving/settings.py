"""Settings of the prediction service, built from a composed `conf/serve.yaml`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from facemask.serving.runtimes import RUNTIMES, TORCH_DTYPES

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


@dataclass(frozen=True)
class ServeSettings:
    """Configuration of one server process.

    Attributes:
        model_uri: The MLflow model URI to serve.
        tracking_uri: The MLflow tracking URI that resolves `models:/` and `runs:/` URIs.
        host: Address to bind.
        port: TCP port to bind.
        max_upload_bytes: Largest accepted upload per file, in bytes.
        max_pixels: Largest accepted image, in pixels declared by the file header.
        max_batch_files: Maximum number of files in one batch request.
        prediction_log: Path of the JSON-lines prediction log.
        prediction_log_max_bytes: Size in bytes past which the log is rotated.
        prediction_log_backups: Rotated files kept (`.1` ... `.N`).
        runtime: `onnx`, `torch`, or `auto` (ONNX Runtime when the model has an ONNX export).
        torch_dtype: `float32`, or `bfloat16` autocast, for the torch runtime.
        max_batch_size: Maximum number of images in one model call of the micro-batcher.
        max_batch_wait_ms: Maximum wait, in milliseconds, for requests that are still being
            decoded before the micro-batcher runs a partial batch on an idle model.
        inference_workers: Model calls that run at the same time.
        torch_threads: Intra-op threads of the runtime (torch or ONNX Runtime), or None to
            divide the CPUs among the inference workers.
        log_level: Python logging level name for the service and uvicorn.
        faces: Classify each face that the model's face stage finds (the whole image when it
            finds none); False classifies whole images.
    """

    model_uri: str
    tracking_uri: str
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_bytes: int = 10_000_000
    max_pixels: int = 50_000_000
    max_batch_files: int = 32
    prediction_log: Path = Path("logs/predictions.jsonl")
    prediction_log_max_bytes: int = 50_000_000
    prediction_log_backups: int = 5
    runtime: str = "auto"
    torch_dtype: str = "float32"
    max_batch_size: int = 8
    max_batch_wait_ms: float = 2.0
    inference_workers: int = 1
    torch_threads: int | None = None
    log_level: str = "info"
    faces: bool = True

    def __post_init__(self) -> None:
        positive = {
            "max_upload_bytes": self.max_upload_bytes,
            "max_pixels": self.max_pixels,
            "max_batch_files": self.max_batch_files,
            "prediction_log.max_bytes": self.prediction_log_max_bytes,
            "inference_workers": self.inference_workers,
            "batching.max_batch_size": self.max_batch_size,
        }
        for key, value in positive.items():
            if value < 1:
                raise ValueError(f"{key}={value} is invalid; it must be a positive integer")
        if self.prediction_log_backups < 0:
            raise ValueError(
                f"prediction_log.backups={self.prediction_log_backups} is invalid; use 0 or more"
            )
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port} is invalid; use a TCP port from 0 to 65535")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads={self.torch_threads} is invalid; use null or >= 1")
        if self.max_batch_wait_ms < 0:
            raise ValueError(
                f"batching.max_wait_ms={self.max_batch_wait_ms} is invalid; use 0 or more"
            )
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime={self.runtime!r} is invalid; use one of {RUNTIMES}")
        if self.torch_dtype not in TORCH_DTYPES:
            raise ValueError(
                f"torch_dtype={self.torch_dtype!r} is invalid; use one of {TORCH_DTYPES}"
            )
        if self.log_level.lower() not in LOG_LEVELS:
            raise ValueError(f"log_level={self.log_level!r} is invalid; use one of {LOG_LEVELS}")
        if not isinstance(self.faces, bool):
            raise ValueError(f"faces={self.faces!r} is invalid; use true or false")

    @property
    def intra_op_threads(self) -> int:
        """Intra-op threads of the runtime: the setting, or the CPUs per inference worker."""
        if self.torch_threads is not None:
            return self.torch_threads
        return max(1, len(os.sched_getaffinity(0)) // self.inference_workers)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> ServeSettings:
        """Build the settings from a composed `conf/serve.yaml`."""
        log_cfg: Any = cfg.prediction_log
        return cls(
            model_uri=model_uri_from_config(cfg.model),
            tracking_uri=str(cfg.mlflow.tracking_uri),
            host=str(cfg.host),
            port=int(cfg.port),
            max_upload_bytes=int(cfg.max_upload_bytes),
            max_pixels=int(cfg.max_pixels),
            max_batch_files=int(cfg.max_batch_files),
            prediction_log=Path(str(log_cfg.path)).expanduser(),
            prediction_log_max_bytes=int(log_cfg.max_bytes),
            prediction_log_backups=int(log_cfg.backups),
            runtime=str(cfg.runtime),
            torch_dtype=str(cfg.torch_dtype),
            max_batch_size=int(cfg.batching.max_batch_size),
            max_batch_wait_ms=float(cfg.batching.max_wait_ms),
            inference_workers=int(cfg.inference_workers),
            torch_threads=None if cfg.torch_threads is None else int(cfg.torch_threads),
            log_level=str(cfg.log_level).lower(),
            # Hydra parses `faces=false` as a bool; any other value fails the check above.
            faces=cfg.get("faces", True),
        )


def model_uri_from_config(model_cfg: DictConfig) -> str:
    """Return `model.uri`, else `models:/NAME/VERSION` when a version is set, else `NAME@ALIAS`."""
    if model_cfg.get("uri"):
        return str(model_cfg.uri)
    name = model_cfg.get("name")
    if not name:
        raise ValueError("model.name is empty; set model.name or model.uri")
    if model_cfg.get("version") is not None:
        return f"models:/{name}/{model_cfg.version}"
    if model_cfg.get("alias"):
        return f"models:/{name}@{model_cfg.alias}"
    raise ValueError("model.alias and model.version are both empty; set one, or set model.uri")
