"""`facemask`: the command with subcommands for work outside training and serving."""

from __future__ import annotations

import argparse
import logging

from facemask.export import LOG_FORMAT, add_export_arguments, run_export
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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen subcommand."""
    configure_environment()
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
