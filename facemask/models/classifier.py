"""The LightningModule: a timm backbone, cross-entropy training and torchmetrics evaluation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn import functional as F
from torchmetrics import ClasswiseWrapper, MaxMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from facemask.distributed import batch_sample_indices, drop_repeated_samples, gather_rows
from facemask.models.backbone import create_backbone
from facemask.models.channels_last import ChannelsLast

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


def _summary_metrics(num_classes: int, prefix: str, **options: Any) -> MetricCollection:
    # `options` are torchmetrics Metric arguments such as sync_on_compute.
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro", **options),
            "balanced_acc": MulticlassAccuracy(num_classes, average="macro", **options),
            "f1": MulticlassF1Score(num_classes, average="macro", **options),
            "precision": MulticlassPrecision(num_classes, average="macro", **options),
            "recall": MulticlassRecall(num_classes, average="macro", **options),
            "auroc": MulticlassAUROC(num_classes, average="macro", **options),
        },
        prefix=prefix,
    )


def _per_class_metrics(class_names: Sequence[str], prefix: str, **options: Any) -> MetricCollection:
    n = len(class_names)
    labels = list(class_names)
    return MetricCollection(
        {
            "precision": ClasswiseWrapper(
                MulticlassPrecision(n, average=None, **options), labels=labels, prefix="precision_"
            ),
            "recall": ClasswiseWrapper(
                MulticlassRecall(n, average=None, **options), labels=labels, prefix="recall_"
            ),
            "f1": ClasswiseWrapper(
                MulticlassF1Score(n, average=None, **options), labels=labels, prefix="f1_"
            ),
        },
        prefix=prefix,
        compute_groups=False,
    )


class ProbabilityModel(nn.Module):
    """A backbone followed by softmax: NCHW normalised images in, class probabilities out."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.backbone(images), dim=1)


