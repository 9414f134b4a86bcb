"""Helpers shared by tests: composing the project's Hydra configs without the command line."""

from __future__ import annotations

from collections.abc import Sequence

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from facemask.settings import configure_environment, project_root

configure_environment()

CONFIG_DIR = project_root() / "conf"


def compose_train_config(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose `conf/train.yaml` with command-line style overrides."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))
