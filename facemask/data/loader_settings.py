"""DataLoader worker, prefetch and pinning settings, derived from the CPUs of this process's share.

Every training process on a machine (one per device under DDP) starts its own DataLoader
workers, so each process sizes its workers from its share of the usable CPUs.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from facemask.data.scan import DatasetError
from facemask.hardware import usable_cpu_count

# Upper bound of the automatic worker count, because each worker keeps a copy of the dataset
# object and its prefetched batches in memory.
MAX_AUTO_WORKERS = 8

# Batches kept in flight across all workers of one loader when prefetch_factor is unset, so that a
# batch of large, not yet cached photos does not stall the training step.
MIN_BATCHES_IN_FLIGHT = 4


@dataclass(frozen=True)
class LoaderSettings:
    """Resolved `torch.utils.data.DataLoader` arguments."""

    num_workers: int
    persistent_workers: bool
    prefetch_factor: int | None
    pin_memory: bool


def local_process_count(trainer_devices: int | None = None) -> int:
    """Return how many training processes share this machine.

    `trainer_devices` is the attached Trainer's `num_devices`. Without a Trainer the
    `LOCAL_WORLD_SIZE` variable that torchrun sets is used, and 1 without either.
    """
    if trainer_devices is not None:
        return max(1, trainer_devices)
    value = os.environ.get("LOCAL_WORLD_SIZE", "")
    return max(1, int(value)) if value.isdigit() else 1


def default_num_workers(local_processes: int = 1, cpu_count: int | None = None) -> int:
    """Return this process's CPU share minus one for the training loop, from 1 to 8 workers."""
    cpus = usable_cpu_count() if cpu_count is None else cpu_count
    share = cpus // max(1, local_processes)
    return max(1, min(MAX_AUTO_WORKERS, share - 1))


def resolve_loader_settings(
    *,
    num_workers: int | None,
    persistent_workers: bool | None,
    prefetch_factor: int | None,
    pin_memory: bool | None,
    local_processes: int,
    on_cuda: bool,
    cpu_count: int | None = None,
) -> LoaderSettings:
    """Replace each None by its automatic value and check the explicit ones.

    Raises:
        DatasetError: A worker count below 0, a prefetch factor below 1, or a prefetch factor or
            persistent workers without workers.
    """
    pin = on_cuda if pin_memory is None else pin_memory
    if num_workers is None:
        num_workers = default_num_workers(local_processes, cpu_count)
    if num_workers < 0:
        raise DatasetError(
            f"data.num_workers={num_workers} is invalid. Use 0 or more, or null for automatic."
        )
    if num_workers == 0:
        if prefetch_factor is not None or persistent_workers:
            raise DatasetError(
                f"data.prefetch_factor={prefetch_factor} and data.persistent_workers="
                f"{persistent_workers} need worker processes, but data.num_workers=0. Set them "
                "to null, or set data.num_workers to 1 or more."
            )
        return LoaderSettings(0, persistent_workers=False, prefetch_factor=None, pin_memory=pin)
    if prefetch_factor is None:
        prefetch_factor = max(2, math.ceil(MIN_BATCHES_IN_FLIGHT / num_workers))
    if prefetch_factor < 1:
        raise DatasetError(
            f"data.prefetch_factor={prefetch_factor} is invalid. Use 1 or more, or null."
        )
    persistent = True if persistent_workers is None else persistent_workers
    return LoaderSettings(num_workers, persistent, prefetch_factor, pin)
