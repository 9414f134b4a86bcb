"""DDP support: the launch check, stopping started processes, and gathering test outputs."""

from __future__ import annotations

import signal

import lightning as L
import torch
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from facemask.tracking.sweep import current_sweep_job


class LaunchError(RuntimeError):
    """A trainer configuration that cannot start its processes in the current launch."""


def check_launch(trainer: L.Trainer) -> None:
    """Raise `LaunchError` for DDP processes that Lightning would start inside a Hydra multirun.

    Lightning starts the processes of ranks above zero by running the command line again
    (`_SubprocessScriptLauncher`, lightning 2.6), so in a multirun each of them runs the whole
    sweep on its own. The processes then train together only while every sweep picks the same
    jobs in the same order. A job that fails in one process, or a sweeper that picks different
    parameters in each process, pairs different jobs or leaves a process waiting.
    """
    launcher = trainer.strategy.launcher
    if not isinstance(launcher, _SubprocessScriptLauncher) or launcher.num_processes < 2:
        return
    if launcher.cluster_environment.creates_processes_externally or current_sweep_job() is None:
        return
    raise LaunchError(
        f"DDP with {launcher.num_processes} processes per node is not supported inside a Hydra "
        "multirun sweep, because Lightning starts the extra processes by running the command "
        "line again, so each would run the whole sweep; run the sweep with trainer.devices=1, "
        "or run each DDP training without -m"
    )


def stop_started_processes(trainer: L.Trainer) -> None:
    """Kill the processes that Lightning's launcher started from this one, if any.

    They would otherwise wait in a collective operation until DDPStrategy's timeout (30 minutes
    by default). Lightning kills them itself on Ctrl+C and SIGTERM, but not on an exception.
    """
    launcher = trainer.strategy.launcher
    if isinstance(launcher, _SubprocessScriptLauncher):
        launcher.kill(signal.SIGKILL)


def batch_sample_indices(loader: DataLoader) -> list[list[int]]:
    """Return the dataset indices of every batch that `loader` yields, in order.

    Raises:
        ValueError: The loader shuffles, so a second pass over its sampler gives other indices.
    """
    sampler = loader.sampler
    shuffled = isinstance(sampler, RandomSampler) or (
        isinstance(sampler, DistributedSampler) and sampler.shuffle
    )
    if shuffled or loader.batch_sampler is None:
        raise ValueError(
            "the test DataLoader must batch its samples without shuffling, so that test "
            "predictions can be matched with test images; build it with shuffle=False"
        )
    return [list(batch) for batch in loader.batch_sampler]


def gather_rows(
    module: L.LightningModule, local: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Concatenate the rows of `local` from all processes, in rank order.

    Every tensor in `local` has one row per sample, and `local["indices"]` contains the sample
    indices, which must be 0 or more. Processes may have different row counts.
    """
    if module.trainer.world_size == 1:
        return local
    # all_gather needs the same shape on every process, so shorter outputs are padded with
    # rows whose index is -1, and those rows are dropped again after gathering.
    rows = module.all_gather(torch.tensor(len(local["indices"]), device=module.device))
    max_rows = int(rows.max())
    padded = {}
    for key, value in local.items():
        padded[key] = value.new_full((max_rows, *value.shape[1:]), -1)
        padded[key][: len(value)] = value
    gathered = {key: value.flatten(0, 1) for key, value in module.all_gather(padded).items()}
    keep = gathered["indices"] >= 0
    return {key: value[keep] for key, value in gathered.items()}


def drop_repeated_samples(indices: torch.Tensor, *columns: torch.Tensor) -> list[torch.Tensor]:
    """Sort rows by sample index and keep the first row of each index.

    This removes the samples that DistributedSampler repeats so that every process gets as
    many. Returns the indices followed by the columns, all with the same rows.
    """
    order = torch.argsort(indices, stable=True)
    indices = indices[order]
    first = torch.ones_like(indices, dtype=torch.bool)
    first[1:] = indices[1:] != indices[:-1]
    return [indices[first], *(column[order][first] for column in columns)]
