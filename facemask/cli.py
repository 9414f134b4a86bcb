"""`facemask`: the command with subcommands for work outside training and serving."""

from __future__ import annotations

import argparse
import logging

from facemask.compare import add_compare_arguments, run_compare
from facemask.export import LOG_FORMAT, add_export_arguments, run_export
from facemask.faces.fetch import add_fetch_arguments, run_fetch
from facemask.settings import configure_environment


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of `facemask` and its subcommands."""
    parser = argparse.ArgumentParser(prog="facemask")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    export = commands.add_parser(
        "export",
        help="write a registered model to a folder that serve.py loads without a tracking server",
        description="Write a registered or logged MLflow model to a self-contained folder.",
    )
    add_export_arguments(export)
    export.set_defaults(handler=run_export)
    compare = commands.add_parser(
        "compare",
        help="print a table of an experiment's MLflow runs, best first; write CSV or Markdown",
        description="List the runs of an MLflow experiment with key params and test metrics.",
    )
    add_compare_arguments(compare)
    compare.set_defaults(handler=run_compare)
    evaluate = commands.add_parser(
        "evaluate",
        help="evaluate a registered or exported model on a folder of images laid out by class",
        description="Evaluate a model on a class-folder dataset; arguments are Hydra overrides "
        "of conf/evaluate.yaml, e.g. model.uri=models:/NAME@ALIAS data.root=FOLDER.",
    )
    evaluate.add_argument("overrides", nargs=argparse.REMAINDER, help="KEY=VALUE overrides")
    evaluate.set_defaults(handler=_run_evaluate)
    fetch = commands.add_parser(
        "fetch-face-model",
        help="download the face detector's model file (BlazeFace) and check its SHA-256",
        description="Take the BlazeFace model file from the pinned mediapipe 0.10.21 wheel, check "
        "its SHA-256 and install it where the face detector loads it. Does nothing when the file "
        "is already installed.",
    )
    add_fetch_arguments(fetch)
    fetch.set_defaults(handler=run_fetch)
    return parser


def _run_evaluate(args: argparse.Namespace) -> int:
    # Imported here because torch and MLflow slow down every other subcommand.
    from facemask.evaluation import run

    return run(args.overrides)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen subcommand."""
    configure_environment()
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
