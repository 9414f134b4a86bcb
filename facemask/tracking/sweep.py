"""Tags and names that tell the MLflow runs of a Hydra multirun sweep apart."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from hydra.types import RunMode
from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

log = logging.getLogger(__name__)

SWEEP_ID_TAG = "sweep.id"
SWEEP_DIR_TAG = "sweep.dir"
SWEEP_JOB_TAG = "sweep.job_num"
SWEEP_OVERRIDES_TAG = "sweep.overrides"

# Run names leave out overrides with these key prefixes because they are paths or the same in
# every job. The `sweep.overrides` tag keeps all overrides.
_NAME_SKIPPED_PREFIXES = (
    "model=",
    "mlflow.",
    "paths.",
    "hydra.",
    "hparams_search=",
    "data.root=",
    "data.cache_dir=",
)
_MAX_NAME_OVERRIDES_CHARS = 60


@dataclass(frozen=True)
class SweepJob:
    """The position of one job in a Hydra multirun sweep."""

    sweep_id: str
    sweep_dir: str
    job_num: int
    overrides: list[str]
    # Keys given several values on the command line; empty when the sweep's overrides are unknown.
    swept_keys: frozenset[str] = frozenset()


def current_sweep_job() -> SweepJob | None:
    """Return the sweep job this process runs, or None outside a Hydra multirun."""
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    sweep_dir = Path(hydra_cfg.sweep.dir).resolve()
    return SweepJob(
        # The sweep folder name (its start time by default) is shared by all jobs of a sweep.
        sweep_id=sweep_dir.name,
        sweep_dir=str(sweep_dir),
        job_num=int(hydra_cfg.job.num),
        overrides=list(hydra_cfg.overrides.task),
        swept_keys=_read_swept_keys(sweep_dir) | _search_space_keys(hydra_cfg.sweeper),
    )


def _read_swept_keys(sweep_dir: Path) -> frozenset[str]:
    """Return the swept keys in `multirun.yaml`, which Hydra's basic sweeper writes first.

    Other sweepers (Optuna) write no such file, so an empty set comes back without a warning.
    """
    path = sweep_dir / "multirun.yaml"
    if not path.exists():
        return frozenset()
    try:
        task_overrides = list(OmegaConf.load(path).hydra.overrides.task)
        parsed = OverridesParser.create().parse_overrides(task_overrides)
    except (OSError, ValueError, TypeError, AttributeError, OverrideParseException) as exc:
        log.warning(
            "Could not read the swept keys from %s (%s); naming runs by all overrides", path, exc
        )
        return frozenset()
    return frozenset(override.key_or_group for override in parsed if override.is_sweep_override())


def _search_space_keys(sweeper_cfg) -> frozenset[str]:
    """Return the keys of an Optuna search space (`hydra.sweeper.params`), else an empty set."""
    search_space = sweeper_cfg.get("params") if sweeper_cfg is not None else None
    return frozenset(str(key) for key in (search_space or {}))


def _short_value(value: str) -> str:
    """Return a float with 3 significant digits, so sampled values stay short in run names."""
    try:
        number = float(value)
    except ValueError:
        return value
    if number.is_integer() or value.lower() in ("nan", "inf", "-inf"):
        return value
    return f"{number:.3g}"


def sweep_run_name(model_name: str, job: SweepJob) -> str:
    """Return `<model>-<short overrides>#<job number>`, e.g. `resnet18-lr=0.001#2`.

    The overrides are those of the swept keys when known, else all but paths and tracking
    settings. Keys are shortened to their last component. The job number keeps names unique
    when the overrides are cut at 60 characters or all left out.
    """
    parts = []
    for override in job.overrides:
        if override.startswith(_NAME_SKIPPED_PREFIXES):
            continue
        if job.swept_keys and override.partition("=")[0] not in job.swept_keys:
            continue
        key, _, value = override.partition("=")
        parts.append(f"{key.rsplit('.', 1)[-1]}={_short_value(value)}" if value else key)
    short = ",".join(parts)
    if len(short) > _MAX_NAME_OVERRIDES_CHARS:
        short = short[: _MAX_NAME_OVERRIDES_CHARS - 3] + "..."
    name = f"{model_name}-{short}" if short else model_name
    return f"{name}#{job.job_num}"


def tag_sweep_run(client: MlflowClient, run_id: str, model_name: str) -> SweepJob | None:
    """Tag and rename the run when it is a sweep job; return the job, or None outside a sweep."""
    job = current_sweep_job()
    if job is None:
        return None
    name = sweep_run_name(model_name, job)
    tags = {
        SWEEP_ID_TAG: job.sweep_id,
        SWEEP_DIR_TAG: job.sweep_dir,
        SWEEP_JOB_TAG: str(job.job_num),
        SWEEP_OVERRIDES_TAG: " ".join(job.overrides),
        "mlflow.runName": name,
    }
    client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])
    log.info("Sweep %s job %d: MLflow run %s named %r", job.sweep_id, job.job_num, run_id, name)
    return job
