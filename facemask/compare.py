"""`facemask compare`: a table of the MLflow runs of an experiment, best first."""

from __future__ import annotations

import argparse
import csv
import logging
import math
from collections.abc import Sequence
from pathlib import Path

from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from facemask.export import LOG_FORMAT, default_tracking_uri
from facemask.settings import configure_environment
from facemask.tracking.sweep import SWEEP_ID_TAG

log = logging.getLogger(__name__)

# (column header, MLflow param name) for the params shown in the table.
PARAM_COLUMNS = (
    ("model", "model/name"),
    ("image_size", "data/image_size"),
    ("lr", "model/optimizer/lr"),
    ("max_epochs", "trainer/max_epochs"),
)
METRIC_COLUMNS = ("test/acc", "test/balanced_acc", "test/f1", "test/auroc")
HEADER = (
    "run_name",
    "status",
    *(name for name, _ in PARAM_COLUMNS),
    "sweep_id",
    *METRIC_COLUMNS,
    "registered",
    "run_id",
)
_PAGE_SIZE = 1000
_MAX_PAGES = 100


def search_all_runs(client: MlflowClient, experiment_id: str) -> list[Run]:
    """Return every run of the experiment, reading at most 100 pages of 1000 runs."""
    runs: list[Run] = []
    page_token = None
    for _ in range(_MAX_PAGES):
        page = client.search_runs([experiment_id], max_results=_PAGE_SIZE, page_token=page_token)
        runs.extend(page)
        page_token = page.token
        if not page_token:
            return runs
    log.warning("Listed only the first %d runs of experiment %s", len(runs), experiment_id)
    return runs


def registered_versions(client: MlflowClient) -> dict[str, str]:
    """Map run ids to `<model name> v<version>` plus `@alias` for each alias of the version."""
    # search_model_versions leaves `aliases` empty (MLflow 3.17), so they come from the models.
    aliases: dict[tuple[str, str], list[str]] = {}
    for model in client.search_registered_models(max_results=1000):
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault((model.name, str(version)), []).append(alias)
    labels: dict[str, list[str]] = {}
    for version in client.search_model_versions(max_results=10_000):
        label = f"{version.name} v{version.version}"
        label += "".join(
            f" @{a}" for a in sorted(aliases.get((version.name, str(version.version)), []))
        )
        labels.setdefault(version.run_id, []).append(label)
    return {run_id: ", ".join(run_labels) for run_id, run_labels in labels.items()}


def sort_runs(runs: Sequence[Run], metric: str, ascending: bool = False) -> list[Run]:
    """Sort runs by `metric`, best first, with the runs that lack it (or have NaN) last."""

    def key(run: Run) -> tuple[bool, float]:
        value = run.data.metrics.get(metric)
        if value is None or math.isnan(value):
            return (True, 0.0)
        return (False, value if ascending else -value)

    return sorted(runs, key=key)


def run_row(run: Run, versions: dict[str, str]) -> list[str]:
    """Return the table cells of one run in the order of `HEADER`, with "" for a missing value."""
    params = [run.data.params.get(param, "") for _, param in PARAM_COLUMNS]
    metrics = [run.data.metrics.get(metric) for metric in METRIC_COLUMNS]
    return [
        run.info.run_name or "",
        run.info.status,
        *params,
        run.data.tags.get(SWEEP_ID_TAG, ""),
        *("" if value is None else f"{value:.4f}" for value in metrics),
        versions.get(run.info.run_id, ""),
        run.info.run_id,
    ]


def compare_runs(
    tracking_uri: str,
    experiment: str,
    sort: str = "test/acc",
    ascending: bool = False,
    limit: int | None = None,
) -> list[list[str]]:
    """Return the rows of the experiment's runs, best `sort` metric first.

    Raises:
        LookupError: The experiment does not exist in the tracking store.
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise LookupError(
            f"experiment {experiment!r} not found at {tracking_uri}; "
            f"existing experiments: {', '.join(names) or 'none'}. Pass --experiment NAME."
        )
    runs = sort_runs(search_all_runs(client, found.experiment_id), sort, ascending)
    if limit is not None:
        runs = runs[:limit]
    versions = registered_versions(client)
    return [run_row(run, versions) for run in runs]


def format_table(rows: Sequence[Sequence[str]], header: Sequence[str] = HEADER) -> str:
    """Return the rows as left-aligned text columns under a header line, `-` for empty cells."""
    cells = [list(header)] + [[cell or "-" for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in cells
    ]
    return "\n".join(line.rstrip() for line in lines)


def format_markdown(rows: Sequence[Sequence[str]], header: Sequence[str] = HEADER) -> str:
    """Return the rows as a GitHub Markdown table, with `|` in cells escaped."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    lines = [line(header), "|" + "---|" * len(header)]
    lines.extend(line(row) for row in rows)
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: Sequence[Sequence[str]], header: Sequence[str] = HEADER) -> None:
    """Write the rows with a header line to a CSV file, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of `facemask compare` to `parser`."""
    parser.add_argument("--experiment", default="facemask", help="MLflow experiment name")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, or mlruns/mlflow.db in the "
        "project root)",
    )
    parser.add_argument(
        "--sort", default="test/acc", help="metric to sort by, best first (default: test/acc)"
    )
    parser.add_argument(
        "--ascending", action="store_true", help="lower is better for --sort, e.g. test/loss"
    )
    parser.add_argument("--limit", type=int, default=None, help="show only the first N runs")
    parser.add_argument("--csv", type=Path, default=None, help="also write the table as CSV")
    parser.add_argument(
        "--markdown", type=Path, default=None, help="also write the table as Markdown"
    )


def run_compare(args: argparse.Namespace) -> int:
    """Run `facemask compare` with parsed arguments and return the exit status."""
    if args.limit is not None and args.limit < 1:
        log.error("--limit=%d is invalid; pass a positive number of runs", args.limit)
        return 2
    tracking_uri = args.tracking_uri or default_tracking_uri()
    try:
        rows = compare_runs(tracking_uri, args.experiment, args.sort, args.ascending, args.limit)
    except (LookupError, MlflowException) as exc:
        log.error("%s", exc)
        return 2
    print(format_table(rows))
    if args.csv is not None:
        write_csv(args.csv, rows)
        log.info("Wrote %d runs to %s", len(rows), args.csv)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(format_markdown(rows), encoding="utf-8")
        log.info("Wrote %d runs to %s", len(rows), args.markdown)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python scripts/compare_runs.py [--experiment NAME] [--csv PATH] [--markdown PATH]`."""
    configure_environment()
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    parser = argparse.ArgumentParser(prog="compare_runs.py", description=__doc__.splitlines()[0])
    add_compare_arguments(parser)
    return run_compare(parser.parse_args(argv))
