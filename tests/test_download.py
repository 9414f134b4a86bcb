"""Tests for downloading and importing the dataset, against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import io
import logging
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from facemask.data.download import (
    UPSTREAM_COMMIT,
    DownloadError,
    archive_file_name,
    download_archive,
    ensure_dataset,
    fetch_archive,
    main,
)
from facemask.data.importer import DatasetImportError, import_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
PREFIX = f"Face-Mask-Detection-{UPSTREAM_COMMIT}"
URL_PATH = f"/chandrikadeb7/Face-Mask-Detection/zip/{UPSTREAM_COMMIT}"

# Names with spaces, non-ASCII characters and no image suffix (a WEBP file), as upstream has.
MASK_NAMES = ["0_0_0 copy 10.jpg", "0_0_œ¬‘ÿ.png", "black3.jpg_1088Wx1632H", "0129.png", "0323.jpg"]


@pytest.fixture(autouse=True)
def _no_proxy_for_localhost(monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy configured in the environment must not intercept requests to the test server.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture(scope="session")
def sample_images(real_data_root: Path) -> dict[str, dict[str, bytes]]:
    """Return five real files per class, keyed by project class and then by file name."""
    no_mask_names = sorted(os.listdir(real_data_root / "no_mask"))[:5]
    return {
        "mask": {name: (real_data_root / "mask" / name).read_bytes() for name in MASK_NAMES},
        "no_mask": {
            name: (real_data_root / "no_mask" / name).read_bytes() for name in no_mask_names
        },
    }


def build_zip(entries: dict[str, bytes]) -> bytes:
    """Return a zip archive with one member per entry, in insertion order."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def upstream_entries(sample_images: dict[str, dict[str, bytes]]) -> dict[str, bytes]:
    """Return the members of a small archive in the upstream layout, with one broken image."""
    mask, no_mask = sample_images["mask"], sample_images["no_mask"]
    entries = {f"{PREFIX}/README.md": b"# Face Mask Detection\n"}
    entries |= {f"{PREFIX}/dataset/with_mask/{name}": data for name, data in mask.items()}
    entries[f"{PREFIX}/dataset/with_mask/broken.jpg"] = mask["0323.jpg"][:2000]
    entries |= {f"{PREFIX}/dataset/without_mask/{name}": data for name, data in no_mask.items()}
    # Images outside dataset/, resource forks and hidden files must not be imported.
    entries[f"{PREFIX}/examples/example_01.png"] = mask["0129.png"]
    entries[f"__MACOSX/{PREFIX}/dataset/with_mask/._0129.png"] = b"resource fork"
    entries[f"{PREFIX}/dataset/without_mask/.DS_Store"] = b"finder data"
    return entries


@pytest.fixture(scope="session")
def upstream_zip(sample_images: dict[str, dict[str, bytes]]) -> bytes:
    return build_zip(upstream_entries(sample_images))


class ArchiveServer(ThreadingHTTPServer):
    """An HTTP server for one payload that records request headers and can misbehave."""

    payload: bytes = b""
    # When set, the next response sends this many body bytes and then closes the connection.
    cut_after: int | None = None
    ignore_range: bool = False
    requests: list[dict[str, str]]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{URL_PATH}"


