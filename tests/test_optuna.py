"""`hparams_search=optuna`: a real Optuna search over short trainings on real photos."""

from __future__ import annotations

import subprocess
from pathlib import Path

import optuna
import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from facemask.settings import project_root
from facemask.tracking.optuna_storage import open_storage
from facemask.tracking.sweep import SWEEP_ID_TAG, SWEEP_JOB_TAG, SweepJob, sweep_run_name
from tests.helpers import copy_real_subset, run_train_cli, small_training_overrides

SEARCHED_KEYS = {"model", "model.optimizer.lr", "data.batch_size", "data.augment.strength"}


def _search(
    tmp_path: Path, data_root: Path, study: str, trials: int
) -> subprocess.CompletedProcess:
    store = tmp_path / "store"
    overrides = [
        override
        for override in small_training_overrides(data_root, store, tmp_path / "unused")
        if not override.startswith(("paths.output_dir=", "model.optimizer.lr=", "data.batch_size="))
    ]
    args = [
        "-m",
        "hparams_search=optuna",
        *overrides,
        "data.image_size=48",
        f"hydra.sweeper.n_trials={trials}",
        "hydra.sweeper.sampler.n_startup_trials=2",
        f"hydra.sweeper.study_name={study}",
        f"hydra.sweeper.storage.url=sqlite:///{store / 'optuna.db'}",
        f"hydra.sweep.dir={tmp_path / study}",
    ]
    return run_train_cli(args, cwd=tmp_path)


def test_optuna_search_runs_trials_as_mlflow_runs(tmp_path, real_data_root):
    data_root = copy_real_subset(real_data_root, tmp_path / "data", 12)
    result = _search(tmp_path, data_root, "study-a", trials=3)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Best parameters:" in output

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("facemask")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 3
    assert {run.info.status for run in runs} == {"FINISHED"}
    assert sorted(run.data.tags[SWEEP_JOB_TAG] for run in runs) == ["0", "1", "2"]
    assert {run.data.tags[SWEEP_ID_TAG] for run in runs} == {"study-a"}
    for run in runs:
        assert "lr=" in run.info.run_name
        assert "strength=" in run.info.run_name
    # Trials compare runs; they register no model.
    assert client.search_registered_models() == []

    storage = f"sqlite:///{tmp_path / 'store' / 'optuna.db'}"
    study = optuna.load_study(study_name="study-a", storage=storage)
    assert len(study.trials) == 3
    assert {trial.state for trial in study.trials} == {optuna.trial.TrialState.COMPLETE}
    assert set(study.best_params) == SEARCHED_KEYS
    # A trial's value is the validation accuracy of its run's one epoch.
    trial_values = sorted(trial.value for trial in study.trials)
    run_values = sorted(run.data.metrics["val/acc"] for run in runs)
    assert trial_values == pytest.approx(run_values)

    summary = OmegaConf.load(tmp_path / "study-a" / "optimization_results.yaml")
    assert summary.best_value == pytest.approx(study.best_value)

    # The same study name continues the stored study.
    again = _search(tmp_path, data_root, "study-a", trials=1)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert len(optuna.load_study(study_name="study-a", storage=storage).trials) == 4


def test_open_storage_creates_sqlite_folder(tmp_path):
    database = tmp_path / "deep" / "folder" / "optuna.db"
    storage = open_storage(f"sqlite:///{database}")
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    study.optimize(lambda trial: trial.suggest_float("x", 0.0, 1.0), n_trials=2)
    assert database.is_file()
    reloaded = optuna.load_study(study_name="s", storage=f"sqlite:///{database}")
    assert len(reloaded.trials) == 2


def test_open_storage_without_url_keeps_memory():
    assert open_storage(None) is None


def test_search_config_space_and_direction():
    with initialize_config_dir(config_dir=str(project_root() / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="train", overrides=["hparams_search=optuna"], return_hydra_config=True
        )
    assert set(cfg.hydra.sweeper.params) == SEARCHED_KEYS
    assert cfg.hydra.sweeper.direction == "maximize"
    assert cfg.hydra.sweeper.storage._target_ == "facemask.tracking.optuna_storage.open_storage"
    assert cfg.registry.register is False


def test_sweep_run_name_shortens_sampled_floats():
    job = SweepJob(
        sweep_id="s",
        sweep_dir="/tmp/s",
        job_num=4,
        overrides=["model=resnet18", "model.optimizer.lr=0.0007661100707771367", "seed=3"],
        swept_keys=frozenset({"model", "model.optimizer.lr"}),
    )
    assert sweep_run_name("resnet18", job) == "resnet18-lr=0.000766#4"
