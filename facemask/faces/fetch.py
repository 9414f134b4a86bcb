"""Install the BlazeFace model file: `facemask fetch-face-model`, run by `make setup`.

mediapipe 1.x wheels do not contain the model file, but every `mediapipe==0.10.21` wheel does, at
`BLAZEFACE_MEMBER`. `fetch_face_model` downloads one fixed 0.10.21 wheel (CPython 3.11,
manylinux_2_28 x86-64, whatever the machine it runs on) with `pip download` in hash-checking
mode, extracts that one member, checks its SHA-256 against `BLAZEFACE_SHA256` and writes it to
`facemask/faces/models/` atomically. pip's index, proxy and certificate settings (pip.conf,
`PIP_*` variables) apply to the download. Nothing is installed, and nothing runs at serving time.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

from facemask.faces.detector import (
    BLAZEFACE_FILE,
    BLAZEFACE_MEMBER,
    BLAZEFACE_SHA256,
    BLAZEFACE_WHEEL,
    MODELS_DIR,
)

log = logging.getLogger(__name__)

# SHA-256 of mediapipe-0.10.21-cp311-cp311-manylinux_2_28_x86_64.whl on PyPI (35.6 MB), and the
# pip options that select exactly that file. Every platform's 0.10.21 wheel contains the same
# model file, so one fixed wheel keeps the hash valid on any machine.
BLAZEFACE_WHEEL_SHA256 = "05dc4a9e593655a79558d05d6227d31018c2537a4bd3362b51e230cf22aecfe3"
WHEEL_SELECTION = (
    "--only-binary=:all:",
    "--platform",
    "manylinux_2_28_x86_64",
    "--implementation",
    "cp",
    "--python-version",
    "3.11",
    "--abi",
    "cp311",
)
# Bound of the whole `pip download`, in seconds. pip's own connection timeout and retries (15 s
# and 5 by default, or $PIP_DEFAULT_TIMEOUT and $PIP_RETRIES) apply inside it.
DOWNLOAD_TIMEOUT_S = 900
# Last lines of pip's output that an error message repeats.
PIP_OUTPUT_LINES = 15


class FaceModelFetchError(RuntimeError):
    """The BlazeFace model file could not be downloaded, extracted or verified."""


def default_model_path() -> Path:
    """Return where `BlazeFaceDetector` looks for the model file."""
    return MODELS_DIR / BLAZEFACE_FILE


def sha256_of(path: Path) -> str:
    """Return the hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_face_model(
    dest: Path | None = None,
    *,
    wheel: str = BLAZEFACE_WHEEL,
    wheel_sha256: str = BLAZEFACE_WHEEL_SHA256,
    pip_options: Sequence[str] = (),
) -> bool:
    """Download the wheel that contains the BlazeFace model and install the model at `dest`.

    Args:
        dest: The model file to write; None writes `default_model_path()`.
        wheel: The requirement of the wheel, `name==version`.
        wheel_sha256: The SHA-256 that pip requires of the downloaded wheel.
        pip_options: Extra `pip download` options, for example `--no-index --find-links DIR`.

    Returns:
        True when the file was written, False when `dest` already had the expected SHA-256.

    Raises:
        FaceModelFetchError: pip could not download the wheel or it failed the hash check, the
            wheel has no model member, or the member's SHA-256 is not `BLAZEFACE_SHA256`.
            `dest` is left as it was.
    """
    dest = Path(dest) if dest is not None else default_model_path()
    if dest.is_file():
        digest = sha256_of(dest)
        if digest == BLAZEFACE_SHA256:
            log.info("The face detector model %s is installed (SHA-256 matches)", dest)
            return False
        log.warning(
            "%s has SHA-256 %s, expected %s, so it will be replaced", dest, digest, BLAZEFACE_SHA256
        )
    with tempfile.TemporaryDirectory(prefix="facemask-face-model-") as folder:
        wheel_path = download_wheel(Path(folder), wheel, wheel_sha256, pip_options)
        model = extract_model(wheel_path)
        write_atomically(dest, model)
    log.info("Installed the face detector model %s from %s", dest, wheel_path.name)
    return True


