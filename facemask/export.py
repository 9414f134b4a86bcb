"""Export a logged or registered model to a self-contained folder that serving loads offline.

`facemask export models:/facemask-classifier@champion --out build/model` downloads the MLflow
model (MLmodel with the class names and preprocessing as metadata, and the pt2 weights) and
writes `facemask_export.json` next to it with the registry name, version, alias and test
metrics, so that `python serve.py model.uri=build/model` needs no tracking server.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from facemask.settings import configure_environment, project_root

log = logging.getLogger(__name__)

LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


def default_tracking_uri() -> str:
    """Return `$MLFLOW_TRACKING_URI`, or the SQLite store in `mlruns/` that training uses."""
    return os.environ.get("MLFLOW_TRACKING_URI") or (
        f"sqlite:///{project_root() / 'mlruns' / 'mlflow.db'}"
    )


def export_model(uri: str, out: Path, tracking_uri: str, overwrite: bool = False) -> Path:
    """Download the model at `uri` into `out`, check that it loads, and return `out`.

    The folder is assembled next to `out` and renamed into place, so an interrupted export
    leaves no half-written model behind.

    Raises:
        FileExistsError: `out` exists and `overwrite` is false.
        facemask.serving.model_store.ModelLoadError: The model cannot be resolved, downloaded or
            loaded, or it lacks the facemask metadata.
    """
    import mlflow
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from facemask.serving import model_store

    out = out.resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")

    # Resolving first pins an alias to one version, so the files and the recorded version agree.
    try:
        model_store.check_sqlite_store(tracking_uri)
        # download_artifacts resolves models:/ URIs through the global registry URI, which
        # otherwise defaults to ./mlflow.db and would be created empty.
        mlflow.set_tracking_uri(tracking_uri)
        client = MlflowClient(tracking_uri)
        name, version, alias, pinned_uri = model_store.resolve_registered(client, uri)
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        # mkdtemp creates the folder as 0700, so a container user other than the owner could not
        # read it.
        staging.chmod(0o755)
        try:
            mlflow.artifacts.download_artifacts(
                artifact_uri=pinned_uri, dst_path=str(staging), tracking_uri=tracking_uri
            )
            bundle = model_store.load_model_bundle(str(staging), tracking_uri)
            info = _export_info(uri, pinned_uri, name, version, alias, bundle.run_id)
            info["test_metrics"] = model_store.run_test_metrics(client, bundle.run_id)
            (staging / model_store.EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
            if out.exists():
                shutil.rmtree(out)
            staging.rename(out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except (MlflowException, OSError) as exc:
        raise model_store.ModelLoadError(
            f"Cannot export model {uri!r} from MLflow tracking URI "
            f"{model_store.redact_uri(tracking_uri)!r}: {' '.join(str(exc).split())}"
        ) from exc
    log.info("Exported model %s (name %s, version %s) to %s", uri, name, version, out)
    return out


def _export_info(
    uri: str,
    pinned_uri: str,
    name: str | None,
    version: str | None,
    alias: str | None,
    run_id: str | None,
) -> dict[str, Any]:
    return {
        "source_uri": uri,
        "pinned_uri": pinned_uri,
        "name": name,
        "version": version,
        "alias": alias,
        "run_id": run_id,
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of `facemask export` to `parser`."""
    parser.add_argument(
        "model_uri",
        metavar="MODEL_URI",
        help="MLflow model URI: models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/model",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="folder to write; it must not exist yet"
    )
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db "
        "in the project root)",
    )
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")


def run_export(args: argparse.Namespace) -> int:
    """Run `facemask export` with parsed arguments and return the exit status."""
    from facemask.serving.model_store import ModelLoadError

    tracking_uri = args.tracking_uri or default_tracking_uri()
    try:
        out = export_model(args.model_uri, args.out, tracking_uri, overwrite=args.force)
    except (ModelLoadError, FileExistsError) as exc:
        log.error("%s", exc)
        return 2
    print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m facemask.export MODEL_URI --out DIR`."""
    configure_environment()
    logging.basicConfig(
        level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"
    )
    parser = argparse.ArgumentParser(prog="facemask export", description=__doc__.splitlines()[0])
    add_export_arguments(parser)
    return run_export(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
