"""Write the report of `facemask evaluate` and log it to MLflow."""

from __future__ import annotations

import base64
import csv
import html
import json
import logging
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # Files only; no display is needed or assumed.

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from facemask.data.images import InvalidImageError, decode_image  # noqa: E402
from facemask.tracking.reports import (  # noqa: E402
    plot_confusion_matrix,
    plot_roc_curves,
    save_figure,
    write_classification_report,
)

if TYPE_CHECKING:
    from facemask.evaluation import Predictions
    from facemask.serving.model_store import ModelBundle

log = logging.getLogger(__name__)

REPORT_FORMATS = ("html", "markdown")
THUMBNAIL_SIZE = 160
# report.md lists at most this many skipped files; skipped_files.csv lists all of them.
MAX_SKIPPED_IN_REPORT = 50
PLOTS = {
    "confusion_matrix.png": "Confusion matrix",
    "roc_curves.png": "ROC curves",
    "most_wrong.png": "Most confident mistakes",
}


def most_wrong_indices(targets: np.ndarray, probs: np.ndarray, count: int) -> list[int]:
    """Return up to `count` misclassified rows, highest probability on a wrong class first."""
    wrong_probs = probs.copy()
    wrong_probs[np.arange(len(targets)), targets] = -1.0
    max_wrong = wrong_probs.max(axis=1)
    misclassified = np.flatnonzero(probs.argmax(axis=1) != targets)
    order = misclassified[np.argsort(-max_wrong[misclassified], kind="stable")]
    return [int(i) for i in order[:count]]


