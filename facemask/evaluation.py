"""Evaluate a registered or exported classifier on a class-folder dataset: `facemask evaluate`."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)
from tqdm import tqdm

from facemask.data.images import InvalidImageError, decode_image
from facemask.data.scan import (
    DatasetError,
    ImageRecord,
    ScanResult,
    SkippedFile,
    discover_classes,
    scan_dataset,
)
from facemask.data.transforms import build_eval_transform, image_to_tensor
from facemask.faces.pipeline import classify_faces
from facemask.faces.stage import FaceStage
from facemask.serving.model_store import ModelBundle, ModelLoadError, load_model_bundle
from facemask.settings import configure_environment, project_root

log = logging.getLogger(__name__)


class EvaluationError(ValueError):
    """The dataset cannot be evaluated with the model, for example because of unknown classes."""


@dataclass
class Predictions:
    """Model outputs for the images of a dataset.

    Attributes:
        records: The evaluated images, in row order.
        targets: True class index of each image, in the model's class order.
        probs: Class probabilities, shape (images, model classes).
        skipped: Files that the scan or the preprocessing rejected.
    """

    records: list[ImageRecord]
    targets: np.ndarray
    probs: np.ndarray
    skipped: list[SkippedFile]


def map_classes(folder_classes: Sequence[str], model_classes: Sequence[str]) -> dict[str, int]:
    """Return the model's output index for each class folder.

    Raises:
        EvaluationError: A folder is not one of the model's classes.
    """
    unknown = [name for name in folder_classes if name not in model_classes]
    if unknown:
        raise EvaluationError(
            f"Class folders {unknown} are not classes of the model. The dataset has "
            f"{list(folder_classes)}, the model predicts {list(model_classes)}; rename or remove "
            "those folders."
        )
    return {name: list(model_classes).index(name) for name in folder_classes}


def predict_dataset(
    bundle: ModelBundle, scan: ScanResult, batch_size: int, faces: bool = True
) -> Predictions:
    """Classify every scanned image as serving does: by its faces, or whole.

    With `faces` and a model that carries face stage settings, each picture goes through the
    face stage and is classified by `facemask.faces.pipeline.classify_faces` (the picture is
    `no_mask` when any face is). Otherwise pictures are classified whole, in batches.
    """
    if batch_size < 1:
        raise EvaluationError(f"data.batch_size={batch_size} is invalid; use 1 or more.")
    index_of = map_classes(scan.classes, bundle.class_names)
    pre = bundle.preprocessing
    transform = build_eval_transform(pre)
    stage = FaceStage(bundle.face_stage) if faces and bundle.face_stage is not None else None
    draft_size = (
        bundle.face_stage.draft_size(pre.image_size, pre.jpeg_draft) if stage else pre.draft_size
    )
    if stage is not None:
        log.info("Classifying the faces of each photo with the model's face stage")
    without_face = 0
    records: list[ImageRecord] = []
    skipped = list(scan.skipped)
    batches: list[np.ndarray] = []
    pending: list[torch.Tensor] = []
    pending_records: list[ImageRecord] = []

    def infer(batch: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return bundle.model(batch.float()).float().cpu().numpy()

    def flush() -> None:
        batches.append(infer(torch.stack(pending)))
        records.extend(pending_records)
        pending.clear()
        pending_records.clear()

    for record in tqdm(scan.records, desc="Evaluating", unit="img"):
        try:
            image = decode_image(record.path, draft_size=draft_size).image
        except (InvalidImageError, OSError) as exc:
            # The file changed or vanished after the scan checked it.
            skipped.append(SkippedFile(record.relpath, record.label, str(exc)))
            continue
        if stage is not None:
            result = classify_faces(
                np.asarray(image),
                stage,
                lambda crop: transform(image=crop)["image"].numpy(),
                lambda batch: infer(torch.from_numpy(batch)),
                bundle.class_names,
            )
            batches.append(np.array([[result.probabilities[n] for n in bundle.class_names]]))
            records.append(record)
            without_face += result.fallback
            continue
        pending.append(image_to_tensor(image, transform))
        pending_records.append(record)
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    if not records:
        raise EvaluationError(f"No image of {scan.root} could be preprocessed; see the log.")
    if stage is not None:
        log.info(
            "%d of %d photos had no face found and were classified whole",
            without_face,
            len(records),
        )
    targets = np.array([index_of[record.label] for record in records], dtype=np.int64)
    return Predictions(records, targets, np.concatenate(batches), sorted(skipped, key=_relpath))


def _relpath(skipped: SkippedFile) -> str:
    return skipped.relpath


def compute_metrics(targets: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> dict:
    """Return accuracy, balanced accuracy, macro F1, AUROC, per-class scores and the confusion.

    Per-class and macro scores cover every class of the model. A class without images has
    recall 0 and is left out of balanced accuracy, which averages the recall of present classes.
    AUROC is the one-vs-rest macro average, or None when fewer than two classes have images.
    """
    predictions = probs.argmax(axis=1)
    labels = list(range(len(class_names)))
    present = sorted(set(targets.tolist()))
    kwargs = {"labels": labels, "average": None, "zero_division": 0}
    precision = precision_score(targets, predictions, **kwargs)
    recall = recall_score(targets, predictions, **kwargs)
    f1 = f1_score(targets, predictions, **kwargs)
    support = np.bincount(targets, minlength=len(class_names))
    auroc = None
    if len(present) >= 2:
        if len(class_names) == 2:
            auroc = float(roc_auc_score(targets == 1, probs[:, 1]))
        else:
            # Classes without images have no ROC, so only present columns are scored.
            scores = [roc_auc_score(targets == c, probs[:, c]) for c in present]
            auroc = float(np.mean(scores))
    return {
        "accuracy": float(accuracy_score(targets, predictions)),
        "balanced_accuracy": float(balanced_accuracy_score(targets, predictions)),
        "macro_f1": float(np.mean(f1)),
        "auroc": auroc,
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": confusion_matrix(targets, predictions, labels=labels).tolist(),
        "class_names": list(class_names),
        "images": len(targets),
    }


def default_out_dir(bundle: ModelBundle, data_root: Path) -> Path:
    """Return reports/evaluate/NAME-vVERSION-DATASET-TIME under the project root."""
    name = bundle.name or "model"
    version = bundle.version or "unregistered"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return project_root() / "reports" / "evaluate" / f"{name}-v{version}-{data_root.name}-{stamp}"


def evaluate(cfg: DictConfig) -> Path:
    """Evaluate `cfg.model.uri` on `cfg.data.root`, write the report and return its folder.

    Raises:
        ModelLoadError: The model cannot be loaded.
        DatasetError: The folder is missing or has no usable images.
        EvaluationError: A class folder is unknown to the model, or no image could be used.
    """
    from facemask.evaluation_report import log_evaluation_run, write_report

    data_root = Path(cfg.data.root).expanduser().resolve()
    discover_classes(data_root)  # Fails on a missing folder before the slower model load.
    bundle = load_model_bundle(cfg.model.uri, cfg.mlflow.tracking_uri)
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else None
    scan = scan_dataset(data_root, cache_dir=cache_dir, workers=cfg.data.scan_workers)
    map_classes(scan.classes, bundle.class_names)
    predictions = predict_dataset(
        bundle, scan, int(cfg.data.batch_size), faces=bool(cfg.get("faces", True))
    )
    metrics = compute_metrics(predictions.targets, predictions.probs, bundle.class_names)
    out = Path(cfg.out).expanduser() if cfg.out else default_out_dir(bundle, data_root)
    write_report(
        out,
        bundle,
        data_root,
        predictions,
        metrics,
        report_format=str(cfg.report.format),
        most_wrong=int(cfg.report.most_wrong),
    )
    log.info(
        "Accuracy %.4f, balanced accuracy %.4f on %d images of %s; report in %s",
        metrics["accuracy"],
        metrics["balanced_accuracy"],
        metrics["images"],
        data_root,
        out,
    )
    if cfg.log_to_mlflow:
        log_evaluation_run(cfg, bundle, data_root, metrics, out)
    return out


def compose_config(overrides: Sequence[str]) -> DictConfig:
    """Compose `conf/evaluate.yaml` with command-line style overrides."""
    configure_environment()
    with initialize_config_dir(config_dir=str(project_root() / "conf"), version_base="1.3"):
        return compose(config_name="evaluate", overrides=list(overrides))


def run(overrides: Sequence[str]) -> int:
    """Run `facemask evaluate` with Hydra overrides; return 0, or 2 after a one-line error."""
    try:
        cfg = compose_config(overrides)
        evaluate(cfg)
    except MissingMandatoryValue as exc:
        key = exc.full_key
        log.error("facemask evaluate failed: %s is required; pass %s=VALUE", key, key)
        return 2
    except (
        DatasetError,
        EvaluationError,
        ModelLoadError,
        HydraException,
        OmegaConfBaseException,
    ) as exc:
        log.error("facemask evaluate failed: %s", " ".join(str(exc).split()))
        return 2
    return 0
