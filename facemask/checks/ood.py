"""OOD validation: classify pictures from other sources, which training never uses."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from facemask.checks.pictures import (
    PICTURE_ERRORS,
    PictureClassifier,
    SkippedPicture,
    chunks,
    report_skipped,
    write_csv,
)
from facemask.checks.settings import CheckError
from facemask.evaluation import compute_metrics
from facemask.tracking.reports import plot_confusion_matrix

log = logging.getLogger(__name__)


def list_ood_files(ood_root: Path, class_names: Sequence[str]) -> list[tuple[Path, int]]:
    """Return every file in the class folders of `ood_root` with its class index.

    Files may sit at any depth of a class folder. Names that start with "." are ignored, and
    files directly in `ood_root` (such as a manifest) are not pictures of any class. The files
    are not decoded here.

    Raises:
        CheckError: `ood_root` is not a folder, lacks a class folder of the model, has a
            folder that is not a class of the model, or has no files.
    """
    root = Path(ood_root).expanduser()
    if not root.is_dir():
        raise CheckError(
            f"OOD folder {root} does not exist or is not a folder. Set data.ood_root to a folder "
            f"with one sub-folder per class {list(class_names)}, or to null to skip the OOD check."
        )
    folders = sorted(
        entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith(".")
    )
    missing = [name for name in class_names if name not in folders]
    if missing:
        raise CheckError(
            f"OOD folder {root} has no class folder for {missing}; the model's classes are "
            f"{list(class_names)} and the folder has {folders}. Create the missing folders "
            "or set data.ood_root=null."
        )
    extra = [name for name in folders if name not in class_names]
    if extra:
        raise CheckError(
            f"OOD folder {root} has folders {extra} that are not classes of the model "
            f"{list(class_names)}. Remove or rename them."
        )
    files = [
        (path, index) for index, name in enumerate(class_names) for path in _list_files(root / name)
    ]
    if not files:
        raise CheckError(f"OOD folder {root} has no files in its class folders {folders}.")
    return files


def _list_files(folder: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [name for name in dirnames if not name.startswith(".")]
        found.extend(Path(dirpath, name) for name in filenames if not name.startswith("."))
    return sorted(found)


def run_ood_check(
    classifier: PictureClassifier, ood_root: Path, folder: Path
) -> tuple[dict[str, float], list[Path]]:
    """Classify every picture of `ood_root` and write the confusion matrix and a CSV per picture.

    Returns:
        The metrics `ood/acc`, `ood/balanced_acc`, `ood/recall_<class>` (for classes with
        pictures), `ood/fallback_rate` (share without a detected face, only with a face stage),
        `ood/images` and `ood/skipped`, and the written files.

    Raises:
        CheckError: See `list_ood_files`.
    """
    class_names = classifier.class_names
    files = list_ood_files(ood_root, class_names)
    rows: list[dict[str, object]] = []
    probabilities: list[list[float]] = []
    targets: list[int] = []
    fallbacks: list[bool] = []
    skipped: list[SkippedPicture] = []
    with tqdm(total=len(files), desc="OOD check", unit="img") as bar:
        for chunk in chunks(files, classifier.batch_size):
            items = []
            used = []
            for path, label in chunk:
                try:
                    rgb = classifier.decode(path)
                    items.append((rgb, classifier.search(rgb)))
                except PICTURE_ERRORS as exc:
                    skipped.append(SkippedPicture(path, str(exc)))
                    continue
                used.append((path, label))
            for (path, label), result in zip(used, classifier.classify(items), strict=True):
                faces = sum(face.detected for face in result.faces)
                rows.append(
                    {
                        "path": str(path),
                        "label": class_names[label],
                        "predicted": result.label,
                        **{f"prob_{name}": result.probabilities[name] for name in class_names},
                        "faces": faces,
                    }
                )
                probabilities.append([result.probabilities[name] for name in class_names])
                targets.append(label)
                fallbacks.append(result.fallback)
            bar.update(len(chunk))

    folder.mkdir(parents=True, exist_ok=True)
    written = report_skipped("OOD", skipped, folder)
    metrics: dict[str, float] = {"ood/images": float(len(rows)), "ood/skipped": float(len(skipped))}
    if not rows:
        log.error("OOD check: none of the %d files of %s could be used", len(files), ood_root)
        return metrics, written

    written.append(write_csv(rows, folder / "pictures.csv"))
    scores = compute_metrics(np.array(targets), np.array(probabilities), class_names)
    metrics["ood/acc"] = scores["accuracy"]
    metrics["ood/balanced_acc"] = scores["balanced_accuracy"]
    if classifier.stage is not None:
        # A model of whole pictures runs no face search, so it has no fallback rate.
        metrics["ood/fallback_rate"] = float(np.mean(fallbacks))
    for name, per_class in scores["per_class"].items():
        if per_class["support"] == 0:
            log.warning("OOD check: class %s has no usable picture, so it has no recall", name)
            continue
        metrics[f"ood/recall_{name}"] = per_class["recall"]
    written.append(
        plot_confusion_matrix(
            np.array(scores["confusion_matrix"]),
            class_names,
            folder / "confusion_matrix.png",
            title="OOD confusion matrix",
        )
    )
    recalls = ", ".join(
        f"{name} {metrics[f'ood/recall_{name}']:.4f}"
        for name in class_names
        if f"ood/recall_{name}" in metrics
    )
    fallback = metrics.get("ood/fallback_rate")
    log.info(
        "OOD check on %d pictures of %s: accuracy %.4f, balanced accuracy %.4f, recall %s, "
        "no face found in %s, %d file(s) skipped",
        len(rows),
        ood_root,
        metrics["ood/acc"],
        metrics["ood/balanced_acc"],
        recalls,
        "n/a (no face stage)" if fallback is None else f"{100 * fallback:.1f}%",
        len(skipped),
    )
    return metrics, written