def plot_most_wrong(
    predictions: Predictions, class_names: list[str], indices: list[int], path: Path
) -> Path | None:
    """Write a thumbnail grid of the given rows with true and predicted labels, or return None."""
    if not indices:
        return None
    columns = min(4, len(indices))
    rows = math.ceil(len(indices) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, index in zip(axes.flat, indices, strict=False):
        record = predictions.records[index]
        probs = predictions.probs[index]
        predicted = int(probs.argmax())
        try:
            image = decode_image(record.path, draft_size=THUMBNAIL_SIZE).image
            image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
            ax.imshow(image)
        except (InvalidImageError, OSError) as exc:
            log.warning("Failed to draw %s in the most-wrong grid: %s", record.relpath, exc)
        true_name = class_names[int(predictions.targets[index])]
        ax.set_title(
            f"{record.relpath}\ntrue {true_name}, pred {class_names[predicted]} "
            f"({probs[predicted]:.2f})",
            fontsize=8,
        )
    return save_figure(fig, path, dpi=100)


def write_predictions_csv(predictions: Predictions, class_names: list[str], path: Path) -> Path:
    """Write one row per image: path, true and predicted class, and every class probability."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "predicted", *[f"prob_{name}" for name in class_names]])
        for record, target, probs in zip(
            predictions.records, predictions.targets, predictions.probs, strict=True
        ):
            predicted = class_names[int(probs.argmax())]
            row = [record.relpath, class_names[int(target)], predicted]
            writer.writerow(row + [f"{value:.6f}" for value in probs])
    return path


def write_skipped_csv(predictions: Predictions, path: Path) -> Path:
    """Write the skipped files with their reasons, as training does."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "reason"])
        for skipped in predictions.skipped:
            writer.writerow([skipped.relpath, skipped.label, skipped.reason])
    return path


def _format(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def render_markdown(
    bundle: ModelBundle, data_root: Path, predictions: Predictions, metrics: dict, plots: list[str]
) -> str:
    """Return the Markdown report: model, metrics, per-class scores, skipped files, plots."""
    lines = [
        f"# Evaluation of {bundle.name or bundle.uri} on {data_root.name}",
        "",
        f"- Model URI: `{bundle.uri}`",
        f"- Registered name and version: {bundle.name} v{bundle.version}",
        f"- Training run: `{bundle.run_id}`",
        f"- Dataset: `{data_root}`, {metrics['images']} images evaluated, "
        f"{len(predictions.skipped)} files skipped",
        "",
        "| metric | value |",
        "|---|---:|",
        f"| accuracy | {_format(metrics['accuracy'])} |",
        f"| balanced accuracy | {_format(metrics['balanced_accuracy'])} |",
        f"| macro F1 | {_format(metrics['macro_f1'])} |",
        f"| AUROC | {_format(metrics['auroc'])} |",
        "",
        "| class | precision | recall | F1 | images |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, scores in metrics["per_class"].items():
        lines.append(
            f"| {name} | {_format(scores['precision'])} | {_format(scores['recall'])} "
            f"| {_format(scores['f1'])} | {scores['support']} |"
        )
    lines += ["", "## Skipped files", ""]
    if not predictions.skipped:
        lines.append("None.")
    for skipped in predictions.skipped[:MAX_SKIPPED_IN_REPORT]:
        lines.append(f"- `{skipped.relpath}`: {skipped.reason}")
    if len(predictions.skipped) > MAX_SKIPPED_IN_REPORT:
        extra = len(predictions.skipped) - MAX_SKIPPED_IN_REPORT
        lines.append(f"- and {extra} more, listed in skipped_files.csv")
    lines += ["", "## Plots", ""]
    for file_name in plots:
        lines += [f"![{PLOTS[file_name]}]({file_name})", ""]
    lines.append("Per-image predictions: [predictions.csv](predictions.csv).")
    return "\n".join(lines) + "\n"


def render_html(markdown: str, folder: Path) -> str:
    """Return a self-contained HTML page of the report, with PNG images embedded as base64.

    Only the Markdown that `render_markdown` writes is converted: headings, list items,
    pipe tables, images and inline code.
    """
    body: list[str] = []
    table: list[list[str]] = []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            if not all(set(cell) <= set("-:") for cell in cells):
                table.append(cells)
            continue
        if table:
            header = "".join(f"<th>{_inline(cell)}</th>" for cell in table[0])
            rows = "".join(
                "<tr>" + "".join(f"<td>{_inline(cell)}</td>" for cell in row) + "</tr>"
                for row in table[1:]
            )
            body.append(f"<table><tr>{header}</tr>{rows}</table>")
            table = []
        image = re.fullmatch(r"!\[(.*)\]\((.*)\)", line)
        if image:
            data = base64.b64encode((folder / image[2]).read_bytes()).decode("ascii")
            alt = html.escape(image[1])
            body.append(f'<p><img alt="{alt}" src="data:image/png;base64,{data}"></p>')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line.startswith("- "):
            body.append(f"<li>{_inline(line[2:])}</li>")
        elif line:
            body.append(f"<p>{_inline(line)}</p>")
    style = "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}"
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>Evaluation report</title>'
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _inline(text: str) -> str:
    escaped = html.escape(text)
    escaped = re.sub(r"`([^`]*)`", r"<code>\1</code>", escaped)
    return re.sub(r"\[([^\]]*)\]\(([^)]*)\)", r'<a href="\2">\1</a>', escaped)


def write_report(
    out: Path,
    bundle: ModelBundle,
    data_root: Path,
    predictions: Predictions,
    metrics: dict,
    *,
    report_format: str,
    most_wrong: int,
) -> list[Path]:
    """Write metrics.json, predictions.csv, the plots, report.md and, for html, report.html."""
    if report_format not in REPORT_FORMATS:
        from facemask.evaluation import EvaluationError

        raise EvaluationError(
            f"report.format={report_format!r} is invalid; use one of {list(REPORT_FORMATS)}."
        )
    out.mkdir(parents=True, exist_ok=True)
    names = bundle.class_names
    targets, probs = predictions.targets, predictions.probs
    confusion = np.array(metrics["confusion_matrix"])
    written = [
        plot_confusion_matrix(
            confusion, names, out / "confusion_matrix.png", title="Confusion matrix"
        ),
        plot_roc_curves(
            targets, probs, names, out / "roc_curves.png", title="ROC, one class against the rest"
        ),
        *write_classification_report(targets, probs, names, out),
        write_predictions_csv(predictions, names, out / "predictions.csv"),
        write_skipped_csv(predictions, out / "skipped_files.csv"),
    ]
    indices = most_wrong_indices(targets, probs, most_wrong)
    grid = plot_most_wrong(predictions, names, indices, out / "most_wrong.png")
    if grid is not None:
        written.append(grid)
    summary = {
        **metrics,
        "skipped_files": len(predictions.skipped),
        "model": {
            "uri": bundle.uri,
            "name": bundle.name,
            "version": bundle.version,
            "run_id": bundle.run_id,
        },
        "dataset_root": str(data_root),
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    plots = [path.name for path in written if path.name in PLOTS]
    markdown = render_markdown(bundle, data_root, predictions, metrics, plots)
    (out / "report.md").write_text(markdown)
    written += [out / "metrics.json", out / "report.md"]
    if report_format == "html":
        (out / "report.html").write_text(render_html(markdown, out))
        written.append(out / "report.html")
    return written


def mlflow_metrics(metrics: dict) -> dict[str, float]:
    """Return the evaluation metrics under `eval/` keys, as logged to MLflow."""
    logged = {
        "eval/acc": metrics["accuracy"],
        "eval/balanced_acc": metrics["balanced_accuracy"],
        "eval/macro_f1": metrics["macro_f1"],
        "eval/images": float(metrics["images"]),
    }
    if metrics["auroc"] is not None:
        logged["eval/auroc"] = metrics["auroc"]
    for name, scores in metrics["per_class"].items():
        logged[f"eval/precision_{name}"] = scores["precision"]
        logged[f"eval/recall_{name}"] = scores["recall"]
    return logged


def log_evaluation_run(
    cfg: DictConfig, bundle: ModelBundle, data_root: Path, metrics: dict, out: Path
) -> str:
    """Log the metrics and the report folder as a new MLflow run; return its run id.

    The registered model version, when the model came from the registry, gets the tag
    `eval/DATASET/acc` with the accuracy.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment_name)
    if experiment is None:
        experiment_id = client.create_experiment(
            cfg.mlflow.experiment_name, artifact_location=str(cfg.mlflow.artifact_location)
        )
    else:
        experiment_id = experiment.experiment_id
    tags = {
        "model_uri": bundle.uri,
        "model_name": str(bundle.name),
        "model_version": str(bundle.version),
        "model_run_id": str(bundle.run_id),
        "dataset_root": str(data_root),
    }
    run_name = f"eval-{bundle.name or 'model'}-v{bundle.version}-{data_root.name}"
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    status = "FAILED"
    try:
        for key, value in mlflow_metrics(metrics).items():
            client.log_metric(run_id, key, value)
        client.log_param(run_id, "model_uri", bundle.uri)
        client.log_artifacts(run_id, str(out))
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status)
    if bundle.name and bundle.version:
        client.set_model_version_tag(
            bundle.name, bundle.version, f"eval/{data_root.name}/acc", f"{metrics['accuracy']:.6f}"
        )
    log.info("Logged evaluation run %s to experiment %r", run_id, cfg.mlflow.experiment_name)
    return run_id
