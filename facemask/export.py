"""Export a logged or registered model to a self-contained folder that serving loads offline.

`facemask export models:/facemask-classifier@champion --out build/model` downloads the MLflow
model (MLmodel with the class names and preprocessing as metadata, and the pt2 weights) and
writes `facemask_export.json` next to it with the registry name, version, alias and test
metrics, so that `python serve.py model.uri=build/model` needs no tracking server.

With `--format onnx` the folder also gets `model.onnx` and `facemask_onnx.json`, written only
after ONNX Runtime matched PyTorch on real photos. The two files are logged under `onnx/` in
the model's run, and a registered version gets the tag `facemask.onnx_artifact_uri`, so that
`python serve.py` runs the registered version with ONNX Runtime as well.
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

EXPORT_FORMATS = ("mlflow", "onnx")
# Real photos that the ONNX check runs through both models, unless --check-images sets another
# number.
DEFAULT_CHECK_IMAGES = 32

LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


def default_tracking_uri() -> str:
    """Return `$MLFLOW_TRACKING_URI`, or the SQLite store in `mlruns/` that training uses."""
    return os.environ.get("MLFLOW_TRACKING_URI") or (
        f"sqlite:///{project_root() / 'mlruns' / 'mlflow.db'}"
    )


def export_model(
    uri: str,
    out: Path,
    tracking_uri: str,
    overwrite: bool = False,
    export_format: str = "mlflow",
    images: Path | None = None,
    check_images: int = DEFAULT_CHECK_IMAGES,
    log_onnx: bool = True,
) -> Path:
    """Download the model at `uri` into `out`, check that it loads, and return `out`.

    The folder is assembled next to `out` and renamed into place, so an interrupted export
    leaves no half-written model behind.

    Args:
        uri: The MLflow model URI to export.
        out: The folder to write.
        tracking_uri: The MLflow tracking URI that resolves `uri`.
        overwrite: Replace `out` if it exists.
        export_format: `mlflow` (the logged model only) or `onnx` (also `model.onnx`).
        images: Real photos for the ONNX check; by default the run's `data/root` parameter.
        check_images: Number of photos the ONNX check uses.
        log_onnx: Log the ONNX files to the model's run and tag the registered version.

    Raises:
        FileExistsError: `out` exists and `overwrite` is false.
        facemask.serving.model_store.ModelLoadError: The model cannot be resolved, downloaded or
            loaded, or it lacks the facemask metadata.
        facemask.serving.onnx_export.OnnxExportError: The ONNX conversion or check failed.
    """
    import mlflow
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from facemask.serving import model_store

    if export_format not in EXPORT_FORMATS:
        raise ValueError(f"export format {export_format!r} is invalid; use one of {EXPORT_FORMATS}")
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
            if export_format == "onnx":
                folder = images or _training_data_root(client, bundle.run_id)
                _write_onnx(bundle, staging, folder, check_images, info)
            if out.exists():
                shutil.rmtree(out)
            staging.rename(out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if export_format == "onnx" and log_onnx:
            _log_onnx(client, out, name, version, info["run_id"])
    except (MlflowException, OSError) as exc:
        raise model_store.ModelLoadError(
            f"Cannot export model {uri!r} from MLflow tracking URI "
            f"{model_store.redact_uri(tracking_uri)!r}: {' '.join(str(exc).split())}"
        ) from exc
    log.info("Exported model %s (name %s, version %s) to %s", uri, name, version, out)
    return out


def _training_data_root(client: Any, run_id: str | None) -> Path:
    """Return the `data/root` parameter of the model's training run."""
    from facemask.serving.onnx_export import OnnxExportError

    root = client.get_run(run_id).data.params.get("data/root") if run_id else None
    if not root or not Path(root).is_dir():
        raise OnnxExportError(
            f"the training data folder of run {run_id} ({root}) is not available for the ONNX "
            "check; pass --images DIR with real photos"
        )
    return Path(root)


def _write_onnx(
    bundle: Any, folder: Path, images: Path, check_images: int, info: dict[str, Any]
) -> None:
    from facemask.serving.onnx_export import find_images, write_onnx_export
    from facemask.serving.preprocessing import EvalPreprocessing

    write_onnx_export(
        bundle.model,
        bundle.class_names,
        EvalPreprocessing.from_dict(bundle.preprocessing.to_dict()),
        find_images(images, check_images),
        folder,
        source={
            key: info[key] for key in ("source_uri", "pinned_uri", "name", "version", "run_id")
        },
    )


def _log_onnx(
    client: Any, folder: Path, name: str | None, version: str | None, run_id: str | None
) -> None:
    """Log the ONNX files under `onnx/` in run `run_id` and tag the registered version."""
    from facemask.serving.served_model import (
        ONNX_ARTIFACT_PATH,
        ONNX_FILE,
        ONNX_INFO_FILE,
        ONNX_VERSION_TAG,
    )

    if not run_id:
        log.warning("The model has no run id, so the ONNX files were not logged to MLflow")
        return
    for file_name in (ONNX_FILE, ONNX_INFO_FILE):
        client.log_artifact(run_id, str(folder / file_name), artifact_path=ONNX_ARTIFACT_PATH)
    artifact_uri = f"runs:/{run_id}/{ONNX_ARTIFACT_PATH}"
    log.info("Logged the ONNX model to %s", artifact_uri)
    if name and version:
        client.set_model_version_tag(name, version, ONNX_VERSION_TAG, artifact_uri)
        log.info("Tagged %s version %s with %s=%s", name, version, ONNX_VERSION_TAG, artifact_uri)


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
    parser.add_argument(
        "--format",
        dest="export_format",
        choices=EXPORT_FORMATS,
        default="mlflow",
        help="mlflow: the logged PyTorch model; onnx: also model.onnx, checked against PyTorch "
        "on real photos and logged to the model's run (default: mlflow)",
    )
    parser.add_argument(
        "--images",
        type=Path,
        default=None,
        help="folder of real photos for the ONNX check (default: the data/root parameter of "
        "the model's training run)",
    )
    parser.add_argument(
        "--check-images",
        type=int,
        default=DEFAULT_CHECK_IMAGES,
        help=f"number of photos the ONNX check compares (default: {DEFAULT_CHECK_IMAGES})",
    )
    parser.add_argument(
        "--no-log",
        dest="log_onnx",
        action="store_false",
        help="write the ONNX files to --out only; do not log them to MLflow or tag the version",
    )


def run_export(args: argparse.Namespace) -> int:
    """Run `facemask export` with parsed arguments and return the exit status."""
    from facemask.serving.model_store import ModelLoadError
    from facemask.serving.onnx_export import OnnxExportError

    if args.check_images < 1:
        log.error("--check-images=%d is invalid; use 1 or more", args.check_images)
        return 2
    tracking_uri = args.tracking_uri or default_tracking_uri()
    try:
        out = export_model(
            args.model_uri,
            args.out,
            tracking_uri,
            overwrite=args.force,
            export_format=args.export_format,
            images=args.images,
            check_images=args.check_images,
            log_onnx=args.log_onnx,
        )
    except (ModelLoadError, FileExistsError) as exc:
        log.error("%s", exc)
        return 2
    except OnnxExportError as exc:
        log.error("ONNX export of %s failed: %s", args.model_uri, exc)
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
