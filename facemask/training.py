"""The training job: split the data, train, test the best checkpoint, log and register the model."""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import mlflow
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.loggers.logger import DummyLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from facemask.checks import list_ood_files, run_checks
from facemask.data.datamodule import FaceMaskDataModule
from facemask.distributed import check_launch, stop_started_processes
from facemask.models.classifier import FaceMaskClassifier
from facemask.monitoring.reference import build_reference, log_reference
from facemask.tracking.artifacts import log_run_inputs, log_test_reports
from facemask.tracking.registry import RegistrationResult, log_model, register_and_promote
from facemask.tracking.run_guard import RunGuard
from facemask.tracking.sweep import tag_sweep_run

log = logging.getLogger(__name__)

# Written next to the checkpoints folder so a resumed training continues the same MLflow run.
RUN_ID_FILE = "mlflow_run_id"

# The start of the warning that lightning 2.6 gives when trainer.test runs on several processes.
_DISTRIBUTED_TEST_WARNING = re.escape("Using `DistributedSampler` with the dataloaders.")


@dataclass
class TrainingResult:
    """Outputs of a finished training job."""

    run_id: str
    experiment_id: str
    tracking_uri: str
    output_dir: Path
    best_checkpoint: str | None
    val_score: float | None
    test_metrics: dict[str, float] = field(default_factory=dict)
    registration: RegistrationResult | None = None
    artifact_uri: str = ""


def _instantiate_callbacks(cfg: DictConfig) -> list[Callback]:
    callbacks_cfg = cfg.get("callbacks") or {}
    callbacks = [
        instantiate(entry) for entry in callbacks_cfg.values() if entry and "_target_" in entry
    ]
    if cfg.trainer.get("enable_progress_bar", True) is False:
        # Lightning raises when a progress bar callback comes with enable_progress_bar=false.
        callbacks = [callback for callback in callbacks if not isinstance(callback, ProgressBar)]
    return callbacks


def _resumed_run_id(ckpt_path: str | None) -> str | None:
    if not ckpt_path:
        return None
    run_file = Path(ckpt_path).expanduser().resolve().parent.parent / RUN_ID_FILE
    if run_file.is_file():
        return run_file.read_text().strip() or None
    return None


@contextlib.contextmanager
def _exit_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into `SystemExit(143)` so the run is marked KILLED instead of left RUNNING."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _final_status(exc: BaseException) -> str:
    # Ctrl+C makes Lightning call sys.exit(1); SIGTERM raises SIGTERMException(SystemExit).
    return "KILLED" if isinstance(exc, KeyboardInterrupt | SystemExit) else "FAILED"


def build_components(cfg: DictConfig) -> tuple[FaceMaskDataModule, FaceMaskClassifier]:
    """Check and split the data, then build the model sized to its classes.

    Everything that can fail on bad input fails here, before an MLflow run exists.
    """
    datamodule: FaceMaskDataModule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    if datamodule.ood_root is not None and cfg.checks.ood:
        # A wrong OOD folder fails now, not after the training.
        list_ood_files(datamodule.ood_root, datamodule.classes)
    model: FaceMaskClassifier = instantiate(cfg.model, class_names=datamodule.classes)
    return datamodule, model


def train(cfg: DictConfig) -> TrainingResult | None:
    """Run the whole training job described by a composed `conf/train.yaml`.

    Under DDP every process runs this function, and all of them fit and test. Only the process
    of global rank zero creates and ends the MLflow run, writes the run files and registers the
    model. The other processes return None.
    """
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # Lightning sets the global rank while it builds the Trainer, from LOCAL_RANK and NODE_RANK
    # or from the cluster's variables (torchrun, SLURM), so the rank is right from here on.
    callbacks = _instantiate_callbacks(cfg)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False)
    check_launch(trainer)
    datamodule, model = build_components(cfg)
    if not trainer.is_global_zero:
        # A logger that records nothing, because LearningRateMonitor needs one on every process.
        trainer.loggers = [DummyLogger()]
        _fit_and_test(cfg, trainer, datamodule, model)
        return None

    logger, client, run_id, resumed_run_id = _start_run(cfg, trainer, output_dir)
    # Lightning's DDP launcher may kill this process with SIGKILL when another process fails,
    # so a separate watcher ends the run then.
    guard = RunGuard(cfg.mlflow.tracking_uri, run_id) if trainer.world_size > 1 else None

    try:
        result = _run(
            cfg, trainer, logger, client, run_id, datamodule, model, output_dir, resumed_run_id
        )
    except BaseException as exc:
        status = _final_status(exc)
        log.error(
            "Training stopped (%s); MLflow run %s marked %s", type(exc).__name__, run_id, status
        )
        try:
            client.set_terminated(run_id, status)
            if guard is not None:
                guard.release()
        finally:
            stop_started_processes(trainer)
        if isinstance(exc, SIGTERMException):
            # Lightning raises it without an exit code, which would exit with status 0.
            raise SystemExit(128 + signal.SIGTERM) from exc
        raise
    client.set_terminated(run_id, "FINISHED")
    if guard is not None:
        guard.release()
    return result


