"""Helpers shared by tests: composing the project's Hydra configs without the command line."""

from __future__ import annotations

import shutil
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
