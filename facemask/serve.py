"""`python serve.py` / `facemask-serve`: the Hydra entry point of the prediction service."""

from __future__ import annotations

import contextlib
import gc
import logging
import signal
from collections.abc import Iterator

from facemask.settings import configure_environment, project_root

configure_environment()

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

log = logging.getLogger(__name__)

# An absolute path: Hydra resolves a relative one as a Python module inside the package.
CONFIG_DIR = str(project_root() / "conf")


@contextlib.contextmanager
def _exit_on_stop_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into `SystemExit(128 + signal number)`.

    uvicorn handles both signals while it runs, shuts down gracefully, restores these handlers
    and then raises the signal again, which lands here.
    """

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _stop_reason(exc: SystemExit) -> str:
    code = exc.code if isinstance(exc.code, int) else 1
    if code > 128:
        with contextlib.suppress(ValueError):
            return f"{signal.Signals(code - 128).name}, exit status {code}"
    return f"exit status {code}"


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="serve")
def main(cfg: DictConfig) -> None:
    """Load the configured model and serve it with uvicorn until SIGTERM or Ctrl+C."""
    # Only what serving needs: torch and MLflow are imported by the model loader when the
    # runtime or the model URI needs them.
    import uvicorn

    from facemask.serving.app import create_app
    from facemask.serving.model_store import ModelLoadError, redact_uri
    from facemask.serving.served_model import load_served_model
    from facemask.serving.settings import ServeSettings

    logging.getLogger().setLevel(str(cfg.log_level).upper())
    try:
        settings = ServeSettings.from_config(cfg)
    except ValueError as exc:
        log.error("Invalid serve configuration: %s", exc)
        raise SystemExit(2) from exc
    try:
        bundle = load_served_model(
            settings.model_uri,
            settings.tracking_uri,
            runtime=settings.runtime,
            threads=settings.intra_op_threads,
            torch_dtype=settings.torch_dtype,
            faces=settings.faces,
        )
    except ModelLoadError as exc:
        log.error("%s", exc)
        raise SystemExit(2) from exc

    app = create_app(settings, bundle)
    description = (
        f"model {bundle.uri} (name {bundle.name}, version {bundle.version}, run {bundle.run_id})"
    )
    log.info(
        "Starting the prediction service for %s on http://%s:%d (tracking URI %s, "
        "prediction log %s, runtime %s with %d threads)",
        description,
        settings.host,
        settings.port,
        redact_uri(settings.tracking_uri),
        settings.prediction_log,
        bundle.runtime,
        settings.intra_op_threads,
    )
    # The imported libraries and the model live until exit. Freezing them spares every full
    # collection a scan of them, and cut the exit after SIGTERM from 3.6 s to 0.7 s on 2 CPUs.
    gc.freeze()
    reason = "server exited"
    with _exit_on_stop_signals():
        try:
            uvicorn.run(
                app,
                host=settings.host,
                port=settings.port,
                log_level=settings.log_level,
                # Hydra configures the root logger; the app writes its own access log lines.
                log_config=None,
                access_log=False,
            )
        except SystemExit as exc:
            reason = _stop_reason(exc)
            raise
        finally:
            log.info("Stopped the prediction service for %s (%s)", description, reason)


if __name__ == "__main__":
    main()