def _start_run(
    cfg: DictConfig, trainer: L.Trainer, output_dir: Path
) -> tuple[MLFlowLogger, MlflowClient, str, str | None]:
    """Create the MLflow run, or continue the resumed one, and attach its logger to `trainer`.

    Returns:
        The logger, its client, the run id and the resumed run id (None for a new run).
    """
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    resumed_run_id = _resumed_run_id(cfg.get("ckpt_path"))
    logger: MLFlowLogger = instantiate(cfg.logger.mlflow, run_id=resumed_run_id)
    # Lightning puts a DummyLogger in place of the loggers given to a fast_dev_run Trainer, and
    # this logger is attached after the Trainer is built, so the same is done here.
    trainer.loggers = [DummyLogger()] if trainer.fast_dev_run else [logger]
    client: MlflowClient = logger.experiment
    run_id = logger.run_id
    (output_dir / RUN_ID_FILE).write_text(run_id)
    tag_sweep_run(client, run_id, cfg.model.name)
    log.info(
        "MLflow run %s in experiment %r (%s)",
        run_id,
        cfg.mlflow.experiment_name,
        cfg.mlflow.tracking_uri,
    )
    return logger, client, run_id, resumed_run_id


def _fit_and_test(
    cfg: DictConfig,
    trainer: L.Trainer,
    datamodule: FaceMaskDataModule,
    model: FaceMaskClassifier,
) -> tuple[str, float | None, dict[str, float]]:
    """Fit, then test the best checkpoint.

    Returns:
        The best checkpoint's path ("" when none was saved), its validation score and the test
        metrics.
    """
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    if trainer.interrupted:
        raise KeyboardInterrupt("training was interrupted")

    checkpoint = trainer.checkpoint_callback
    best_path = checkpoint.best_model_path if isinstance(checkpoint, ModelCheckpoint) else ""
    val_score = None
    if isinstance(checkpoint, ModelCheckpoint) and checkpoint.best_model_score is not None:
        val_score = float(checkpoint.best_model_score)
    with warnings.catch_warnings():
        # The classifier drops the test samples that DistributedSampler repeats to give every
        # process as many, so each test image counts once and this warning does not apply.
        warnings.filterwarnings("ignore", message=_DISTRIBUTED_TEST_WARNING)
        # Without a saved checkpoint (fast_dev_run) the weights in memory are tested.
        trainer.test(model, datamodule=datamodule, ckpt_path=best_path or None, weights_only=True)
    test_metrics = {
        key: float(value)
        for key, value in trainer.callback_metrics.items()
        if key.startswith("test/") and value.numel() == 1
    }
    return best_path, val_score, test_metrics


def _run(
    cfg: DictConfig,
    trainer: L.Trainer,
    logger,
    client: MlflowClient,
    run_id: str,
    datamodule: FaceMaskDataModule,
    model: FaceMaskClassifier,
    output_dir: Path,
    resumed_run_id: str | None,
) -> TrainingResult:
    if resumed_run_id:
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "resumed_from", str(cfg.ckpt_path))
    else:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    log_run_inputs(client, run_id, cfg, datamodule, output_dir)

    best_path, val_score, test_metrics = _fit_and_test(cfg, trainer, datamodule, model)
    log_test_reports(client, run_id, model.test_results, datamodule.classes, output_dir)
    log_reference(client, run_id, build_reference(datamodule, model.test_results), output_dir)
    test_metrics.update(_run_checks(cfg, client, run_id, datamodule, model, output_dir))

    registration = _log_and_register(cfg, run_id, datamodule, model, test_metrics)
    run = client.get_run(run_id)
    return TrainingResult(
        run_id=run_id,
        experiment_id=run.info.experiment_id,
        tracking_uri=cfg.mlflow.tracking_uri,
        output_dir=output_dir,
        best_checkpoint=best_path or None,
        val_score=val_score,
        test_metrics=test_metrics,
        registration=registration,
        artifact_uri=run.info.artifact_uri,
    )


