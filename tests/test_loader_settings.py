"""DataLoader settings: worker counts from the CPU share of each process, prefetch and pinning."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest

from facemask.data.datamodule import FaceMaskDataModule
from facemask.data.loader_settings import (
    LoaderSettings,
    default_num_workers,
    local_process_count,
    resolve_loader_settings,
)
from tests.helpers import copy_real_subset


@pytest.mark.parametrize(
    ("cpus", "processes", "expected"),
    [
        (2, 1, 1),
        (1, 1, 1),
        (8, 1, 7),
        (8, 2, 3),
        (8, 4, 1),
        (8, 16, 1),
        (64, 1, 8),
        (64, 4, 8),
        (16, 4, 3),
    ],
)
def test_default_workers_share_cpus(cpus: int, processes: int, expected: int):
    assert default_num_workers(processes, cpu_count=cpus) == expected


def _resolve(**options: object) -> LoaderSettings:
    values = {
        "num_workers": None,
        "persistent_workers": None,
        "prefetch_factor": None,
        "pin_memory": None,
        "local_processes": 1,
        "on_cuda": False,
        "cpu_count": 8,
    }
    values.update(options)
    return resolve_loader_settings(**values)


def test_automatic_settings():
    assert _resolve() == LoaderSettings(7, True, 2, False)
    assert _resolve(cpu_count=2) == LoaderSettings(1, True, 4, False)
    assert _resolve(cpu_count=8, local_processes=4) == LoaderSettings(1, True, 4, False)
    assert _resolve(on_cuda=True).pin_memory is True


def test_explicit_settings_win():
    settings = _resolve(num_workers=3, persistent_workers=False, prefetch_factor=6, pin_memory=True)
    assert settings == LoaderSettings(3, False, 6, True)


def test_zero_workers_load_in_main_process():
    assert _resolve(num_workers=0) == LoaderSettings(0, False, None, False)
    assert _resolve(num_workers=0, persistent_workers=False).persistent_workers is False


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_workers": -1}, "data.num_workers=-1"),
        ({"num_workers": 0, "prefetch_factor": 2}, "need worker processes"),
        ({"num_workers": 0, "persistent_workers": True}, "need worker processes"),
        ({"num_workers": 2, "prefetch_factor": 0}, "data.prefetch_factor=0"),
    ],
)
def test_invalid_settings_are_rejected(options: dict, message: str):
    with pytest.raises(ValueError, match=message):
        _resolve(**options)


def test_local_processes_from_trainer_or_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert local_process_count() == 1
    assert local_process_count(trainer_devices=4) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert local_process_count() == 3
    assert local_process_count(trainer_devices=2) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "not a number")
    assert local_process_count() == 1


@pytest.fixture(scope="module")
def datamodule(tmp_path_factory, real_data_root: Path) -> FaceMaskDataModule:
    root = copy_real_subset(real_data_root, tmp_path_factory.mktemp("loader-data"), 8)
    datamodule = FaceMaskDataModule(root, image_size=32, batch_size=4, cache_dir=None)
    datamodule.setup()
    return datamodule


def test_ddp_trainer_divides_cpus(datamodule: FaceMaskDataModule, monkeypatch):
    monkeypatch.setattr("facemask.data.loader_settings.usable_cpu_count", lambda: 8)
    datamodule.trainer = None
    assert datamodule.loader_settings().num_workers == 7
    # Building a DDP Trainer starts no processes; that happens in fit().
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    datamodule.trainer = trainer
    try:
        assert datamodule.loader_settings().num_workers == 3
        loader = datamodule.train_dataloader()
    finally:
        datamodule.trainer = None
    assert loader.num_workers == 3
    assert loader.persistent_workers is True
    assert loader.prefetch_factor == 2
    assert loader.pin_memory is False
