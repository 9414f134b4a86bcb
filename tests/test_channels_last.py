"""channels_last training: weights and batches in NHWC during fit and test, contiguous after."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from facemask.models.classifier import FaceMaskClassifier


class MemoryFormatProbe(Callback):
    """Record the memory format of the first convolution's weight and input at each step."""

    def __init__(self):
        self.weights: list[bool] = []
        self.inputs: list[bool] = []

    def setup(self, trainer, pl_module, stage):
        conv = pl_module.backbone.conv1
        conv.register_forward_pre_hook(lambda module, args: self._record(module, args[0]))

    def _record(self, module: torch.nn.Module, images: torch.Tensor) -> None:
        self.weights.append(module.weight.is_contiguous(memory_format=torch.channels_last))
        self.inputs.append(images.is_contiguous(memory_format=torch.channels_last))


def _loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 32, 32, generator=generator)
    targets = torch.randint(0, 2, (8,), generator=generator)
    return DataLoader(TensorDataset(images, targets), batch_size=4)


def _fit_and_test(channels_last: bool) -> tuple[FaceMaskClassifier, MemoryFormatProbe]:
    model = FaceMaskClassifier(pretrained=False, channels_last=channels_last)
    probe = MemoryFormatProbe()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        callbacks=[probe],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, train_dataloaders=_loader(), val_dataloaders=_loader())
    trainer.test(model, dataloaders=_loader(), verbose=False)
    return model, probe


def test_channels_last_during_run_contiguous_after():
    model, probe = _fit_and_test(channels_last=True)
    # Sanity check, training and validation, then testing: every forward pass saw NHWC.
    assert len(probe.weights) >= 6
    assert all(probe.weights)
    assert all(probe.inputs)
    for name, parameter in model.named_parameters():
        assert parameter.is_contiguous(), name
    exported = model.probability_model()
    assert exported.backbone.conv1.weight.is_contiguous()
    # Outside a Trainer run the module no longer converts its inputs.
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert probe.inputs[-1] is False


def test_channels_last_off_keeps_nchw():
    model, probe = _fit_and_test(channels_last=False)
    assert probe.weights
    assert not any(probe.weights)
    assert not any(probe.inputs)
