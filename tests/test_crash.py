"""A real server killed under load: the prediction log survives SIGKILL and SIGTERM drains.

Each prediction's line is written to the log with `os.write` before its response is sent, so
a line is in the kernel's page cache, and survives the death of the process, by the time the
client sees the 200. A line is lost only when the machine itself goes down before the page
cache is flushed, which these tests do not cover.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import TrainedModel
from tests.test_serve_cli import run_server

PHOTO = "no_mask/0_0_aidai_0014.jpg"
LOAD_THREADS = 8
# The load runs at most this long before and after the kill, and sends at most this many requests.
LOAD_SECONDS = 3.0
MAX_LOAD_REQUESTS = 2000
DRAIN_REQUESTS = 6


def _read_log(path: Path) -> list[dict]:
    """Parse every line of the log; a line that is not one complete JSON object fails the test."""
    records = []
    for number, line in enumerate(path.read_bytes().split(b"\n")[:-1], start=1):
        try:
            records.append(json.loads(line))
        except ValueError as exc:
            pytest.fail(f"{path} line {number} is not valid JSON ({exc}): {line[:200]!r}")
    assert path.read_bytes().endswith(b"\n"), f"{path} ends inside a line"
    return records


class _Load:
    """Threads that post one photo with their own request ids until stopped or out of budget."""

    def __init__(self, base_url: str, photo: bytes):
        self.base_url = base_url
        self.photo = photo
        self.ok: list[str] = []
        self.failed: dict[str, str] = {}
        self.sent = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=LOAD_THREADS)
        self._futures = []

    def start(self) -> None:
        self._futures = [self._pool.submit(self._worker) for _ in range(LOAD_THREADS)]

    def stop(self) -> None:
        self._stop.set()
        for future in self._futures:
            future.result(timeout=60)
        self._pool.shutdown()

    def _take(self) -> bool:
        with self._lock:
            if self._stop.is_set() or self.sent >= MAX_LOAD_REQUESTS:
                return False
            self.sent += 1
            return True

    def _worker(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=30) as client:
            while self._take():
                request_id = f"load-{uuid.uuid4().hex}"
                try:
                    response = client.post(
                        "/predict",
                        files={"file": ("photo.jpg", self.photo, "image/jpeg")},
                        headers={"X-Request-ID": request_id},
                    )
                except httpx.TransportError as exc:
                    outcome = type(exc).__name__
                else:
                    outcome = "ok" if response.status_code == 200 else str(response.status_code)
                with self._lock:
                    if outcome == "ok":
                        self.ok.append(request_id)
                    else:
                        self.failed[request_id] = outcome
                if outcome != "ok":
                    time.sleep(0.05)


@pytest.fixture
def photo(real_data_root: Path) -> bytes:
    return (real_data_root / PHOTO).read_bytes()


def _multipart(field: str, filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def test_sigkill_under_load_loses_no_line(
    trained_model: TrainedModel, tmp_path: Path, photo: bytes
):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    with run_server(first, trained_model.alias_uri, trained_model.tracking_uri) as server:
        load = _Load(server.base_url, photo)
        load.start()
        time.sleep(LOAD_SECONDS)
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=30)
        # The load goes on against the dead port, so requests in every stage see the kill.
        time.sleep(0.5)
        load.stop()

    assert server.process.returncode == -signal.SIGKILL
    records = _read_log(server.prediction_log)
    logged = {record["request_id"] for record in records}
    lost = sorted(set(load.ok) - logged)
    print(
        f"\nSIGKILL under load: {load.sent} requests, {len(load.ok)} got 200, "
        f"{len(load.failed)} failed ({sorted(set(load.failed.values()))}), {len(records)} log "
        f"lines, {len(lost)} lines lost, {len(logged - set(load.ok))} lines without a 200"
    )
    assert len(load.ok) >= 10
    assert lost == []
    assert len(records) == len(logged)
    # Every response that arrived was a 200; the kill only breaks connections.
    assert not [outcome for outcome in load.failed.values() if outcome.isdigit()]

    # A new server appends to the same log, so the lock file of the killed one does not block it.
    (second / "logs").mkdir(parents=True)
    os.replace(server.prediction_log, second / "logs" / "predictions.jsonl")
    with run_server(second, trained_model.alias_uri, trained_model.tracking_uri) as restarted:
        with httpx.Client(base_url=restarted.base_url, timeout=30) as client:
            response = client.post(
                "/predict",
                files={"file": ("photo.jpg", photo, "image/jpeg")},
                headers={"X-Request-ID": "after-restart"},
            )
        assert response.status_code == 200
        after = _read_log(restarted.prediction_log)
    assert [record["request_id"] for record in after[:-1]] == [
        record["request_id"] for record in records
    ]
    assert after[-1]["request_id"] == "after-restart"


def test_sigterm_drains_in_flight_requests(
    trained_model: TrainedModel, tmp_path: Path, photo: bytes
):
    body, content_type = _multipart("file", "photo.jpg", photo)
    sending = threading.Semaphore(0)
    release = threading.Event()

    def post(index: int, base_url: str) -> httpx.Response:
        def chunks() -> Iterator[bytes]:
            # Half the body now, the rest once the server has received SIGTERM.
            yield body[: len(body) // 2]
            sending.release()
            release.wait(timeout=60)
            yield body[len(body) // 2 :]

        headers = {
            "Content-Type": content_type,
            "Content-Length": str(len(body)),
            "X-Request-ID": f"drain-{index}",
        }
        with httpx.Client(base_url=base_url, timeout=60) as client:
            return client.post("/predict", content=chunks(), headers=headers)

    with run_server(tmp_path, trained_model.alias_uri, trained_model.tracking_uri) as server:
        with ThreadPoolExecutor(max_workers=DRAIN_REQUESTS) as pool:
            futures = [pool.submit(post, i, server.base_url) for i in range(DRAIN_REQUESTS)]
            for _ in range(DRAIN_REQUESTS):
                assert sending.acquire(timeout=30)
            # Time for the server to read the request headers it already has.
            time.sleep(0.5)
            os.kill(server.process.pid, signal.SIGTERM)
            time.sleep(1.0)
            still_running = server.process.poll() is None
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"{server.base_url}/health", timeout=5)
            release.set()
            responses = [future.result(timeout=60) for future in futures]
        returncode = server.process.wait(timeout=60)

    assert still_running
    assert [response.status_code for response in responses] == [200] * DRAIN_REQUESTS
    assert returncode == 128 + signal.SIGTERM
    logged = {record["request_id"] for record in _read_log(server.prediction_log)}
    assert logged == {f"drain-{i}" for i in range(DRAIN_REQUESTS)}
