"""Measure `/predict` latency of the real service, one request at a time, over HTTP on 127.0.0.1.

Starts `serve.py` on a free port, sends a 224x224 JPEG made from a real photo, and prints the
client-side and server-side (`latency_ms` in the prediction log) median, p95 and p99:

    python scripts/bench_serve.py --image PATH/TO/photo.jpg
    python scripts/bench_serve.py --image PHOTO --model-uri models:/facemask-classifier/1
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from facemask.settings import configure_environment  # noqa: E402

configure_environment()

import httpx  # noqa: E402
from PIL import Image  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, required=True, help="a real photo to send")
    parser.add_argument("--size", type=int, default=224, help="side of the sent JPEG, in pixels")
    parser.add_argument("--model-uri", default=None, help="MLflow model URI (default: champion)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI")
    parser.add_argument("--requests", type=int, default=200, help="measured requests")
    parser.add_argument("--warmup", type=int, default=10, help="requests sent before measuring")
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for /ready and per request"
    )
    parser.add_argument("serve_overrides", nargs="*", help="extra serve.py overrides")
    return parser.parse_args(argv)


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo, or the machine type elsewhere."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def jpeg_bytes(path: Path, size: int) -> bytes:
    image = Image.open(path).convert("RGB").resize((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def percentile(sorted_values: list[float], fraction: float) -> float:
    index = min(len(sorted_values) - 1, round(fraction * (len(sorted_values) - 1)))
    return sorted_values[index]


def wait_ready(base_url: str, process: subprocess.Popen, timeout: float) -> float:
    """Wait for `/ready` to return 200; returns the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"serve.py exited with status {process.returncode}")
        try:
            if httpx.get(f"{base_url}/ready", timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{base_url}/ready did not return 200 within {timeout:.0f} s")


def describe(values: list[float]) -> str:
    ordered = sorted(values)
    return (
        f"median {statistics.median(ordered):6.1f} ms  p95 {percentile(ordered, 0.95):6.1f} ms  "
        f"p99 {percentile(ordered, 0.99):6.1f} ms"
    )


def serve_command(args: argparse.Namespace, port: int, log_path: Path) -> list[str]:
    """Return the `serve.py` command line for the benchmark's server."""
    command = [
        sys.executable,
        str(ROOT / "serve.py"),
        f"port={port}",
        f"prediction_log.path={log_path}",
        "log_level=warning",
    ]
    if args.model_uri:
        command.append(f"model.uri={args.model_uri}")
    if args.tracking_uri:
        command.append(f"mlflow.tracking_uri={args.tracking_uri}")
    command.extend(args.serve_overrides)
    return command


def time_requests(base_url: str, payload: bytes, args: argparse.Namespace) -> list[float]:
    """Send the warm-up requests, then return the measured latencies in milliseconds."""
    timings = []
    files = {"file": ("photo.jpg", payload, "image/jpeg")}
    with httpx.Client(base_url=base_url, timeout=args.timeout) as client:
        for _ in range(args.warmup):
            client.post("/predict", files=files).raise_for_status()
        for _ in range(args.requests):
            start = time.perf_counter()
            client.post("/predict", files=files).raise_for_status()
            timings.append((time.perf_counter() - start) * 1000)
    return timings


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    payload = jpeg_bytes(args.image, args.size)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"

    with tempfile.TemporaryDirectory() as scratch:
        log_path = Path(scratch) / "predictions.jsonl"
        command = serve_command(args, port, log_path)
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            ready_s = wait_ready(base_url, server, args.timeout)
            timings = time_requests(base_url, payload, args)
            lines = log_path.read_text().splitlines()[args.warmup :]
            server_side = [json.loads(line)["latency_ms"] for line in lines]
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)

    print(f"host: {cpu_model()}, {os.cpu_count()} CPUs")
    print(f"input: {len(payload)} byte {args.size}x{args.size} JPEG from {args.image.name}")
    print(f"start to /ready: {ready_s:.1f} s")
    print(f"/predict, {args.requests} sequential requests after {args.warmup} warm-up:")
    print(f"  client  {describe(timings)}")
    print(f"  server  {describe(server_side)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
