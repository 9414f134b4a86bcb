"""Test-set reports: confusion matrix and ROC plots, classification report."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # Files only; no display is needed or assumed.

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay, classification_report  # noqa: E402


def save_figure(fig: plt.Figure, path: Path, dpi: int = 120) -> Path:
    """Write `fig` as a PNG at `path`, release its memory, and return `path`."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_confusion_matrix(
    confusion: np.ndarray,
    class_names: Sequence[str],
    path: Path,
    title: str = "Test confusion matrix",
) -> Path:
    """Write the confusion matrix (rows: true class, columns: predicted class) as a PNG."""
    fig, ax = plt.subplots(figsize=(4 + len(class_names), 3.5 + len(class_names)))
    ConfusionMatrixDisplay(confusion, display_labels=list(class_names)).plot(
        ax=ax, cmap="Blues", colorbar=False, values_format="d"
    )
    ax.set_title(title)
    return save_figure(fig, path)


def plot_roc_curves(
    targets: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    path: Path,
    title: str = "Test ROC, one class against the rest",
) -> Path:
    """Write one-vs-rest ROC curves, one per class, as a PNG."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for index, name in enumerate(class_names):
        positives = targets == index
        if positives.all() or not positives.any():
            continue  # ROC is undefined without both positives and negatives.
        RocCurveDisplay.from_predictions(positives, probs[:, index], name=name, ax=ax)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    ax.set_title(title)
    return save_figure(fig, path)


def write_classification_report(
    targets: np.ndarray, probs: np.ndarray, class_names: Sequence[str], folder: Path
) -> list[Path]:
    """Write scikit-learn's classification report as text and JSON; returns both paths."""
    predictions = probs.argmax(axis=1)
    labels = list(range(len(class_names)))
    kwargs = {"labels": labels, "target_names": list(class_names), "zero_division": 0}
    text_path = folder / "classification_report.txt"
    text_path.write_text(classification_report(targets, predictions, digits=4, **kwargs))
    json_path = folder / "classification_report.json"
    report = classification_report(targets, predictions, output_dict=True, **kwargs)
    json_path.write_text(json.dumps(report, indent=2))
    return [text_path, json_path]


def write_test_reports(
    targets: np.ndarray,
    probs: np.ndarray,
    confusion: np.ndarray,
    class_names: Sequence[str],
    folder: Path,
) -> list[Path]:
    """Write every test report into `folder`; returns the written paths."""
    folder.mkdir(parents=True, exist_ok=True)
    return [
        plot_confusion_matrix(confusion, class_names, folder / "confusion_matrix.png"),
        plot_roc_curves(targets, probs, class_names, folder / "roc_curves.png"),
        *write_classification_report(targets, probs, class_names, folder),
    ]
