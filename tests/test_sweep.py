"""Hydra multirun sweeps: one tagged, named MLflow run per job; a failed job does not stop it."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from facemask.tracking.sweep import SWEEP_ID_TAG, SWEEP_JOB_TAG, SweepJob, sweep_run_name
from tests.helpers import copy_real_subset, run_train_cli, small_training_overrides


def test_sweep_run_name_shortens_overrides():
    job = SweepJob(
        sweep_id="2026-01-01_00-00-00",
        sweep_dir="/tmp/sweep",
        job_num=3,
        overrides=["model=efficientnet_b0", "model.optimizer.lr=0.001", "data.root=/data/x"],
    )
    assert sweep_run_name("efficientnet_b0", job) == "efficientnet_b0-lr=0.001#3"


def test_sweep_run_name_keeps_swept_keys():
    job = SweepJob(
        sweep_id="s",
        sweep_dir="/tmp/s",
        job_num=1,
        overrides=["data.image_size=64", "model=resnet18", "model.optimizer.lr=0.001", "seed=3"],
        swept_keys=frozenset({"model", "model.optimizer.lr", "seed"}),
    )
    assert sweep_run_name("resnet18", job) == "resnet18-lr=0.001,seed=3#1"


def test_sweep_run_name_cuts_long_overrides():
    overrides = [f"trainer.option_{i}=value_{i}" for i in range(20)]
    job = SweepJob(sweep_id="s", sweep_dir="/tmp/s", job_num=0, overrides=overrides)
    name = sweep_run_name("resnet18", job)
    assert name.startswith("resnet18-option_0=value_0,")
    assert name.endswith("...#0")
    assert len(name) < 80


def test_multirun_continues_after_failed_job(tmp_path, real_data_root):
    data_root = copy_real_subset(real_data_root, tmp_path / "data", 8)
    store = tmp_path / "store"
    # Each job writes to its own sweep sub-folder and the learning rate is the swept key.
    overrides = [
        override
        for override in small_training_overrides(data_root, store, tmp_path / "unused")
        if not override.startswith(("paths.output_dir=", "model.optimizer.lr="))
    ]
    args = [
        "-m",
        *overrides,
        # Adam rejects a negative learning rate once training starts, after the run exists.
        "model.optimizer.lr=-1,1e-3",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    result = run_train_cli(args, cwd=tmp_path, timeout=180)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Sweep job 0 failed (overrides:" in output
    assert "model.optimizer.lr=-1" in output

    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("facemask")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2
    by_job = {run.data.tags[SWEEP_JOB_TAG]: run for run in runs}
    assert sorted(by_job) == ["0", "1"]
    assert by_job["0"].info.status == "FAILED"
    assert by_job["1"].info.status == "FINISHED"
    sweep_ids = {run.data.tags[SWEEP_ID_TAG] for run in runs}
    assert sweep_ids == {"sweep"}
    names = {run.info.run_name for run in runs}
    assert len(names) == 2
    assert by_job["0"].info.run_name.startswith("resnet18-")
    assert by_job["0"].info.run_name == "resnet18-lr=-1#0"
    assert by_job["1"].info.run_name == "resnet18-lr=0.001#1"
    assert "model.optimizer.lr=0.001" in by_job["1"].data.tags["sweep.overrides"]
    assert (tmp_path / "sweep" / "1" / "checkpoints").is_dir()
