"""Evaluate a model on a class-folder dataset: `python scripts/evaluate.py data.root=FOLDER`."""

from __future__ import annotations

import sys
from pathlib import Path

# Lets `python scripts/evaluate.py` run from any folder without installing the package.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from facemask.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["evaluate", *sys.argv[1:]]))
