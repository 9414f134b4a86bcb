"""End-to-end training on a small real subset with a real MLflow store in a temporary folder."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from facemask.data.scan import DatasetError
from facemask.data.transforms import Preprocessing, preprocess_file
from facemask.models.classifier import FaceMaskClassifier
from facemask.settings import project_root
from facemask.training import train
from tests.helpers import compose_train_config, copy_real_subset, small_training_overrides

IMAGES_PER_CLASS = 24


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory, real_data_root: Path) -> Path:
    return copy_real_subset(real_data_root, tmp_path_factory.mktemp("small-data"), IMAGES_PER_CLASS)


def _runs(store: Path) -> list:
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("facemask")
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id])


@pytest.fixture(scope="module")
def trained(small_dataset: Path, tmp_path_factory):
    store = tmp_path_factory.mktemp("mlruns")
    output_dir = tmp_path_factory.mktemp("run")
    cfg = compose_train_config(small_training_overrides(small_dataset, store, output_dir))
    result = train(cfg)
    return result, store, small_dataset


def test_training_registers_version_with_alias(trained):
    result, store, _ = trained
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    assert result.registration is not None
    assert result.registration.version == "1"
    assert result.registration.promoted
    holder = client.get_model_version_by_alias("facemask-classifier", "champion")
    assert str(holder.version) == "1"
    assert holder.run_id == result.run_id
    assert client.get_run(result.run_id).info.status == "FINISHED"


def test_training_logs_metrics_params_artifacts(trained):
    result, store, _ = trained
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    run = client.get_run(result.run_id)
    for key in ("train/loss_epoch", "val/acc", "val/f1", "test/acc", "test/auroc"):
        assert key in run.data.metrics, key
    assert "test/recall_mask" in run.data.metrics
    assert run.data.metrics["data/skipped_files"] == 0
    assert run.data.params["model/name"] == "resnet18"
    assert run.data.params["data/image_size"] == "64"
    artifacts = {
        f.path
        for folder in ("config", "data", "reports")
        for f in client.list_artifacts(result.run_id, folder)
    }
    for expected in (
        "config/config.yaml",
        "data/split_manifest.csv",
        "data/split_counts.csv",
        "data/skipped_files.csv",
        "reports/confusion_matrix.png",
        "reports/roc_curves.png",
        "reports/classification_report.txt",
    ):
        assert expected in artifacts, expected


def test_registered_model_matches_checkpoint(trained):
    result, store, data_root = trained
    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    uri = "models:/facemask-classifier@champion"
    info = mlflow.models.get_model_info(uri)
    assert info.metadata["class_names"] == ["mask", "no_mask"]
    pre = Preprocessing.from_dict(info.metadata["preprocessing"])
    assert pre.image_size == 64

    files = [
        *sorted((data_root / "mask").iterdir())[:3],
        *sorted((data_root / "no_mask").iterdir())[:3],
    ]
    batch = torch.stack([preprocess_file(path, pre) for path in files])
    served = mlflow.pytorch.load_model(uri)
    module = FaceMaskClassifier.load_from_checkpoint(
        result.best_checkpoint, pretrained=False, weights_only=True
    ).eval()
    with torch.no_grad():
        expected = torch.softmax(module(batch), dim=1)
        actual = served(batch)
    assert actual.shape == (6, 2)
    torch.testing.assert_close(actual.sum(dim=1), torch.ones(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)


def test_second_run_moves_alias_only_if_better(trained, tmp_path):
    result, store, data_root = trained
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    first_acc = client.get_run(result.run_id).data.metrics["test/acc"]
    # Comparing with "greater is worse" flips the decision the real metric would give.
    cfg = compose_train_config(
        small_training_overrides(
            data_root, store, tmp_path, "registry.greater_is_better=false", "trainer.max_epochs=1"
        )
    )
    second = train(cfg)
    second_acc = client.get_run(second.run_id).data.metrics["test/acc"]
    assert second.registration.version == "2"
    holder = client.get_model_version_by_alias("facemask-classifier", "champion")
    expected_holder = "2" if second_acc < first_acc else "1"
    assert str(holder.version) == expected_holder
    tags = client.get_model_version("facemask-classifier", "2").tags
    assert "alias_decision" in tags


def test_failed_training_registers_nothing(small_dataset, tmp_path):
    store = tmp_path / "store"
    cfg = compose_train_config(
        small_training_overrides(small_dataset, store, tmp_path / "run", "model.optimizer.lr=-1")
    )
    with pytest.raises(ValueError, match="learning rate"):
        train(cfg)
    runs = _runs(store)
    assert [run.info.status for run in runs] == ["FAILED"]
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    assert client.search_registered_models() == []


def test_interrupted_training_is_killed_then_resumes(small_dataset, tmp_path, monkeypatch):
    store = tmp_path / "store"
    first_dir = tmp_path / "first"
    cfg = compose_train_config(
        small_training_overrides(small_dataset, store, first_dir, "trainer.max_epochs=2")
    )
    original_step = FaceMaskClassifier.training_step

    def interrupt_in_second_epoch(self, batch, batch_idx):
        if self.current_epoch == 1:
            raise KeyboardInterrupt
        return original_step(self, batch, batch_idx)

    monkeypatch.setattr(FaceMaskClassifier, "training_step", interrupt_in_second_epoch)
    with pytest.raises(SystemExit):
        train(cfg)
    runs = _runs(store)
    assert [run.info.status for run in runs] == ["KILLED"]
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    assert client.search_registered_models() == []

    monkeypatch.setattr(FaceMaskClassifier, "training_step", original_step)
    last = first_dir / "checkpoints" / "last.ckpt"
    assert last.is_file()
    resume_cfg = compose_train_config(
        small_training_overrides(
            small_dataset, store, tmp_path / "second", "trainer.max_epochs=2", f"ckpt_path={last}"
        )
    )
    result = train(resume_cfg)
    assert result.run_id == runs[0].info.run_id
    assert client.get_run(result.run_id).info.status == "FINISHED"
    assert result.registration.version == "1"


def test_missing_data_stops_before_any_run(tmp_path):
    store = tmp_path / "store"
    cfg = compose_train_config(
        small_training_overrides(tmp_path / "nowhere", store, tmp_path / "run")
    )
    with pytest.raises(DatasetError, match="nowhere"):
        train(cfg)
    assert _runs(store) == []


def test_sigterm_marks_run_killed(small_dataset, tmp_path):
    store = tmp_path / "store"
    output_dir = tmp_path / "run"
    overrides = small_training_overrides(small_dataset, store, output_dir, "trainer.max_epochs=200")
    command = [sys.executable, str(project_root() / "train.py"), *overrides]
    command.append(f"hydra.run.dir={output_dir}")
    log_path = tmp_path / "train.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            # The first epoch's checkpoint shows that training is under way.
            last = output_dir / "checkpoints" / "last.ckpt"
            deadline = time.monotonic() + 180
            while not last.exists() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.5)
            assert last.exists(), log_path.read_text()[-3000:]
            process.send_signal(signal.SIGTERM)
            returncode = process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert returncode == 128 + signal.SIGTERM, log_path.read_text()[-3000:]
    runs = _runs(store)
    assert [run.info.status for run in runs] == ["KILLED"]
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    assert client.search_registered_models() == []


def _registry_state(client: MlflowClient) -> list[tuple[str, str, list[str], str]]:
    """Return (model, version, aliases, run id) of every registered version, sorted."""
    state = []
    for model in client.search_registered_models():
        for found in client.search_model_versions(f"name='{model.name}'"):
            # Search results leave the aliases out; a version lookup has them.
            version = client.get_model_version(found.name, found.version)
            state.append(
                (version.name, str(version.version), sorted(version.aliases), version.run_id)
            )
    return sorted(state)


def test_sigkill_mid_epoch_keeps_registry_then_resumes(small_dataset, tmp_path):
    store = tmp_path / "store"
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    train(compose_train_config(small_training_overrides(small_dataset, store, tmp_path / "first")))
    before = _registry_state(client)
    assert [entry[1:3] for entry in before] == [("1", ["champion"])]

    output_dir = tmp_path / "killed"
    overrides = small_training_overrides(small_dataset, store, output_dir, "trainer.max_epochs=4")
    command = [sys.executable, str(project_root() / "train.py"), *overrides]
    command.append(f"hydra.run.dir={output_dir}")
    last = output_dir / "checkpoints" / "last.ckpt"
    log_path = tmp_path / "train.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            # The first checkpoint is written at the end of epoch 0, so the kill lands in epoch 1.
            deadline = time.monotonic() + 180
            while not last.exists() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert last.exists(), log_path.read_text()[-3000:]
            process.send_signal(signal.SIGKILL)
            returncode = process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()

    assert returncode == -signal.SIGKILL
    assert _registry_state(client) == before
    killed = [run for run in _runs(store) if run.info.status == "RUNNING"]
    assert len(killed) == 1

    resume = small_training_overrides(
        small_dataset, store, tmp_path / "resumed", "trainer.max_epochs=4", f"ckpt_path={last}"
    )
    result = train(compose_train_config(resume))

    assert result.run_id == killed[0].info.run_id
    assert client.get_run(result.run_id).info.status == "FINISHED"
    assert result.registration.version == "2"
    after = _registry_state(client)
    assert [entry[1] for entry in after] == ["1", "2"]
    assert after[1][3] == result.run_id
