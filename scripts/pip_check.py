"""Run `pip check` and fail on every problem it reports except mediapipe's missing OpenCV.

    python scripts/pip_check.py

mediapipe 1.2.3 declares `opencv-contrib-python`, whose `cv2` package would replace the `cv2`
of `opencv-python-headless` (which albumentations needs) with a GUI build that needs libGL.
MediaPipe's face detector works with opencv-python-headless's cv2, so mediapipe is installed
with `--no-deps` (requirements-nodeps.in) and `pip check` always reports

    mediapipe 1.2.3 requires opencv-contrib-python, which is not installed.

This script accepts that line, for any mediapipe version, and exits with status 1 when pip
reports anything else, or with pip's own status when pip fails without a report. It checks the
environment of the interpreter that runs it.
"""

from __future__ import annotations

import re
import subprocess
import sys

ACCEPTED = re.compile(r"^mediapipe \S+ requires opencv-contrib-python, which is not installed\.$")


def unexpected_problems(report: str) -> list[str]:
    """Return the lines of a `pip check` report that `ACCEPTED` does not match."""
    lines = [line.strip() for line in report.splitlines() if line.strip()]
    return [line for line in lines if not ACCEPTED.match(line)]


def main() -> int:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "check"], capture_output=True, text=True, check=False
    )
    # pip's warnings, such as invalid distributions it skipped, go to stderr.
    print(result.stderr, end="", file=sys.stderr)
    report = result.stdout.strip()
    if result.returncode not in (0, 1) or (result.returncode == 1 and not report):
        print(result.stdout, end="", file=sys.stderr)
        print(f"pip check failed with exit status {result.returncode}", file=sys.stderr)
        return result.returncode or 1
    if result.returncode == 0:
        print(report)
        return 0
    problems = unexpected_problems(report)
    if problems:
        print("pip check found broken requirements:", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        return 1
    for line in report.splitlines():
        print(f"pip check: accepted: {line}")
    print("pip check: no other broken requirements")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
