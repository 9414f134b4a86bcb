"""DDP training with two CPU processes over gloo (`trainer=ddp_cpu`), on a small real subset."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient

from facemask.distributed import drop_repeated_samples
from facemask.models.classifier import FaceMaskClassifier
from facemask.settings import project_root
from facemask.training import RUN_ID_FILE
from tests.helpers import compose_train_config, copy_real_subset, small_training_overrides

IMAGES_PER_CLASS = 40
# Removing some no_mask photos leaves a test split of 11 images. Two processes get 6 each, so
# DistributedSampler repeats one image, which the reports must count once.
REMOVED_NO_MASK = 5
PROCESS_TIMEOUT_S = 240

# Runs train.py with training_step failing in the process whose global rank is in the
# FAIL_RANK variable. Lightning starts the second process with this same script, and the
# variable reaches it through the environment.
FAILING_TRAIN_SCRIPT = """
import os

from facemask.models.classifier import FaceMaskClassifier
from facemask.train import main

original_step = FaceMaskClassifier.training_step


def failing_step(self, batch, batch_idx):
    if batch_idx == 1 and self.global_rank == int(os.environ["FAIL_RANK"]):
        raise RuntimeError(f"injected failure on rank {self.global_rank}")
    return original_step(self, batch, batch_idx)


FaceMaskClassifier.training_step = failing_step
main()
"""

# A run owner that starts a watcher and is then killed, as Lightning kills rank zero.
KILLED_OWNER_SCRIPT = """
import os, signal, sys
from facemask.tracking.run_guard import RunGuard
RunGuard(sys.argv[1], sys.argv[2])
os.kill(os.getpid(), signal.SIGKILL)
"""

RELEASING_OWNER_SCRIPT = """
import sys
from facemask.tracking.run_guard import RunGuard
RunGuard(sys.argv[1], sys.argv[2]).release()
"""


@pytest.fixture(scope="module")
def odd_dataset(tmp_path_factory, real_data_root: Path) -> Path:
    root = copy_real_subset(real_data_root, tmp_path_factory.mktemp("ddp-data"), IMAGES_PER_CLASS)
    for path in sorted((root / "no_mask").iterdir())[:REMOVED_NO_MASK]:
        path.unlink()
    return root


def _ddp_overrides(data_root: Path, store: Path, output_dir: Path, *extra: str) -> list[str]:
    # 32-bit precision makes the predictions comparable with a one-process evaluation.
    return small_training_overrides(
        data_root,
        store,
        output_dir,
        "trainer=ddp_cpu",
        "trainer.precision=32-true",
        f"hydra.run.dir={output_dir}",
        *extra,
    )


def _run_train(script: Path, overrides: list[str], log_path: Path, **env: str):
    command = [sys.executable, str(script), *overrides]
    with log_path.open("w") as log_file:
        return subprocess.run(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            timeout=PROCESS_TIMEOUT_S,
            env={**os.environ, **env},
            check=False,
        )


def _client(store: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{store / 'mlflow.db'}")


def _runs(store: Path) -> list:
    experiment = _client(store).get_experiment_by_name("facemask")
    if experiment is None:
        return []
    return _client(store).search_runs([experiment.experiment_id])


@pytest.fixture(scope="module")
def ddp_run(odd_dataset: Path, tmp_path_factory):
    store = tmp_path_factory.mktemp("ddp-store")
    output_dir = tmp_path_factory.mktemp("ddp-run")
    log_path = output_dir.parent / "ddp-train.log"
    completed = _run_train(
        project_root() / "train.py", _ddp_overrides(odd_dataset, store, output_dir), log_path
    )
    return completed.returncode, log_path.read_text(), store, output_dir


def test_ddp_runs_two_processes(ddp_run):
    returncode, output, _, _ = ddp_run
    assert returncode == 0, output[-4000:]
    assert "Starting with 2 processes" in output
    assert "distributed_backend=gloo" in output


def test_ddp_logs_one_finished_run(ddp_run):
    _, output, store, output_dir = ddp_run
    runs = _runs(store)
    assert len(runs) == 1, output[-4000:]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert (output_dir / RUN_ID_FILE).read_text() == run.info.run_id
    for key in ("train/loss_epoch", "train/acc", "val/loss", "val/acc", "test/acc", "test/loss"):
        assert key in run.data.metrics, key


def test_ddp_registers_one_version(ddp_run):
    _, output, store, _ = ddp_run
    client = _client(store)
    versions = client.search_model_versions("name='facemask-classifier'")
    assert len(versions) == 1, output[-4000:]
    assert versions[0].run_id == _runs(store)[0].info.run_id
    holder = client.get_model_version_by_alias("facemask-classifier", "champion")
    assert str(holder.version) == "1"


def test_ddp_reports_count_images_once(ddp_run):
    _, _, _, output_dir = ddp_run
    counts = pd.read_csv(output_dir / "data" / "split_counts.csv", index_col="split")
    test_size = int(counts.loc["test", "total"])
    assert test_size % 2 == 1, "the test split must not divide evenly between two processes"

    report = json.loads((output_dir / "reports" / "classification_report.json").read_text())
    for label in ("mask", "no_mask"):
        assert report[label]["support"] == counts.loc["test", label], label
    assert report["macro avg"]["support"] == test_size

    reference = pd.read_csv(output_dir / "reference" / "predictions.csv")
    assert len(reference) == test_size


def test_ddp_predictions_match_one_process(ddp_run, odd_dataset):
    """The gathered test predictions equal a one-process evaluation, in the test split's order."""
    _, _, store, output_dir = ddp_run
    cfg = compose_train_config(small_training_overrides(odd_dataset, store, output_dir))
    datamodule = instantiate(cfg.data)
    datamodule.setup("test")
    checkpoint = next((output_dir / "checkpoints").glob("epoch_*.ckpt"))
    model = FaceMaskClassifier.load_from_checkpoint(
        checkpoint, pretrained=False, weights_only=True
    ).eval()
    with torch.no_grad():
        expected = torch.cat(
            [torch.softmax(model(images), dim=1) for images, _ in datamodule.test_dataloader()]
        )

    reference = pd.read_csv(output_dir / "reference" / "predictions.csv")
    actual = torch.tensor(reference[["prob_mask", "prob_no_mask"]].to_numpy(), dtype=torch.float32)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)

    targets = torch.tensor(datamodule.datasets["test"].labels)
    accuracy = (expected.argmax(dim=1) == targets).float().mean().item()
    run = _runs(store)[0]
    assert run.data.metrics["test/acc"] == pytest.approx(accuracy, abs=1e-6)


