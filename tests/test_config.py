"""The Hydra configuration: every group composes and the command line behaves as in Hydra."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from facemask.settings import project_root
from tests.helpers import CONFIG_DIR, compose_train_config

GROUP_OPTIONS = [
    (group, path.stem)
    for group in (
        "data",
        "model",
        "trainer",
        "callbacks",
        "logger",
        "paths",
        "experiment",
        "debug",
        "hparams_search",
    )
    for path in sorted((CONFIG_DIR / group).glob("*.yaml"))
]


def test_public_keys_have_documented_defaults():
    cfg = compose_train_config()
    assert cfg.data.image_size == 224
    assert cfg.data.batch_size == 32
    assert list(cfg.data.splits) == [0.7, 0.15, 0.15]
    assert cfg.seed == 42
    assert cfg.model.name == "resnet18"
    assert cfg.model.pretrained is True
    assert cfg.model.optimizer.lr == pytest.approx(1e-4)
    assert cfg.model.optimizer._target_ == "torch.optim.Adam"
    assert cfg.model.num_classes is None
    assert cfg.registry.model_name == "facemask-classifier"
    assert cfg.registry.alias == "champion"
    assert cfg.mlflow.experiment_name


def test_default_tracking_uri_is_sqlite_in_mlruns(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = compose_train_config(["paths.output_dir=/tmp/unused"])
    expected = f"sqlite:///{project_root() / 'mlruns' / 'mlflow.db'}"
    assert cfg.mlflow.tracking_uri == expected


def test_tracking_uri_follows_environment(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    cfg = compose_train_config(["paths.output_dir=/tmp/unused"])
    assert cfg.mlflow.tracking_uri == "http://127.0.0.1:5000"


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS)
def test_group_option_composes(group, option):
    cfg = compose_train_config([f"{group}={option}", "paths.output_dir=/tmp/unused"])
    # Resolving every interpolation catches typos in keys that only some options use.
    OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONFIG_DIR / "trainer").glob("*.yaml")))
def test_trainer_option_instantiates(option):
    if option in ("gpu", "ddp"):
        pytest.skip("needs a GPU")
    cfg = compose_train_config([f"trainer={option}", "paths.output_dir=/tmp/unused"])
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert trainer.max_epochs == cfg.trainer.max_epochs


def _run_train_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, str(project_root() / "train.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
        env=env,
        check=False,
    )


def test_cli_cfg_job_prints_resolved_groups():
    result = _run_train_cli("--cfg", "job", "model.pretrained=false")
    assert result.returncode == 0, result.stderr
    printed = OmegaConf.create(result.stdout)
    assert printed.model.pretrained is False
    assert "trainer" in printed
    assert "registry" in printed


def test_cli_help_lists_groups():
    result = _run_train_cli("--help")
    assert result.returncode == 0, result.stderr
    for group in ("data:", "model:", "trainer:", "experiment:"):
        assert group in result.stdout


def test_cli_missing_data_exits_with_message(tmp_path):
    missing = tmp_path / "no-such-folder"
    result = _run_train_cli(
        f"data.root={missing}",
        "model.pretrained=false",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert str(missing) in output
    assert "data.root" in output
    assert "Traceback" not in output


def test_cli_invalid_splits_exit_with_message(tmp_path):
    result = _run_train_cli(
        "data.splits=[0.5,0.2,0.2]",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert "data.splits=[0.5, 0.2, 0.2]" in output
    assert "Traceback" not in output


def test_cli_failed_download_exits_with_message(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    result = _run_train_cli(
        f"data.root={tmp_path / 'images'}",
        "data.download=true",
        f"data.download_url=http://127.0.0.1:{closed_port}/dataset.zip",
        f"data.download_dir={tmp_path / 'downloads'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert f"127.0.0.1:{closed_port}" in output
    assert "--from PATH" in output
    assert "Traceback" not in output