class ArchiveHandler(BaseHTTPRequestHandler):
    server: ArchiveServer

    def do_GET(self) -> None:
        server = self.server
        server.requests.append(dict(self.headers))
        payload = server.payload
        start = 0
        range_match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if range_match and not server.ignore_range:
            start = int(range_match.group(1))
            if start >= len(payload):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(payload)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
        else:
            self.send_response(200)
        body = payload[start:]
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.cut_after is not None:
            body = body[: server.cut_after]
            server.cut_after = None
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def archive_server(upstream_zip: bytes) -> Iterator[ArchiveServer]:
    server = ArchiveServer(("127.0.0.1", 0), ArchiveHandler)
    server.payload = upstream_zip
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def unused_url() -> str:
    """Return a URL on a 127.0.0.1 port that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/archive.zip"


def test_download_and_import_upstream_zip(
    archive_server: ArchiveServer, sample_images: dict[str, dict[str, bytes]], tmp_path: Path
) -> None:
    dest = download_archive(archive_server.url, tmp_path / "cache" / "a.zip", progress=False)
    assert dest.read_bytes() == archive_server.payload
    assert not (tmp_path / "cache" / "a.zip.part").exists()

    report = import_dataset(dest, tmp_path / "raw")
    raw = tmp_path / "raw"
    assert report.layout == "upstream"
    assert report.counts == {"mask": 5, "no_mask": 5}
    assert sorted(os.listdir(raw)) == ["mask", "no_mask"]
    for class_name, files in sample_images.items():
        assert sorted(os.listdir(raw / class_name)) == sorted(files)
        for name, data in files.items():
            assert (raw / class_name / name).read_bytes() == data, name
    assert [s.path for s in report.skipped] == [f"{PREFIX}/dataset/with_mask/broken.jpg"]
    assert "not a decodable image" in report.skipped[0].reason
    # Five images per class is far from the upstream README counts.
    assert len(report.warnings) == 2
    # The staging folder is gone after the rename.
    assert sorted(os.listdir(tmp_path)) == ["cache", "raw"]


def test_download_resumes_after_cut(archive_server: ArchiveServer, tmp_path: Path) -> None:
    cut = len(archive_server.payload) // 2
    archive_server.cut_after = cut
    dest = download_archive(
        archive_server.url, tmp_path / "a.zip", progress=False, chunk_size=4096, backoff=0
    )
    assert dest.read_bytes() == archive_server.payload
    assert len(archive_server.requests) == 2
    assert "Range" not in archive_server.requests[0]
    assert archive_server.requests[1].get("Range") == f"bytes={cut}-"


def test_download_resumes_part_file(archive_server: ArchiveServer, tmp_path: Path) -> None:
    (tmp_path / "a.zip.part").write_bytes(archive_server.payload[:1000])
    dest = download_archive(archive_server.url, tmp_path / "a.zip", progress=False)
    assert dest.read_bytes() == archive_server.payload
    assert len(archive_server.requests) == 1
    assert archive_server.requests[0].get("Range") == "bytes=1000-"


def test_download_complete_part_file(archive_server: ArchiveServer, tmp_path: Path) -> None:
    # The server responds 416 to a range that starts at the end of the file.
    (tmp_path / "a.zip.part").write_bytes(archive_server.payload)
    dest = download_archive(archive_server.url, tmp_path / "a.zip", progress=False)
    assert dest.read_bytes() == archive_server.payload
    assert len(archive_server.requests) == 1


def test_download_restarts_when_range_ignored(
    archive_server: ArchiveServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    archive_server.ignore_range = True
    # Bytes that differ from the payload, so that appending to them would corrupt the result.
    (tmp_path / "a.zip.part").write_bytes(b"x" * 1000)
    with caplog.at_level(logging.WARNING, logger="facemask.data.download"):
        dest = download_archive(archive_server.url, tmp_path / "a.zip", progress=False)
    assert dest.read_bytes() == archive_server.payload
    assert archive_server.requests[0].get("Range") == "bytes=1000-"
    assert "restarting from zero" in caplog.text


def write_class_folders(root: Path, sample_images: dict[str, dict[str, bytes]]) -> None:
    for class_name, files in sample_images.items():
        (root / class_name).mkdir(parents=True)
        for name, data in files.items():
            (root / class_name / name).write_bytes(data)


def test_import_class_folder_dir(
    sample_images: dict[str, dict[str, bytes]], tmp_path: Path
) -> None:
    source = tmp_path / "src"
    write_class_folders(source, sample_images)
    (source / "SOURCES.md").write_text("notes\n")
    (source / "no_mask" / "sub").mkdir()
    (source / "no_mask" / "sub" / "nested.jpg").write_bytes(sample_images["mask"]["0323.jpg"])
    (source / ".cache").mkdir()
    (source / ".cache" / "x.jpg").write_bytes(sample_images["mask"]["0323.jpg"])
    (source / "mask" / "link.jpg").symlink_to(source / "mask" / "0323.jpg")

    report = import_dataset(source, tmp_path / "out")
    out = tmp_path / "out"
    assert report.layout == "class-folder"
    assert report.counts == {"mask": 5, "no_mask": 6}
    assert sorted(os.listdir(out)) == ["mask", "no_mask"]
    assert (out / "no_mask" / "sub" / "nested.jpg").is_file()
    assert (out / "mask" / "0_0_œ¬‘ÿ.png").read_bytes() == sample_images["mask"]["0_0_œ¬‘ÿ.png"]
    assert not (out / "mask" / "link.jpg").exists()
    assert [(s.path, s.reason) for s in report.skipped] == [("mask/link.jpg", "symbolic link")]


def test_import_class_folder_zip(
    sample_images: dict[str, dict[str, bytes]], tmp_path: Path
) -> None:
    entries = {"facemask-data/SOURCES.md": b"notes\n"}
    for class_name, files in sample_images.items():
        entries |= {f"facemask-data/{class_name}/{name}": data for name, data in files.items()}
    source = tmp_path / "facemask-data.zip"
    source.write_bytes(build_zip(entries))

    report = import_dataset(source, tmp_path / "out")
    assert report.layout == "class-folder"
    assert report.counts == {"mask": 5, "no_mask": 5}
    assert report.skipped == []
    assert report.warnings == []
    assert sorted(os.listdir(tmp_path / "out" / "mask")) == sorted(MASK_NAMES)


def test_import_skips_unsafe_members(
    sample_images: dict[str, dict[str, bytes]], tmp_path: Path
) -> None:
    image = sample_images["mask"]["0323.jpg"]
    absolute = (tmp_path / "absolute_evil.jpg").as_posix()
    unsafe = ["../evil.jpg", "mask/../../evil2.jpg", absolute, "mask\\..\\..\\evil3.jpg"]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("mask/a.jpg", image)
        archive.writestr("no_mask/b.jpg", image)
        for name in unsafe:
            archive.writestr(name, image)
        link = zipfile.ZipInfo("mask/link.jpg")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "../../../evil4.jpg")
    source = tmp_path / "src.zip"
    source.write_bytes(buffer.getvalue())
    out = tmp_path / "work" / "out"

    report = import_dataset(source, out)
    assert report.counts == {"mask": 1, "no_mask": 1}
    reasons = {s.path: s.reason for s in report.skipped}
    for name in unsafe:
        assert reasons.get(name, "").startswith("unsafe path"), name
    assert reasons.get("mask/link.jpg") == "symbolic link"
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.jpg"))
    assert written == ["work/out/mask/a.jpg", "work/out/no_mask/b.jpg"]
    assert not (tmp_path.parent / "evil.jpg").exists()


def test_import_rejects_non_empty_out_dir(upstream_zip: bytes, tmp_path: Path) -> None:
    source = tmp_path / "a.zip"
    source.write_bytes(upstream_zip)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data\n")

    with pytest.raises(DatasetImportError, match="--force"):
        import_dataset(source, out)
    assert os.listdir(out) == ["keep.txt"]

    report = import_dataset(source, out, force=True)
    assert report.counts == {"mask": 5, "no_mask": 5}
    assert sorted(os.listdir(out)) == ["mask", "no_mask"]
    assert sorted(os.listdir(tmp_path)) == ["a.zip", "out"]


@pytest.mark.parametrize(
    ("without_mask", "message"),
    [
        ({}, "'no_mask' has no decodable images"),
        ({"broken.jpg": b"not an image"}, "'no_mask' has no decodable images"),
    ],
    ids=["missing", "only-broken"],
)
def test_import_fails_on_empty_class(
    sample_images: dict[str, dict[str, bytes]],
    tmp_path: Path,
    without_mask: dict[str, bytes],
    message: str,
) -> None:
    entries = {f"{PREFIX}/dataset/with_mask/{n}": d for n, d in sample_images["mask"].items()}
    entries |= {f"{PREFIX}/dataset/without_mask/{n}": d for n, d in without_mask.items()}
    source = tmp_path / "a.zip"
    source.write_bytes(build_zip(entries))

    with pytest.raises(DatasetImportError, match=message):
        import_dataset(source, tmp_path / "out")
    assert os.listdir(tmp_path) == ["a.zip"]


def test_ensure_dataset_keeps_ready_folder(
    sample_images: dict[str, dict[str, bytes]], tmp_path: Path, unused_url: str
) -> None:
    root = tmp_path / "raw"
    write_class_folders(root, sample_images)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))

    assert ensure_dataset(root, url=unused_url, cache_dir=tmp_path / "cache") == root
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    assert not (tmp_path / "cache").exists()


def test_ensure_dataset_downloads_once(archive_server: ArchiveServer, tmp_path: Path) -> None:
    root = tmp_path / "raw"
    cache = tmp_path / "cache"
    ensure_dataset(root, url=archive_server.url, cache_dir=cache, progress=False)
    assert sorted(os.listdir(root)) == ["mask", "no_mask"]
    assert len(os.listdir(root / "no_mask")) == 5
    assert len(archive_server.requests) == 1

    # A second import reuses the cached archive instead of downloading it again.
    for path in sorted(root.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    ensure_dataset(root, url=archive_server.url, cache_dir=cache, progress=False)
    assert len(os.listdir(root / "mask")) == 5
    assert len(archive_server.requests) == 1


def test_cli_unreachable_url(tmp_path: Path, unused_url: str) -> None:
    command = [sys.executable, str(REPO_ROOT / "scripts" / "download_data.py")]
    command += ["--url", unused_url, "--out", str(tmp_path / "out")]
    command += ["--cache-dir", str(tmp_path / "cache"), "--retries", "0", "--no-progress"]
    result = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"error: Download of {unused_url} failed"), result.stderr
    assert "--from PATH" in last_line
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_imports_from_zip(
    upstream_zip: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "a.zip"
    source.write_bytes(upstream_zip)
    out = tmp_path / "out"

    assert main(["--from", str(source), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"Imported 10 images (upstream layout) into {out}" in printed
    assert re.search(r"^  mask +5$", printed, re.MULTILINE), printed
    assert re.search(r"^  no_mask +5$", printed, re.MULTILINE), printed
    assert f"{PREFIX}/dataset/with_mask/broken.jpg: not a decodable image" in printed


def test_cli_rejects_non_empty_out(
    tmp_path: Path, unused_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data\n")
    # The check must come before the download, which would fail on this URL.
    args = ["--url", unused_url, "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    args += ["--retries", "0"]
    assert main(args) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: Output folder {out} is not empty; pass --force")
    assert len(error.splitlines()) == 1


def test_cli_help_names_units(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--out", "--url", "--from PATH", "--force", "--cache-dir", "--timeout SECONDS"):
        assert option in text


def test_fetch_archive_replaces_invalid_cache(
    archive_server: ArchiveServer, tmp_path: Path
) -> None:
    cached = tmp_path / archive_file_name(archive_server.url)
    cached.write_bytes(b"truncated download")
    assert fetch_archive(archive_server.url, tmp_path, progress=False) == cached
    assert cached.read_bytes() == archive_server.payload
    assert len(archive_server.requests) == 1


def test_download_rejects_non_http_url(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="expected an http:// or https:// URL"):
        download_archive("ftp://127.0.0.1/archive.zip", tmp_path / "a.zip")
    assert not (tmp_path / "a.zip").exists()
