"""A bounded load on a real ONNX server on 127.0.0.1 with scripts/load_test.py (marked slow).

For `LOAD_SECONDS` seconds, `CONCURRENCY` clients post a real photo to `/predict` while one more
client probes `GET /health` every `HEALTH_INTERVAL_MS` and the server's resident memory is
sampled. No request may fail, `/health` stays fast while `/predict` is saturated, every 200 has
its log line, and memory does not grow after the warm-up.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from facemask.export import main as export_main
from facemask.settings import project_root
from tests.conftest import TrainedModel
from tests.test_serve_cli import Server, run_server

pytestmark = pytest.mark.slow

PHOTO = "no_mask/0_0_aidai_0014.jpg"
LOAD_SECONDS = 30
CONCURRENCY = 32
MAX_REQUESTS = 50_000
HEALTH_INTERVAL_MS = 50
HEALTH_P99_LIMIT_MS = 100.0
# Allowed growth of the median RSS from the second to the last quarter of the run. A leak of one
# kilobyte per request would add about 10 MiB over this run's 10,000 or so requests.
RSS_GROWTH_LIMIT_MIB = 16.0


@pytest.fixture(scope="module")
def onnx_server(trained_model: TrainedModel, tmp_path_factory) -> Iterator[Server]:
    out = tmp_path_factory.mktemp("onnx-export") / "model"
    status = export_main(
        [
            trained_model.alias_uri,
            "--out", str(out),
            "--tracking-uri", trained_model.tracking_uri,
            "--format", "onnx",
        ]
    )  # fmt: skip
    assert status == 0
    base = tmp_path_factory.mktemp("load-server")
    with run_server(base, str(out), trained_model.tracking_uri, ("runtime=onnx",)) as server:
        yield server


def test_load_without_failures(onnx_server: Server, real_data_root: Path):
    result = subprocess.run(
        [
            sys.executable,
            str(project_root() / "scripts" / "load_test.py"),
            "--url", onnx_server.base_url,
            "--image", str(real_data_root / PHOTO),
            "--duration", str(LOAD_SECONDS),
            "--requests", str(MAX_REQUESTS),
            "--concurrency", str(CONCURRENCY),
            "--health-interval", str(HEALTH_INTERVAL_MS),
            "--server-pid", str(onnx_server.process.pid),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=LOAD_SECONDS + 120,
    )  # fmt: skip

    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    print(f"\nLoad report: {json.dumps(report)}")
    assert report["requests"] > CONCURRENCY
    assert report["ok"] == report["requests"]
    assert report["errors"] == {}
    assert report["stopped_by"] == "duration"
    health = report["health"]
    assert health["failures"] == 0
    assert health["requests"] > LOAD_SECONDS * 1000 / HEALTH_INTERVAL_MS / 2
    assert health["p99"] < HEALTH_P99_LIMIT_MS
    rss = report["rss_mib"]
    assert rss["growth"] < RSS_GROWTH_LIMIT_MIB, rss
    lines = onnx_server.prediction_log.read_text().splitlines()
    logged = [json.loads(line) for line in lines]
    assert len(logged) == report["ok"]
    assert onnx_server.process.poll() is None
