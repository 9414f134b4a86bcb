"""Print a table of the experiment's MLflow runs, best first; see `--help`."""

from __future__ import annotations

import sys
from pathlib import Path

# Lets `python scripts/compare_runs.py` run from any folder without installing the package.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from facemask.settings import configure_environment  # noqa: E402

configure_environment()

from facemask.compare import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
