"""`facemask compare`: the runs of an experiment, best first, as text, CSV and Markdown."""

from __future__ import annotations

import csv
import logging
import shutil
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from facemask.cli import main
from facemask.compare import HEADER, compare_runs, format_table
from facemask.settings import project_root
from facemask.tracking.sweep import SWEEP_ID_TAG

STATUS = HEADER.index("status")
RUN_NAME = HEADER.index("run_name")
ACC = HEADER.index("test/acc")


@pytest.fixture
def store(tmp_path, trained_model) -> str:
    """Return the URI of a copy of the trained model's store with four more runs.

    `best` beats any real run on test/acc, `worst` is below it, `no-metrics` failed before
    testing, and `loss-only` has no test/acc.
    """
    db = tmp_path / "mlflow.db"
    shutil.copy2(trained_model.store / "mlflow.db", db)
    uri = f"sqlite:///{db}"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.get_experiment_by_name("facemask").experiment_id
    added = {
        "best": ({"test/acc": 1.0, "test/f1": 1.0, "test/loss": 0.5}, "FINISHED"),
        "worst": ({"test/acc": 0.0, "test/loss": 0.1}, "FINISHED"),
        "no-metrics": ({}, "FAILED"),
        "loss-only": ({"test/loss": 0.3}, "FINISHED"),
    }
    for name, (metrics, status) in added.items():
        run = client.create_run(experiment_id, run_name=name, tags={SWEEP_ID_TAG: "sweep-a"})
        client.log_param(run.info.run_id, "model/name", "mobilenetv3_small_100")
        for key, value in metrics.items():
            client.log_metric(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id, status)
    return uri


def test_compare_sorts_best_first(store, trained_model):
    rows = compare_runs(store, "facemask", sort="test/acc")
    names = [row[RUN_NAME] for row in rows]
    assert len(rows) == 5
    assert names[0] == "best"
    assert names[2] == "worst"
    assert set(names[3:]) == {"no-metrics", "loss-only"}
    trained = rows[1]
    assert trained[HEADER.index("run_id")] == trained_model.run_id
    assert trained[HEADER.index("model")] == "resnet18"
    assert trained[HEADER.index("image_size")] == "64"
    assert trained[HEADER.index("max_epochs")] == "1"
    assert trained[HEADER.index("registered")] == (
        f"{trained_model.model_name} v{trained_model.version} @{trained_model.alias}"
    )
    assert float(trained[ACC]) > 0.0
    assert rows[0][HEADER.index("sweep_id")] == "sweep-a"
    assert rows[0][HEADER.index("test/auroc")] == ""
    statuses = {row[RUN_NAME]: row[STATUS] for row in rows}
    assert statuses["no-metrics"] == "FAILED"


def test_compare_ascending_and_limit(store):
    rows = compare_runs(store, "facemask", sort="test/loss", ascending=True, limit=3)
    assert [row[RUN_NAME] for row in rows][:2] == ["worst", "loss-only"]
    assert len(rows) == 3


def test_compare_unknown_experiment(store):
    with pytest.raises(LookupError, match="'nope' not found.*facemask"):
        compare_runs(store, "nope")


def test_format_table_aligns_columns():
    text = format_table([["a", "FINISHED"], ["long-name", ""]], header=("name", "status"))
    lines = text.splitlines()
    assert lines[0] == "name       status"
    assert lines[1] == "a          FINISHED"
    assert lines[2] == "long-name  -"


def test_cli_compare_writes_csv_and_markdown(store, tmp_path, capsys):
    csv_path = tmp_path / "out" / "runs.csv"
    md_path = tmp_path / "out" / "runs.md"
    argv = ["compare", "--tracking-uri", store, "--limit", "2"]
    status = main([*argv, "--csv", str(csv_path), "--markdown", str(md_path)])
    assert status == 0

    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == list(HEADER)
    assert printed[1].split()[0] == "best"
    assert len(printed) == 3
    # Aligned columns: the status column starts at the same offset in every line.
    words = ["status", "FINISHED", "FINISHED"]
    offsets = {line.index(word) for line, word in zip(printed, words, strict=True)}
    assert len(offsets) == 1

    with csv_path.open(newline="") as handle:
        table = list(csv.reader(handle))
    assert table[0] == list(HEADER)
    assert len(table) == 3
    assert table[1][RUN_NAME] == "best"
    assert table[1][ACC] == "1.0000"

    markdown = md_path.read_text().splitlines()
    assert markdown[0] == "| " + " | ".join(HEADER) + " |"
    assert markdown[1] == "|" + "---|" * len(HEADER)
    assert markdown[2].startswith("| best | FINISHED |")
    assert len(markdown) == 4


def test_cli_compare_unknown_experiment_exits_2(store, caplog):
    with caplog.at_level(logging.ERROR):
        status = main(["compare", "--tracking-uri", store, "--experiment", "nope"])
    assert status == 2
    assert "experiment 'nope' not found" in caplog.text


def test_cli_compare_rejects_zero_limit(store, caplog):
    with caplog.at_level(logging.ERROR):
        status = main(["compare", "--tracking-uri", store, "--limit", "0"])
    assert status == 2
    assert "--limit=0 is invalid" in caplog.text


def test_compare_script_runs(store, tmp_path):
    script = project_root() / "scripts" / "compare_runs.py"
    result = subprocess.run(
        [sys.executable, str(script), "--tracking-uri", store, "--limit", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].split()[0] == "best"
