"""The LightningModule: a timm backbone, cross-entropy training and torchmetrics evaluation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import ClasswiseWrapper, MaxMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from facemask.models.backbone import create_backbone

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


def _summary_metrics(num_classes: int, prefix: str) -> MetricCollection:
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "balanced_acc": MulticlassAccuracy(num_classes, average="macro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
            "precision": MulticlassPrecision(num_classes, average="macro"),
            "recall": MulticlassRecall(num_classes, average="macro"),
            "auroc": MulticlassAUROC(num_classes, average="macro"),
        },
        prefix=prefix,
    )


def _per_class_metrics(class_names: Sequence[str], prefix: str) -> MetricCollection:
    n = len(class_names)
    labels = list(class_names)
    return MetricCollection(
        {
            "precision": ClasswiseWrapper(
                MulticlassPrecision(n, average=None), labels=labels, prefix="precision_"
            ),
            "recall": ClasswiseWrapper(
                MulticlassRecall(n, average=None), labels=labels, prefix="recall_"
            ),
            "f1": ClasswiseWrapper(MulticlassF1Score(n, average=None), labels=labels, prefix="f1_"),
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

        n = len(class_names)
        self.train_acc = MulticlassAccuracy(n, average="micro")
        self.val_metrics = _summary_metrics(n, "val/")
        self.val_acc_best = MaxMetric()
        self.test_metrics = _summary_metrics(n, "test/")
        self.test_per_class = _per_class_metrics(class_names, "test/")
        self.test_confusion = MulticlassConfusionMatrix(n)
        self._test_probs: list[torch.Tensor] = []
        self._test_targets: list[torch.Tensor] = []
        self.test_results: dict[str, torch.Tensor] = {}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def probability_model(self) -> ProbabilityModel:
        """Return the backbone with a softmax output, for export and serving."""
        return ProbabilityModel(self.backbone)

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
            "train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size
        )
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
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, batch_size=targets.shape[0])

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.val_metrics.reset()
        if self.trainer.sanity_checking:
            return
        accuracy = values.pop("val/acc")
        self.val_acc_best(accuracy)
        self.log("val/acc", accuracy, prog_bar=True)
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)
        self.log_dict(values)

    def on_test_epoch_start(self) -> None:
        self._test_probs.clear()
        self._test_targets.clear()

    def test_step(self, batch, batch_idx: int) -> None:
        loss, probs, targets = self._shared_step(batch)
        self.test_metrics.update(probs, targets)
        self.test_per_class.update(probs, targets)
        self.test_confusion.update(probs, targets)
        self._test_probs.append(probs.detach().cpu())
        self._test_targets.append(targets.detach().cpu())
        self.log("test/loss", loss, on_epoch=True, batch_size=targets.shape[0])

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute())
        self.log_dict(self.test_per_class.compute())
        self.test_results = {
            "probs": torch.cat(self._test_probs) if self._test_probs else torch.empty(0),
            "targets": torch.cat(self._test_targets) if self._test_targets else torch.empty(0),
            "confusion": self.test_confusion.compute().cpu(),
        }
        self.test_metrics.reset()
        self.test_per_class.reset()
        self.test_confusion.reset()

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