def _run_checks(
    cfg: DictConfig,
    client: MlflowClient,
    run_id: str,
    datamodule: FaceMaskDataModule,
    model: FaceMaskClassifier,
    output_dir: Path,
) -> dict[str, float]:
    """Run the out-of-distribution, framing and Grad-CAM checks on the tested model.

    A check that fails is logged with its traceback and tagged on the run; the trained model
    is still logged and registered.
    """
    test_paths, test_labels = datamodule.split_images("test")
    try:
        return run_checks(
            client=client,
            run_id=run_id,
            model=model.probability_model().eval(),
            class_names=datamodule.classes,
            preprocessing=datamodule.preprocessing,
            face_stage=datamodule.face_stage_settings,
            test_paths=test_paths,
            test_labels=test_labels,
            ood_root=datamodule.ood_root,
            output_dir=output_dir,
            settings=OmegaConf.to_container(cfg.checks, resolve=True),
        )
    except Exception as exc:
        log.exception("The end-of-training checks failed; the model is still logged")
        client.set_tag(run_id, "checks.error", f"{type(exc).__name__}: {exc}"[:5000])
        return {}


def _log_and_register(
    cfg: DictConfig,
    run_id: str,
    datamodule: FaceMaskDataModule,
    model: FaceMaskClassifier,
    test_metrics: dict[str, float],
) -> RegistrationResult | None:
    test_set = datamodule.datasets["test"]
    example = torch.stack([test_set[i][0] for i in range(min(2, len(test_set)))])
    if example.shape[0] < 2:
        example = example.repeat(2, 1, 1, 1)
    with mlflow.start_run(run_id=run_id):
        info = log_model(
            model.probability_model(),
            example,
            datamodule.classes,
            datamodule.preprocessing,
            extra_metadata={
                "timm_model": cfg.model.name,
                "run_id": run_id,
                "face_stage": (
                    datamodule.face_stage_settings.to_dict()
                    if datamodule.face_stage_settings is not None
                    else None
                ),
            },
        )
        # start_run on an existing run marks it FINISHED on exit; the caller sets the real status.
    log.info("Logged the model as %s", info.model_uri)
    if not cfg.registry.register:
        return RegistrationResult(info.model_uri, None, None, None, False, "registration is off")
    return register_and_promote(
        info.model_uri,
        run_id,
        model_name=cfg.registry.model_name,
        alias=cfg.registry.alias,
        metrics=test_metrics,
        policy=cfg.registry.promote,
        compare_metric=cfg.registry.compare_metric,
        greater_is_better=cfg.registry.greater_is_better,
    )


def format_summary(result: TrainingResult) -> str:
    """Return the few lines a user needs after a training job."""
    rows = [
        ("MLflow run", f"{result.run_id} (experiment {result.experiment_id})"),
        ("Tracking URI", result.tracking_uri),
    ]
    reg = result.registration
    if reg is not None and reg.version is not None:
        where = "now on this version" if reg.promoted else "unchanged"
        rows.append(("Registered", f"{reg.model_name} version {reg.version}"))
        rows.append(("Alias", f"{reg.alias!r} {where} ({reg.reason})"))
        rows.append(("Model URI", f"models:/{reg.model_name}/{reg.version}"))
    elif reg is not None:
        rows.append(("Logged model", f"{reg.model_uri} (not registered: {reg.reason})"))
    for key in (
        "test/acc",
        "test/balanced_acc",
        "test/f1",
        "test/auroc",
        "test/loss",
        "ood/acc",
        "ood/balanced_acc",
        "framing/as_is_acc",
        "framing/face_crop_acc",
        "framing/zoom_out_acc",
        "cam/in_face_share",
        "cam/face_area_share",
    ):
        if key in result.test_metrics:
            rows.append((key, f"{result.test_metrics[key]:.4f}"))
    rows.append(("Artifacts", result.artifact_uri))
    rows.append(("Run folder", str(result.output_dir)))
    if result.best_checkpoint:
        rows.append(("Best checkpoint", result.best_checkpoint))
    width = max(len(label) for label, _ in rows) + 2
    lines = ["Training finished."]
    lines.extend(f"  {label + ':':<{width}}{value}" for label, value in rows)
    return "\n".join(lines)
