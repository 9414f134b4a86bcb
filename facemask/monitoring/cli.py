"""`facemask-drift`: compare logged predictions with a model's training reference; see `--help`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from facemask.settings import configure_environment, project_root

log = logging.getLogger(__name__)

DEFAULT_MODEL_URI = "models:/facemask-classifier@champion"
_ALIAS_URI = re.compile(r"models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)")
_VERSION_URI = re.compile(r"models:/(?P<name>[^/@]+)/(?P<version>\d+)")


class DriftCommandError(Exception):
    """An expected failure, reported as one line and exit status 1."""


def _timestamp(value: str) -> datetime:
    from facemask.monitoring.log_reader import parse_timestamp

    try:
        return parse_timestamp(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"invalid ISO 8601 time {value!r}, e.g. 2026-12-04T17:00:00+00:00"
        ) from exc


def build_parser() -> argparse.ArgumentParser:
    root = project_root()
    parser = argparse.ArgumentParser(
        prog="facemask-drift",
        description="Compare logged predictions with the training reference of a model's run, "
        "print the drift summary and write the Evidently report as HTML and JSON.",
    )

    model = parser.add_mutually_exclusive_group()
    model.add_argument(
        "--model-uri",
        default=DEFAULT_MODEL_URI,
        help="models:/NAME@ALIAS or models:/NAME/VERSION; only predictions of that version "
        "are compared (default: %(default)s)",
    )
    model.add_argument(
        "--run-id",
        help="training run whose reference to use; compares the predictions of every model",
    )

    local_store = f"sqlite:///{root}/mlruns/mlflow.db"
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI") or local_store,
        help=f"MLflow tracking URI (default: $MLFLOW_TRACKING_URI if set, else {local_store})",
    )
    parser.add_argument(
        "--log",
        type=Path,
        default=root / "logs" / "predictions.jsonl",
        help="prediction log; rotated files LOG.1 ... LOG.N are read too (default: %(default)s)",
    )

    start = parser.add_mutually_exclusive_group()
    start.add_argument(
        "--hours", type=float, default=24.0, help="window length in hours (default: 24)"
    )
    start.add_argument("--since", type=_timestamp, help="window start, ISO 8601 (UTC if no zone)")
    parser.add_argument("--until", type=_timestamp, help="window end, ISO 8601 (default: now)")

    parser.add_argument(
        "--out",
        type=Path,
        help="folder for the reports (default: reports/drift/<UTC time>/ in the project root)",
    )
    parser.add_argument(
        "--min-rows",
        type=int,
        default=30,
        help="minimum number of predictions for a drift verdict (default: %(default)s)",
    )
    return parser


def resolve_model(model_uri: str, tracking_uri: str) -> tuple[str, str, str]:
    """Return the run id, registered name and version that a `models:/` URI points at."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    alias_match = _ALIAS_URI.fullmatch(model_uri)
    version_match = _VERSION_URI.fullmatch(model_uri)
    if not alias_match and not version_match:
        raise DriftCommandError(
            f"unsupported --model-uri {model_uri!r}; use models:/NAME@ALIAS, "
            f"models:/NAME/VERSION or --run-id"
        )
    client = MlflowClient(tracking_uri)
    try:
        if alias_match:
            name, alias = alias_match["name"], alias_match["alias"]
            version = client.get_model_version_by_alias(name, alias)
        else:
            name = version_match["name"]
            version = client.get_model_version(name, version_match["version"])
    except MlflowException as exc:
        raise DriftCommandError(
            f"cannot resolve {model_uri} in {tracking_uri}: {exc.message}"
        ) from exc
    if not version.run_id:
        raise DriftCommandError(f"{model_uri} (version {version.version}) has no training run")
    return version.run_id, name, str(version.version)


def run(args: argparse.Namespace) -> int:
    """Load the reference and the log window, print the summary and write the reports."""
    from facemask.monitoring import drift

    name = version = None
    run_id = args.run_id
    if run_id is None:
        run_id, name, version = resolve_model(args.model_uri, args.tracking_uri)
    until = args.until or datetime.now(UTC)
    since = args.since or until - timedelta(hours=args.hours)
    if since >= until:
        raise DriftCommandError(f"the window is empty: --since {since} is not before {until}")
    try:
        reference = drift.load_reference(run_id, args.tracking_uri)
    except (drift.ReferenceNotFoundError, drift.ReferenceLoadError) as exc:
        raise DriftCommandError(str(exc)) from exc
    prediction_log = drift.load_prediction_log(args.log, since, until, name, version)
    current = prediction_log.frame
    if current.empty:
        model_description = f"{name} version {version}" if version else "any model"
        raise DriftCommandError(
            f"no predictions of {model_description} in {args.log} between {since.isoformat()} and "
            f"{until.isoformat()} ({prediction_log.other_models} of other models); "
            f"widen the window with --hours or --since"
        )

    summary = drift.drift_summary(reference, current, min_rows=args.min_rows)
    summary.update(drift.face_summary(current))
    summary["model"] = {"name": name, "version": version, "run_id": run_id}
    summary["window"] = drift.describe_log(prediction_log, since, until)
    out_dir = args.out or project_root() / "reports" / "drift" / until.strftime("%Y%m%dT%H%M%SZ")
    html_path, json_path = drift.write_report(reference, current, out_dir)
    summary_path = out_dir / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")

    print(json.dumps(summary, indent=2))
    print(f"HTML report:  {html_path}")
    print(f"JSON report:  {json_path}")
    print(f"Summary:      {summary_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return 0 on success and 1 on an expected failure."""
    configure_environment()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.min_rows < 1:
        parser.error(f"--min-rows must be at least 1, got {args.min_rows}")
    if args.hours <= 0:
        parser.error(f"--hours must be positive, got {args.hours}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except DriftCommandError as exc:
        print(f"facemask-drift: error: {exc}", file=sys.stderr)
        return 1
