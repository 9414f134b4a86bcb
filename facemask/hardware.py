"""Hardware facts that choose training settings: usable CPUs and native bfloat16 support.

`auto_precision` is registered as an OmegaConf resolver, so `conf/trainer/default.yaml` can set
`precision: ${auto_precision:${trainer.accelerator}}` and every resolved copy of the config (the
logged parameters, `config.yaml`) shows the precision that the Trainer actually uses.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

PRECISION_RESOLVER = "auto_precision"

# /proc/cpuinfo flags of x86 CPUs with bfloat16 dot-product instructions: AVX512-BF16 (Cooper
# Lake, Zen 4 and later) and AMX-BF16 (Sapphire Rapids and later). oneDNN also runs bfloat16 on
# other AVX-512 CPUs by converting to fp32, but the bf16 speed-up was measured only on a CPU
# with AVX512-BF16, so those CPUs keep fp32.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")

CPUINFO_PATH = Path("/proc/cpuinfo")


def usable_cpu_count() -> int:
    """Return the number of CPUs this process may run on, which a container or taskset can limit."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_flags(cpuinfo: Path = CPUINFO_PATH) -> set[str]:
    """Return the feature flags of the first CPU in `cpuinfo`; empty where the file is missing."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def cpu_has_native_bf16(cpuinfo: Path = CPUINFO_PATH) -> bool:
    """Return whether oneDNN is available and the CPU runs bfloat16 natively (see CPU_BF16_FLAGS).

    NOTE: only x86 flags are checked, so ARM CPUs with BF16 instructions fall back to fp32.
    """
    import torch

    if not torch.backends.mkldnn.is_available():
        return False
    return any(flag in cpu_flags(cpuinfo) for flag in CPU_BF16_FLAGS)


def resolve_precision(accelerator: str, cpuinfo: Path = CPUINFO_PATH) -> str:
    """Return the Lightning precision to train with on `accelerator`.

    - CUDA: `bf16-mixed` where the GPU supports bfloat16 natively (Ampere and later), else
      `16-mixed`.
    - CPU: `bf16-mixed` where `cpu_has_native_bf16`, else `32-true`.
    - Anything else (MPS, TPU): `32-true`.

    `auto` and `gpu` follow Lightning's choice: CUDA when a CUDA device is present.
    """
    import torch

    name = str(accelerator).lower()
    if name in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        # NOTE: this initialises CUDA in the calling process, which the `ddp_fork` strategy rejects.
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        return "bf16-mixed" if native else "16-mixed"
    if name in ("auto", "cpu"):
        return "bf16-mixed" if cpu_has_native_bf16(cpuinfo) else "32-true"
    return "32-true"


def register_config_resolvers() -> None:
    """Register `auto_precision` with OmegaConf; calling it again changes nothing."""
    if not OmegaConf.has_resolver(PRECISION_RESOLVER):
        OmegaConf.register_new_resolver(PRECISION_RESOLVER, resolve_precision)
