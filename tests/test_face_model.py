"""The installed BlazeFace model file, its hash check and `facemask fetch-face-model`.

The fetch tests run the real `pip download` against a local folder (`--no-index --find-links`)
that contains a small wheel built here, so they need no network.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facemask.cli import main as cli_main
from facemask.faces import detector
from facemask.faces.detector import (
    BLAZEFACE_FILE,
    BLAZEFACE_MEMBER,
    BLAZEFACE_SHA256,
    BlazeFaceDetector,
    FaceModelMissingError,
    blazeface_model_path,
)
from facemask.faces.fetch import FaceModelFetchError, fetch_face_model, sha256_of
from tests.test_serve_cli import PHOTO

# The file name pip expects for the pinned wheel with the options in facemask.faces.fetch.
WHEEL_NAME = "mediapipe-0.10.21-cp311-cp311-manylinux_2_28_x86_64.whl"


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    return blazeface_model_path().read_bytes()


def build_wheel(folder: Path, members: dict[str, bytes]) -> tuple[Path, str]:
    """Write a minimal mediapipe 0.10.21 wheel with `members`; return it and its SHA-256."""
    folder.mkdir(parents=True, exist_ok=True)
    dist_info = "mediapipe-0.10.21.dist-info"
    files = {
        **members,
        f"{dist_info}/METADATA": b"Metadata-Version: 2.1\nName: mediapipe\nVersion: 0.10.21\n",
        f"{dist_info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: false\n"
            b"Tag: cp311-cp311-manylinux_2_28_x86_64\n"
        ),
    }
    record = "".join(f"{name},,\n" for name in files) + f"{dist_info}/RECORD,,\n"
    files[f"{dist_info}/RECORD"] = record.encode()
    path = folder / WHEEL_NAME
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def local_index(folder: Path) -> list[str]:
    return ["--no-index", "--find-links", str(folder)]


def test_installed_model_passes_hash_check():
    path = blazeface_model_path()

    assert path.name == BLAZEFACE_FILE
    assert sha256_of(path) == BLAZEFACE_SHA256


def test_blazeface_finds_face_in_photo(real_data_root: Path):
    rgb = np.asarray(Image.open(real_data_root / PHOTO).convert("RGB"))
    height, width = rgb.shape[:2]

    boxes = BlazeFaceDetector(min_score=0.5).detect(rgb)

    assert len(boxes) == 1
    box = boxes[0]
    assert box.score >= 0.5
    assert -0.1 * width <= box.x0 < box.x1 <= 1.1 * width
    assert -0.1 * height <= box.y0 < box.y1 <= 1.1 * height
    # The photo is a close-up portrait: the face covers a large part of it.
    assert box.area > 0.1 * width * height


def test_model_with_wrong_hash_is_rejected(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(detector, "MODELS_DIR", tmp_path)
    (tmp_path / BLAZEFACE_FILE).write_bytes(b"not the BlazeFace model")

    with pytest.raises(FaceModelMissingError, match=f"expected {BLAZEFACE_SHA256}") as info:
        BlazeFaceDetector()

    assert "facemask fetch-face-model" in str(info.value)


def test_missing_model_is_reported(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(detector, "MODELS_DIR", tmp_path)

    with pytest.raises(FaceModelMissingError, match="is missing") as info:
        blazeface_model_path()

    assert "facemask fetch-face-model" in str(info.value)


def test_fetch_extracts_model_from_wheel(tmp_path: Path, model_bytes: bytes):
    _, wheel_sha256 = build_wheel(tmp_path / "index", {BLAZEFACE_MEMBER: model_bytes})
    dest = tmp_path / "models" / BLAZEFACE_FILE

    written = fetch_face_model(
        dest, wheel_sha256=wheel_sha256, pip_options=local_index(tmp_path / "index")
    )

    assert written is True
    assert dest.read_bytes() == model_bytes
    assert [path.name for path in dest.parent.iterdir()] == [BLAZEFACE_FILE]
    assert BlazeFaceDetector(model_path=dest).model_path == dest


def test_fetch_skips_installed_model(tmp_path: Path, model_bytes: bytes):
    dest = tmp_path / BLAZEFACE_FILE
    dest.write_bytes(model_bytes)
    # An index without the wheel: the call fails if it runs pip.
    (tmp_path / "empty").mkdir()

    written = fetch_face_model(dest, pip_options=local_index(tmp_path / "empty"))

    assert written is False
    assert dest.read_bytes() == model_bytes


def test_fetch_replaces_model_with_wrong_hash(tmp_path: Path, model_bytes: bytes):
    _, wheel_sha256 = build_wheel(tmp_path / "index", {BLAZEFACE_MEMBER: model_bytes})
    dest = tmp_path / BLAZEFACE_FILE
    dest.write_bytes(b"truncated")

    written = fetch_face_model(
        dest, wheel_sha256=wheel_sha256, pip_options=local_index(tmp_path / "index")
    )

    assert written is True
    assert dest.read_bytes() == model_bytes


def test_fetch_rejects_member_with_wrong_hash(tmp_path: Path):
    _, wheel_sha256 = build_wheel(tmp_path / "index", {BLAZEFACE_MEMBER: b"another model"})
    dest = tmp_path / "models" / BLAZEFACE_FILE

    with pytest.raises(FaceModelFetchError, match=f"expected {BLAZEFACE_SHA256}"):
        fetch_face_model(
            dest, wheel_sha256=wheel_sha256, pip_options=local_index(tmp_path / "index")
        )

    assert not dest.parent.exists()


def test_fetch_rejects_wheel_with_wrong_hash(tmp_path: Path, model_bytes: bytes):
    build_wheel(tmp_path / "index", {BLAZEFACE_MEMBER: model_bytes})
    dest = tmp_path / "models" / BLAZEFACE_FILE

    with pytest.raises(FaceModelFetchError, match="does not have the pinned SHA-256"):
        fetch_face_model(dest, wheel_sha256="0" * 64, pip_options=local_index(tmp_path / "index"))

    assert not dest.parent.exists()


def test_fetch_reports_wheel_without_model(tmp_path: Path):
    _, wheel_sha256 = build_wheel(tmp_path / "index", {"mediapipe/__init__.py": b""})

    with pytest.raises(FaceModelFetchError, match=f"has no member {BLAZEFACE_MEMBER}"):
        fetch_face_model(
            tmp_path / BLAZEFACE_FILE,
            wheel_sha256=wheel_sha256,
            pip_options=local_index(tmp_path / "index"),
        )


def test_fetch_command_fails_without_index(tmp_path: Path, monkeypatch, caplog):
    # pip reads these variables, so the download sees no index at all, as without a network.
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    dest = tmp_path / "models" / BLAZEFACE_FILE

    status = cli_main(["fetch-face-model", "--dest", str(dest)])

    assert status == 1
    assert "pip could not download mediapipe==0.10.21" in caplog.text
    assert "Check the network connection" in caplog.text
    assert not dest.parent.exists()


def test_fetch_command_accepts_installed_model(tmp_path: Path, model_bytes: bytes):
    dest = tmp_path / BLAZEFACE_FILE
    dest.write_bytes(model_bytes)

    assert cli_main(["fetch-face-model", "--dest", str(dest)]) == 0