class FaceMaskClassifier(L.LightningModule):
    """Image classifier over a timm backbone.

    Args:
        name: timm model name.
        class_names: Class names in output order; their count sets the head size.
        pretrained: Start from timm's downloaded pretrained weights.
        weights_file: Local timm weights to start from instead of downloading.
        optimizer: Factory called with `params=`; defaults to Adam with lr 1e-4.
        scheduler: Optional factory called with `optimizer=`, stepped once per epoch.
        label_smoothing: Cross-entropy label smoothing.
        num_classes: Must equal `len(class_names)` when given; the data decides it.
        channels_last: Train and test with weights and inputs in channels_last memory format
            (see `facemask.models.channels_last`).
    """

    def __init__(
        self,
        name: str = "resnet18",
        class_names: Sequence[str] = ("mask", "no_mask"),
        pretrained: bool = True,
        weights_file: str | Path | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        label_smoothing: float = 0.0,
        num_classes: int | None = None,
        channels_last: bool = False,
    ):
        super().__init__()
        class_names = list(class_names)
        if num_classes is not None and num_classes != len(class_names):
            raise ValueError(
                f"model.num_classes={num_classes} but the data has {len(class_names)} classes "
                f"{class_names}; leave model.num_classes unset, it is derived from the data"
            )
        # Factories are Hydra partials that do not pickle under weights_only loading, and the
        # resolved config is logged separately.
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "num_classes"])
        self.class_names = class_names
        self.backbone = create_backbone(
            name, len(class_names), pretrained=pretrained, weights_file=weights_file
        )
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.channels_last = channels_last

        n = len(class_names)
        self.train_acc = MulticlassAccuracy(n, average="micro")
        self.val_metrics = _summary_metrics(n, "val/")
        self.val_acc_best = MaxMetric()
        # The test metrics are computed once from the predictions of all processes, which every
        # process gathers in on_test_epoch_end, so torchmetrics must not sum them again.
        self.test_metrics = _summary_metrics(n, "test/", sync_on_compute=False)
        self.test_per_class = _per_class_metrics(class_names, "test/", sync_on_compute=False)
        self.test_confusion = MulticlassConfusionMatrix(n, sync_on_compute=False)
        self._test_batch_indices: list[list[int]] = []
        self._test_outputs: list[dict[str, torch.Tensor]] = []
        # Predictions on the whole test split, one row per test image in dataset order:
        # `indices`, `probs`, `targets` and the `confusion` matrix.
        self.test_results: dict[str, torch.Tensor] = {}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def probability_model(self) -> ProbabilityModel:
        """Return the backbone with a softmax output, for export and serving."""
        return ProbabilityModel(self.backbone)

    def configure_callbacks(self) -> list[Callback]:
        return [ChannelsLast()] if self.channels_last else []

    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor]):
        images, targets = batch
        logits = self(images)
        loss = self.criterion(logits, targets)
        probs = torch.softmax(logits.float(), dim=1)
        return loss, probs, targets

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, probs, targets = self._shared_step(batch)
        self.train_acc(probs, targets)
        batch_size = targets.shape[0]
        self.log(
            "train/loss",
            loss,
            on_step=True,
            on_epoch=True,
            prog_bar=True,
            batch_size=batch_size,
            sync_dist=True,
        )
        # A torchmetrics object is synchronised across processes by torchmetrics itself.
        self.log(
            "train/acc",
            self.train_acc,
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            batch_size=batch_size,
        )
        return loss

    def on_validation_epoch_start(self) -> None:
        self.val_metrics.reset()

    def validation_step(self, batch, batch_idx: int) -> None:
        loss, probs, targets = self._shared_step(batch)
        self.val_metrics.update(probs, targets)
        self.log(
            "val/loss",
            loss,
            on_epoch=True,
            prog_bar=True,
            batch_size=targets.shape[0],
            sync_dist=True,
        )

    def on_validation_epoch_end(self) -> None:
        # compute() synchronises the metric states of all processes, so every process gets the
        # same values.
        values = self.val_metrics.compute()
        self.val_metrics.reset()
        if self.trainer.sanity_checking:
            return
        accuracy = values.pop("val/acc")
        self.val_acc_best(accuracy)
        self._log_equal_on_all_processes(
            {"val/acc": accuracy, "val/acc_best": self.val_acc_best.compute()}, prog_bar=True
        )
        self._log_equal_on_all_processes(values)

    def on_test_epoch_start(self) -> None:
        self._test_outputs.clear()
        loaders = self.trainer.test_dataloaders
        loader = loaders[0] if isinstance(loaders, Sequence) else loaders
        self._test_batch_indices = batch_sample_indices(loader)

    def test_step(self, batch, batch_idx: int) -> None:
        images, targets = batch
        logits = self(images).float()
        indices = self._test_batch_indices[batch_idx]
        if len(indices) != len(targets):
            raise RuntimeError(
                f"test batch {batch_idx} has {len(targets)} images but its sampler listed "
                f"{len(indices)} indices; the test DataLoader must not drop or add samples"
            )
        loss_options = {"label_smoothing": self.criterion.label_smoothing}
        self._test_outputs.append(
            {
                "indices": torch.as_tensor(indices, dtype=torch.long, device=targets.device),
                "probs": torch.softmax(logits, dim=1).detach(),
                "targets": targets.detach(),
                # Per image, so that test/loss counts each test image once after deduplication.
                "losses": F.cross_entropy(
                    logits, targets, reduction="none", **loss_options
                ).detach(),
            }
        )

    def on_test_epoch_end(self) -> None:
        outputs = self._gather_test_outputs()
        indices, probs, targets, losses = drop_repeated_samples(
            outputs["indices"], outputs["probs"], outputs["targets"], outputs["losses"]
        )
        if len(indices):
            self.test_metrics.update(probs, targets)
            self.test_per_class.update(probs, targets)
            self.test_confusion.update(probs, targets)
            self._log_equal_on_all_processes(
                {
                    "test/loss": losses.mean(),
                    **self.test_metrics.compute(),
                    **self.test_per_class.compute(),
                }
            )
        self.test_results = {
            "indices": indices.cpu(),
            "probs": probs.cpu(),
            "targets": targets.cpu(),
            "confusion": self.test_confusion.compute().cpu(),
        }
        self.test_metrics.reset()
        self.test_per_class.reset()
        self.test_confusion.reset()
        self._test_outputs.clear()

    def _gather_test_outputs(self) -> dict[str, torch.Tensor]:
        """Concatenate the test outputs of this process, then gather those of all processes."""
        if self._test_outputs:
            local = {
                key: torch.cat([batch[key] for batch in self._test_outputs])
                for key in self._test_outputs[0]
            }
        else:
            empty = {"device": self.device}
            local = {
                "indices": torch.empty(0, dtype=torch.long, **empty),
                "probs": torch.empty(0, len(self.class_names), **empty),
                "targets": torch.empty(0, dtype=torch.long, **empty),
                "losses": torch.empty(0, **empty),
            }
        return gather_rows(self, local)

    def _log_equal_on_all_processes(self, values: dict[str, torch.Tensor], **options: Any) -> None:
        # Every process has the same values here. Averaging equal values leaves them as they
        # are (up to float rounding), and sync_dist=True stops Lightning from warning that
        # epoch-level values of several processes are logged without synchronising them.
        self.log_dict(values, sync_dist=True, **options)

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            optimizer = torch.optim.Adam(self.parameters(), lr=1e-4)
        else:
            optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }
