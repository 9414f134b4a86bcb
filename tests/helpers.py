"""Helpers shared by tests: composing the project's Hydra configs without the command line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from facemask.settings import configure_environment, project_root

configure_environment()

CONFIG_DIR = project_root() / "conf"


def compose_train_config(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose `conf/train.yaml` with command-line style overrides."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def copy_real_subset(real_data_root: Path, target: Path, per_class: int) -> Path:
    """Copy `per_class` real photos of each class, spread over the folder's sources."""
    for label in ("mask", "no_mask"):
        files = sorted((real_data_root / label).iterdir())
        chosen = files[:: max(1, len(files) // per_class)][:per_class]
        (target / label).mkdir(parents=True)
        for path in chosen:
            shutil.copy2(path, target / label / path.name)
    return target


def small_training_overrides(
    data_root: Path, store: Path, output_dir: Path, *extra: str
) -> list[str]:
    """Return overrides for a one-epoch, 64-pixel CPU training with its own MLflow store."""
    return [
        f"data.root={data_root}",
        "data.image_size=64",
        "data.batch_size=8",
        "data.num_workers=0",
        f"data.cache_dir={store / 'cache'}",
        "model.pretrained=false",
        "model.optimizer.lr=1e-3",
        "trainer.max_epochs=1",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "~callbacks.progress_bar",
        f"mlflow.tracking_uri=sqlite:///{store / 'mlflow.db'}",
        f"mlflow.artifact_location={store / 'artifacts'}",
        f"paths.output_dir={output_dir}",
        *extra,
    ]


def run_train_cli(
    args: Sequence[str], cwd: Path, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run `python train.py ARGS` in a subprocess from `cwd`; the output is captured as text."""
    return subprocess.run(
        [sys.executable, str(project_root() / "train.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, "HYDRA_FULL_ERROR": "0"},
        check=False,
    )
