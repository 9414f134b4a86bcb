"""A watcher process that ends an MLflow run left RUNNING by a training process that died.

Lightning's DDP launcher kills the rank-zero process with SIGKILL when another process exits
with an error (`_ChildProcessObserver` in lightning 2.6), so that process cannot set the final
status of its run. The watcher reads a pipe from the training process. At end of file, which
comes however the training process exits, it marks the run FAILED if it is still RUNNING,
unless the training process wrote that it ended the run itself.

`python -m facemask.tracking.run_guard TRACKING_URI RUN_ID` runs the watcher; `RunGuard` starts it.
"""

from __future__ import annotations

import logging
import subprocess
import sys

# Named explicitly because the watcher runs as __main__.
log = logging.getLogger("facemask.tracking.run_guard")

_ENDED = b"ended\n"


class RunGuard:
    """A watcher process for `run_id`, started on creation. Call `release` after ending the run."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.run_id = run_id
        # A new session keeps Ctrl+C in the terminal from stopping the watcher with the training.
        self._process = subprocess.Popen(
            [sys.executable, "-m", __name__, tracking_uri, run_id],
            stdin=subprocess.PIPE,
            start_new_session=True,
        )

    def release(self) -> None:
        """Tell the watcher that the run has ended, so it exits without touching MLflow."""
        try:
            self._process.stdin.write(_ENDED)
            self._process.stdin.close()
            self._process.wait(timeout=10)
        except (BrokenPipeError, subprocess.TimeoutExpired) as exc:
            log.warning("The watcher of MLflow run %s did not stop cleanly: %r", self.run_id, exc)


def _watch(tracking_uri: str, run_id: str) -> int:
    # Blocks until the training process closes the pipe, or exits, or is killed.
    message = sys.stdin.buffer.read()
    if message == _ENDED:
        return 0

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    status = client.get_run(run_id).info.status
    if status != "RUNNING":
        return 0
    client.set_terminated(run_id, "FAILED")
    log.error(
        "MLflow run %s marked FAILED: its training process exited without ending it. It was "
        "killed, by Lightning when another DDP process failed (see that error above) or from "
        "outside",
        run_id,
    )
    return 1


if __name__ == "__main__":
    logging.basicConfig(format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    sys.exit(_watch(sys.argv[1], sys.argv[2]))