def test_drop_repeated_samples_keeps_first():
    indices = torch.tensor([0, 2, 4, 1, 3, 0])
    values = torch.tensor([10.0, 12.0, 14.0, 11.0, 13.0, 10.5])
    kept_indices, kept_values = drop_repeated_samples(indices, values)
    assert kept_indices.tolist() == [0, 1, 2, 3, 4]
    assert kept_values.tolist() == [10.0, 11.0, 12.0, 13.0, 14.0]


def _create_run(tracking_uri: str) -> str:
    client = MlflowClient(tracking_uri)
    experiment_id = client.create_experiment("guard")
    return client.create_run(experiment_id).info.run_id


def test_run_guard_fails_killed_owner_run(tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = _create_run(tracking_uri)
    completed = subprocess.run(
        [sys.executable, "-c", KILLED_OWNER_SCRIPT, tracking_uri, run_id], timeout=60, check=False
    )
    assert completed.returncode == -signal.SIGKILL
    client = MlflowClient(tracking_uri)
    deadline = time.monotonic() + 60
    while client.get_run(run_id).info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.get_run(run_id).info.status == "FAILED"


def test_run_guard_release_leaves_run_alone(tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = _create_run(tracking_uri)
    completed = subprocess.run(
        [sys.executable, "-c", RELEASING_OWNER_SCRIPT, tracking_uri, run_id],
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0
    # release() waits for the watcher to exit, so it can no longer change the run.
    assert MlflowClient(tracking_uri).get_run(run_id).info.status == "RUNNING"


def test_rank_one_failure_marks_run_failed(odd_dataset, tmp_path):
    store = tmp_path / "store"
    output_dir = tmp_path / "run"
    script = tmp_path / "train_failing.py"
    script.write_text(FAILING_TRAIN_SCRIPT)
    log_path = tmp_path / "train.log"
    completed = _run_train(
        script, _ddp_overrides(odd_dataset, store, output_dir), log_path, FAIL_RANK="1"
    )
    output = log_path.read_text()
    assert completed.returncode != 0, output[-4000:]
    assert "injected failure on rank 1" in output
    # Rank zero may have been killed by Lightning, and then the watcher ends the run.
    deadline = time.monotonic() + 60
    runs = _runs(store)
    while [run.info.status for run in runs] == ["RUNNING"] and time.monotonic() < deadline:
        time.sleep(0.5)
        runs = _runs(store)
    assert [run.info.status for run in runs] == ["FAILED"], output[-4000:]
    assert _client(store).search_registered_models() == []


def test_ddp_in_multirun_stops_at_once(odd_dataset, tmp_path):
    store = tmp_path / "store"
    overrides = small_training_overrides(
        odd_dataset, store, tmp_path / "run", "trainer=ddp_cpu", "seed=1,2"
    )
    log_path = tmp_path / "train.log"
    started = time.monotonic()
    completed = _run_train(
        project_root() / "train.py",
        ["--multirun", f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides],
        log_path,
    )
    elapsed = time.monotonic() - started
    output = log_path.read_text()
    assert completed.returncode == 2, output[-4000:]
    assert "is not supported inside a Hydra multirun sweep" in output
    assert "Initializing distributed" not in output
    assert _runs(store) == []
    assert elapsed < 60, f"took {elapsed:.0f} s"
