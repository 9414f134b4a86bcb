"""Precision resolution from the CPU's flags, and the precision that the composed config uses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from facemask.hardware import cpu_flags, cpu_has_native_bf16, resolve_precision
from tests.helpers import compose_train_config

# Flag lines as Linux prints them: a Zen 4 server with AVX512-BF16, a Sapphire Rapids server
# with AMX, and a Skylake server with AVX-512 but no bfloat16 instructions.
ZEN4_FLAGS = "fpu sse2 avx2 avx512f avx512bw avx512vl avx512_bf16 avx512_vnni"
SAPPHIRE_RAPIDS_FLAGS = "fpu sse2 avx2 avx512f avx512bw amx_bf16 amx_tile amx_int8"
SKYLAKE_FLAGS = "fpu sse2 avx2 avx512f avx512bw avx512vl avx512dq"


def _cpuinfo(tmp_path: Path, flags: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(
        f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: {flags}\n\n"
        f"processor\t: 1\nmodel name\t: Test CPU\nflags\t\t: {flags}\n",
        encoding="utf-8",
    )
    return path


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (ZEN4_FLAGS, "bf16-mixed"),
        (SAPPHIRE_RAPIDS_FLAGS, "bf16-mixed"),
        (SKYLAKE_FLAGS, "32-true"),
        ("", "32-true"),
    ],
)
@pytest.mark.parametrize("accelerator", ["cpu", "auto"])
def test_cpu_precision_follows_flags(
    tmp_path: Path, no_cuda: None, flags: str, expected: str, accelerator: str
):
    assert resolve_precision(accelerator, _cpuinfo(tmp_path, flags)) == expected


def test_missing_cpuinfo_means_fp32(tmp_path: Path, no_cuda: None):
    assert cpu_flags(tmp_path / "absent") == set()
    assert resolve_precision("cpu", tmp_path / "absent") == "32-true"


def test_no_onednn_means_fp32(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert not cpu_has_native_bf16(_cpuinfo(tmp_path, ZEN4_FLAGS))


@pytest.mark.parametrize("accelerator", ["mps", "tpu", "gpu"])
def test_other_accelerators_use_fp32(tmp_path: Path, no_cuda: None, accelerator: str):
    assert resolve_precision(accelerator, _cpuinfo(tmp_path, ZEN4_FLAGS)) == "32-true"


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16-mixed"), (False, "16-mixed")])
def test_cuda_precision_follows_bf16_support(
    monkeypatch: pytest.MonkeyPatch, native: bool, expected: str
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation: native)
    for accelerator in ("gpu", "cuda", "auto"):
        assert resolve_precision(accelerator) == expected


def test_config_resolves_precision_for_accelerator():
    cfg = compose_train_config(["trainer=cpu", "paths.output_dir=/tmp/unused"])
    assert cfg.trainer.precision == resolve_precision("cpu")
    assert OmegaConf.to_container(cfg, resolve=True)["trainer"]["precision"] in (
        "bf16-mixed",
        "32-true",
    )


def test_precision_override_wins():
    cfg = compose_train_config(["trainer.precision=32-true", "paths.output_dir=/tmp/unused"])
    assert cfg.trainer.precision == "32-true"


def test_logged_params_show_resolved_precision(trained_model):
    run = MlflowClient(trained_model.tracking_uri).get_run(trained_model.run_id)
    assert run.data.params["trainer/precision"] == resolve_precision("cpu")
    assert run.data.params["model/channels_last"] == "True"
