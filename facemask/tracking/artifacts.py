"""Artifacts of a training run: the resolved config, the split and the test reports."""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from facemask.tracking.reports import write_test_reports

if TYPE_CHECKING:
    from facemask.data.datamodule import FaceMaskDataModule

log = logging.getLogger(__name__)


def write_data_artifacts(datamodule: FaceMaskDataModule, folder: Path) -> list[Path]:
    """Write the split manifest, per-split class counts and the skipped files as CSV."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest_path = folder / "split_manifest.csv"
    datamodule.manifest.to_csv(manifest_path, index=False)
    counts_path = folder / "split_counts.csv"
    datamodule.counts.to_csv(counts_path, index_label="split")
    skipped_path = folder / "skipped_files.csv"
    with skipped_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "reason"])
        for skipped in datamodule.skipped:
            writer.writerow([skipped.relpath, skipped.label, skipped.reason])
    return [manifest_path, counts_path, skipped_path]


def data_metrics(datamodule: FaceMaskDataModule) -> dict[str, float]:
    """Return image counts per split and class, the skipped file count and, when training on
    faces, the faces, images used whole (no face found) and samples per split, as metrics."""
    metrics = {"data/skipped_files": float(len(datamodule.skipped))}
    counts = datamodule.counts
    for split, row in counts.iterrows():
        for column, value in row.items():
            metrics[f"data/{split}/{column}"] = float(value)
    for split, summary in datamodule.face_summary.items():
        metrics[f"faces/{split}/faces"] = float(summary.faces)
        metrics[f"faces/{split}/fallback_images"] = float(summary.fallback_images)
        metrics[f"faces/{split}/multi_face_images"] = float(summary.multi_face_images)
        metrics[f"faces/{split}/samples"] = float(summary.samples)
    return metrics


def log_run_inputs(
    client: MlflowClient,
    run_id: str,
    cfg: DictConfig,
    datamodule: FaceMaskDataModule,
    output_dir: Path,
) -> None:
    """Log the resolved config and the data split of a run as artifacts and metrics."""
    config_path = output_dir / "config.yaml"
    config_path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    client.log_artifact(run_id, str(config_path), "config")
    for path in write_data_artifacts(datamodule, output_dir / "data"):
        client.log_artifact(run_id, str(path), "data")
    for key, value in data_metrics(datamodule).items():
        client.log_metric(run_id, key, value)
    client.set_tag(run_id, "data.root", str(datamodule.root))
    client.set_tag(run_id, "data.classes", ",".join(datamodule.classes))


def log_test_reports(
    client: MlflowClient,
    run_id: str,
    test_results: Mapping[str, Any],
    class_names: list[str],
    output_dir: Path,
) -> list[Path]:
    """Write the test plots and classification report and log them under `reports/`."""
    probs = np.asarray(test_results["probs"], dtype=np.float64)
    targets = np.asarray(test_results["targets"], dtype=np.int64)
    confusion = np.asarray(test_results["confusion"], dtype=np.int64)
    paths = write_test_reports(targets, probs, confusion, class_names, output_dir / "reports")
    for path in paths:
        client.log_artifact(run_id, str(path), "reports")
    return paths
