"""A Lightning callback that runs the model in channels_last memory format during a Trainer run.

oneDNN (CPU) and cuDNN (GPU, mixed precision) run convolutions in NHWC order. With NCHW weights
and inputs every convolution reorders its input and output. `scripts/bench_train.py` measures the
difference on the project's pipeline; docs/benchmarks.md has its figures.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.hooks import RemovableHandle


def _inputs_to_channels_last(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(
        arg.contiguous(memory_format=torch.channels_last)
        if isinstance(arg, torch.Tensor) and arg.dim() == 4
        else arg
        for arg in args
    )


class ChannelsLast(Callback):
    """Convert the LightningModule's 4-D weights and inputs to channels_last for one run.

    From `setup` to `teardown` the weights are channels_last and a forward pre-hook converts
    each 4-D tensor argument of the module's forward. `teardown` removes the hook and makes the
    weights contiguous again, so checkpoints hold channels_last tensors but the module that
    training hands to export and serving is contiguous.
    """

    def __init__(self):
        self._hook: RemovableHandle | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning calls this before the strategy wraps the module (DDP) and before the
        # optimizer is built, so both see the converted parameters.
        pl_module.to(memory_format=torch.channels_last)
        if self._hook is None:
            self._hook = pl_module.register_forward_pre_hook(_inputs_to_channels_last)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        pl_module.to(memory_format=torch.contiguous_format)
