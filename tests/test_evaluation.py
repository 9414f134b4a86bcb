"""`facemask evaluate` on real out-of-distribution photos with the `trained_model` fixture."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from facemask.evaluation import EvaluationError, map_classes, run
from tests.helpers import copy_real_subset

OOD_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "facemask-ood"


@pytest.fixture(scope="module")
def ood_subset(tmp_path_factory) -> Path:
    """Return a folder with 6 real out-of-distribution photos per class."""
    assert OOD_ROOT.is_dir(), f"the out-of-distribution photos are missing at {OOD_ROOT}"
    return copy_real_subset(OOD_ROOT, tmp_path_factory.mktemp("ood") / "ood-small", 6)


def evaluate_overrides(trained_model, data_root: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model.uri={trained_model.alias_uri}",
        f"mlflow.tracking_uri={trained_model.tracking_uri}",
        f"mlflow.artifact_location={trained_model.store / 'eval-artifacts'}",
        f"data.root={data_root}",
        "data.cache_dir=null",
        "data.batch_size=5",
        f"out={out}",
        *extra,
    ]


def read_predictions(out: Path) -> list[dict[str, str]]:
    with (out / "predictions.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_evaluate_metrics_match_predictions(trained_model, ood_subset, tmp_path):
    out = tmp_path / "report"
    assert run(evaluate_overrides(trained_model, ood_subset, out)) == 0

    rows = read_predictions(out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(rows) == 12
    assert metrics["images"] == 12
    for row in rows:
        probs = {name: float(row[f"prob_{name}"]) for name in ("mask", "no_mask")}
        assert row["predicted"] == max(probs, key=probs.get)
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-4)

    correct = [row["label"] == row["predicted"] for row in rows]
    assert metrics["accuracy"] == pytest.approx(sum(correct) / len(rows))
    recalls = {}
    for name in ("mask", "no_mask"):
        of_class = [row for row in rows if row["label"] == name]
        recalls[name] = sum(row["predicted"] == name for row in of_class) / len(of_class)
        assert metrics["per_class"][name]["recall"] == pytest.approx(recalls[name])
        assert metrics["per_class"][name]["support"] == 6
        predicted = [row for row in rows if row["predicted"] == name]
        precision = (
            sum(row["label"] == name for row in predicted) / len(predicted) if predicted else 0
        )
        assert metrics["per_class"][name]["precision"] == pytest.approx(precision)
    assert metrics["balanced_accuracy"] == pytest.approx(sum(recalls.values()) / 2)
    assert sum(map(sum, metrics["confusion_matrix"])) == 12
    assert 0.0 <= metrics["auroc"] <= 1.0
    assert metrics["model"]["version"] == trained_model.version
    assert metrics["skipped_files"] == 0


def test_evaluate_writes_report_files(trained_model, ood_subset, tmp_path):
    out = tmp_path / "report"
    assert run(evaluate_overrides(trained_model, ood_subset, out, "report.most_wrong=4")) == 0

    for name in ("report.md", "report.html", "metrics.json", "confusion_matrix.png"):
        assert (out / name).is_file(), name
    assert (out / "roc_curves.png").is_file()
    assert (out / "classification_report.txt").is_file()
    wrong = [row for row in read_predictions(out) if row["label"] != row["predicted"]]
    assert (out / "most_wrong.png").is_file() == bool(wrong)
    page = (out / "report.html").read_text()
    plots = 3 if wrong else 2
    assert page.count('src="data:image/png;base64,') == plots
    assert 'src="confusion_matrix.png"' not in page
    markdown = (out / "report.md").read_text()
    assert "![Confusion matrix](confusion_matrix.png)" in markdown
    assert "| balanced accuracy |" in markdown
    assert list(tmp_path.iterdir()) == [out]


def test_evaluate_lists_broken_files(trained_model, ood_subset, broken_image_files, tmp_path):
    data_root = tmp_path / "with-broken"
    copy_real_subset(OOD_ROOT, data_root, 3)
    for name, data in broken_image_files.items():
        (data_root / "no_mask" / name).write_bytes(data)
    out = tmp_path / "report"
    overrides = evaluate_overrides(trained_model, data_root, out, "report.format=markdown")
    assert run(overrides) == 0

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 6
    assert metrics["skipped_files"] == len(broken_image_files)
    with (out / "skipped_files.csv").open(newline="") as handle:
        skipped = {row["path"] for row in csv.DictReader(handle)}
    assert skipped == {f"no_mask/{name}" for name in broken_image_files}
    markdown = (out / "report.md").read_text()
    for name in broken_image_files:
        assert f"`no_mask/{name}`" in markdown
    assert not (out / "report.html").exists()
    assert all(row["path"] not in skipped for row in read_predictions(out))


def test_evaluate_logs_mlflow_run(trained_model, ood_subset, tmp_path):
    out = tmp_path / "report"
    assert run(evaluate_overrides(trained_model, ood_subset, out, "log_to_mlflow=true")) == 0

    metrics = json.loads((out / "metrics.json").read_text())
    client = MlflowClient(trained_model.tracking_uri)
    experiment = client.get_experiment_by_name("facemask-evaluation")
    assert experiment is not None
    runs = client.search_runs(
        [experiment.experiment_id], f"tags.dataset_root = '{ood_subset.resolve()}'"
    )
    assert len(runs) == 1
    logged = runs[0]
    assert logged.info.status == "FINISHED"
    assert logged.data.tags["model_name"] == trained_model.model_name
    assert logged.data.tags["model_version"] == trained_model.version
    assert logged.data.tags["model_run_id"] == trained_model.run_id
    assert logged.data.metrics["eval/acc"] == pytest.approx(metrics["accuracy"])
    assert logged.data.metrics["eval/balanced_acc"] == pytest.approx(metrics["balanced_accuracy"])
    assert "eval/recall_no_mask" in logged.data.metrics
    artifacts = {item.path for item in client.list_artifacts(logged.info.run_id)}
    assert {"report.md", "report.html", "metrics.json", "predictions.csv"} <= artifacts
    version = client.get_model_version(trained_model.model_name, trained_model.version)
    assert float(version.tags["eval/ood-small/acc"]) == pytest.approx(metrics["accuracy"])


def test_map_classes_rejects_unknown_folder():
    assert map_classes(["no_mask", "mask"], ["mask", "no_mask"]) == {"no_mask": 1, "mask": 0}
    with pytest.raises(
        EvaluationError, match=r"\['hat'\].*\['mask', 'hat'\].*\['mask', 'no_mask'\]"
    ):
        map_classes(["mask", "hat"], ["mask", "no_mask"])


def test_evaluate_class_mismatch_exits_2(trained_model, ood_subset, tmp_path, caplog):
    data_root = tmp_path / "mismatch"
    copy_real_subset(OOD_ROOT, data_root, 2)
    (data_root / "no_mask").rename(data_root / "hat")
    out = tmp_path / "report"
    with caplog.at_level(logging.ERROR, logger="facemask.evaluation"):
        assert run(evaluate_overrides(trained_model, data_root, out)) == 2
    assert "['hat']" in caplog.text
    assert "['mask', 'no_mask']" in caplog.text
    assert not out.exists()


def test_evaluate_unknown_model_exits_2(trained_model, ood_subset, tmp_path, caplog):
    overrides = evaluate_overrides(trained_model, ood_subset, tmp_path / "report")
    overrides[0] = "model.uri=models:/no-such-model@champion"
    with caplog.at_level(logging.ERROR, logger="facemask.evaluation"):
        assert run(overrides) == 2
    assert "no-such-model" in caplog.text


def test_cli_missing_folder_exits_2(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'absent.db'}"}
    missing = tmp_path / "missing"
    result = subprocess.run(
        [sys.executable, "-m", "facemask.cli", "evaluate", f"data.root={missing}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert f"{missing} does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []
