"""`python train.py` / `facemask-train`: the Hydra entry point of the training job."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from facemask.settings import configure_environment, project_root

configure_environment()

import hydra  # noqa: E402
from hydra.errors import InstantiationException  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

if TYPE_CHECKING:
    from facemask.training import TrainingResult

log = logging.getLogger(__name__)


def _route_lightning_logs_to_root() -> None:
    # `import lightning` attaches its own console handler, so every Lightning message would
    # print twice next to the handlers that Hydra configures on the root logger.
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


# An absolute path: Hydra resolves a relative one as a Python module inside the package.
CONFIG_DIR = str(project_root() / "conf")


def _train_or_exit(cfg: DictConfig) -> TrainingResult | None:
    """Run `train`, turning data, download and model errors into a message and exit code 2."""
    from facemask.data.download import DownloadError
    from facemask.data.importer import DatasetImportError
    from facemask.data.scan import DatasetError
    from facemask.models.backbone import BackboneError, PretrainedWeightsError
    from facemask.training import train

    user_errors = (
        DatasetError,
        DatasetImportError,
        DownloadError,
        BackboneError,
        PretrainedWeightsError,
    )
    try:
        return train(cfg)
    except (*user_errors, InstantiationException) as exc:
        # Hydra wraps errors raised while building objects from `_target_` configs.
        cause = exc.__cause__ if isinstance(exc, InstantiationException) else exc
        if not isinstance(cause, user_errors):
            raise
        log.error("%s", cause)
        if isinstance(cause, DownloadError):
            log.error(
                "Without network access, put the images in data.root=PATH yourself, or import "
                "a zip or folder with `python scripts/download_data.py --from PATH`."
            )
        raise SystemExit(2) from exc


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Train, test, log and register a model; returns the best validation score for sweepers.

    In a multirun sweep a failed job is logged and returns None, so the next jobs still run.
    Ctrl+C, SIGTERM and a trainer that would start DDP processes stop the whole sweep.
    DDP processes other than rank zero return None.
    """
    from facemask.distributed import LaunchError
    from facemask.tracking.sweep import current_sweep_job
    from facemask.training import format_summary

    _route_lightning_logs_to_root()
    job = current_sweep_job()
    try:
        result = _train_or_exit(cfg)
    except LaunchError as exc:
        # Every job of the sweep would fail the same way, so the whole sweep stops here.
        log.error("%s", exc)
        raise SystemExit(2) from exc
    except Exception:
        if job is None:
            raise
        log.exception("Sweep job %d failed (overrides: %s)", job.job_num, " ".join(job.overrides))
        return None
    except SystemExit as exc:
        # Exit code 2 is a data or configuration error that `_train_or_exit` has logged.
        if job is None or exc.code != 2:
            raise
        log.error("Sweep job %d failed (overrides: %s)", job.job_num, " ".join(job.overrides))
        return None
    if result is None:
        # A DDP process other than rank zero: rank zero prints the summary.
        return None
    print(format_summary(result), flush=True)
    return result.val_score


if __name__ == "__main__":
    main()