def download_wheel(
    folder: Path, wheel: str, wheel_sha256: str, pip_options: Sequence[str] = ()
) -> Path:
    """Download `wheel` into `folder` with `pip download` in hash-checking mode; return its path."""
    requirements = folder / "requirements.txt"
    requirements.write_text(f"{wheel} --hash=sha256:{wheel_sha256}\n")
    downloads = folder / "downloads"
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--require-hashes",
        *WHEEL_SELECTION,
        "--dest",
        str(downloads),
        "--requirement",
        str(requirements),
        *pip_options,
    ]
    log.info("Downloading %s (about 36 MB) to extract %s", wheel, BLAZEFACE_FILE)
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        raise FaceModelFetchError(
            f"downloading {wheel} timed out after {DOWNLOAD_TIMEOUT_S} s. Check the network "
            "connection or pip's proxy settings and run `facemask fetch-face-model` again"
        ) from None
    if result.returncode != 0:
        raise FaceModelFetchError(_download_failure(wheel, wheel_sha256, result))
    wheels = sorted(downloads.glob("*.whl"))
    if len(wheels) != 1:
        raise FaceModelFetchError(
            f"pip download of {wheel} left {len(wheels)} wheels instead of 1: {wheels}"
        )
    return wheels[0]


def _download_failure(wheel: str, wheel_sha256: str, result: subprocess.CompletedProcess) -> str:
    output = (result.stdout + result.stderr).strip()
    tail = "\n".join(output.splitlines()[-PIP_OUTPUT_LINES:])
    if "DO NOT MATCH THE HASHES" in output:
        return (
            f"the downloaded {wheel} wheel does not have the pinned SHA-256 {wheel_sha256}, "
            f"because the index served a different file. It was not used. pip's output:\n{tail}"
        )
    return (
        f"pip could not download {wheel} (exit status {result.returncode}). Check the network "
        "connection, or pip's index and proxy settings (pip.conf, PIP_INDEX_URL, PIP_CERT), "
        f"and run `facemask fetch-face-model` again. pip's output:\n{tail}"
    )


def extract_model(wheel_path: Path) -> bytes:
    """Return the BlazeFace model from a wheel, after checking its SHA-256."""
    try:
        with zipfile.ZipFile(wheel_path) as archive:
            model = archive.read(BLAZEFACE_MEMBER)
    except KeyError:
        raise FaceModelFetchError(f"{wheel_path.name} has no member {BLAZEFACE_MEMBER}") from None
    except zipfile.BadZipFile as exc:
        raise FaceModelFetchError(f"{wheel_path.name} is not a valid wheel: {exc}") from None
    digest = hashlib.sha256(model).hexdigest()
    if digest != BLAZEFACE_SHA256:
        raise FaceModelFetchError(
            f"{BLAZEFACE_MEMBER} in {wheel_path.name} has SHA-256 {digest}, expected "
            f"{BLAZEFACE_SHA256}. The file was not installed"
        )
    return model


def write_atomically(dest: Path, data: bytes) -> None:
    """Write `data` to `dest` through a temporary file in the same folder and a rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, dest)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def add_fetch_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of `facemask fetch-face-model` to `parser`."""
    parser.add_argument(
        "--dest",
        type=Path,
        default=None,
        help=f"model file to write (default: {default_model_path()})",
    )


def run_fetch(args: argparse.Namespace) -> int:
    """Run `facemask fetch-face-model` with parsed arguments and return the exit status."""
    try:
        fetch_face_model(args.dest)
    except (FaceModelFetchError, OSError) as exc:
        log.error("Fetching the face detector model failed: %s", exc)
        return 1
    return 0
