"""Process-wide settings that must be in place before the heavy libraries are imported."""

from __future__ import annotations

import os
from pathlib import Path

# MLflow, Evidently and albumentations send usage telemetry or check for updates on import
# unless these are set. A user who wants them can export other values before starting.
TELEMETRY_OPT_OUT = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "NO_ALBUMENTATIONS_UPDATE": "1",
}

PROJECT_ROOT_ENV = "FACEMASK_ROOT"


def project_root() -> Path:
    """Return the project root: `$FACEMASK_ROOT`, or the folder that contains the package."""
    configured = os.environ.get(PROJECT_ROOT_ENV)
    if configured:
        return Path(configured).expanduser().resolve()
    return Path(__file__).resolve().parent.parent


def configure_environment() -> None:
    """Set the telemetry opt-outs and `$FACEMASK_ROOT` unless the user has set them.

    Also registers the OmegaConf resolvers that the Hydra configs use, such as `auto_precision`.
    """
    from facemask.hardware import register_config_resolvers

    for name, value in TELEMETRY_OPT_OUT.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault(PROJECT_ROOT_ENV, str(project_root()))
    register_config_resolvers()
