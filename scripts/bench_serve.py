"""Benchmark the prediction service against a plain baseline server, over HTTP on 127.0.0.1.

    python scripts/bench_serve.py --image PHOTO
    python scripts/bench_serve.py --image PHOTO --model-uri models:/facemask-classifier/1
    python scripts/bench_serve.py --image GROUP_PHOTO --size 0 --compare-faces --concurrency 1,8

One run measures, in this order:

1. Model only, in a child process: the served runtime (ONNX Runtime when the model has an ONNX
   export) and eager float32 torch, at batch 1 (median latency) and batch 32 (images/s), plus
   torch bfloat16 autocast and its largest probability difference from float32 on real photos.
2. The service (`serve.py` with its default settings and any overrides given) and the
   baseline server (the same plus `runtime=torch torch_dtype=float32 batching.max_batch_size=1
   inference_workers=1`: eager float32 torch, one image per model call, one call at a time).
   Both start one after the other, each timed from process start to `GET /ready` returning 200.
   Then every concurrency level in `--concurrency` runs against the service and the baseline in
   turns (`--rounds`): `/predict` latency (p50, p95, p99), throughput and the mean micro-batch
   size.
   Last, each server's peak resident memory (VmHWM) is read before it stops.

With `--compare-faces`, the model-only phase and the targets are skipped, and the two servers
are the service with the face stage on (`faces=true`) and off (`faces=false`), so the table
shows what the face stage costs per request. `--size 0` sends the photo unchanged, which suits
this comparison: detection cost depends on the picture, and every face found is one more model
input.

The measurements of the two sides take turns, so that load from other processes on a shared
machine affects both sides of each ratio alike.

Every phase sends a fixed number of requests (`--requests`, split over the rounds), and each
round stops early after `--phase-timeout` seconds. Requests go over keep-alive connections from
an asyncio client that writes a prepared multipart request, so the client takes little CPU from
the server. The script prints the machine, the load average around each server's phases, and a
table of figure, limit, baseline, ratio and whether the target is met.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from facemask.settings import configure_environment  # noqa: E402

configure_environment()

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

BASELINE_OVERRIDES = (
    "runtime=torch",
    "torch_dtype=float32",
    "batching.max_batch_size=1",
    "inference_workers=1",
)
FACES_ON_OVERRIDES = ("faces=true",)
FACES_OFF_OVERRIDES = ("faces=false",)
# Targets of the service on the benchmark machine.
P50_LIMIT_FACTOR = 1.3  # /predict p50 at concurrency 1 over the model-only batch-1 forward
THROUGHPUT_TARGET_CONCURRENCY = 16
THROUGHPUT_FACTOR = 2.0  # over the baseline server at that concurrency
RSS_LIMIT_MIB = 512
READY_LIMIT_S = 5.0
BOUNDARY = "facemaskbenchboundary"
# Batch-1 calls one model makes in a row before the next model's turn.
FORWARD_BLOCK = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, required=True, help="a real photo to send")
    parser.add_argument(
        "--size",
        type=int,
        default=224,
        help="side of the sent square JPEG, in pixels; 0 sends the photo unchanged (default: 224)",
    )
    parser.add_argument("--model-uri", default=None, help="MLflow model URI (default: champion)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI")
    parser.add_argument(
        "--requests", type=int, default=300, help="measured requests per phase (default: 300)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="turns in which each concurrency level alternates between the servers (default: 3)",
    )
    parser.add_argument(
        "--phase-timeout",
        type=float,
        default=60.0,
        help="seconds after which one round of a phase stops sending (default: 60)",
    )
    parser.add_argument(
        "--concurrency",
        default="1,8,16,32",
        help="comma-separated client connections of the throughput phases (default: 1,8,16,32)",
    )
    parser.add_argument(
        "--forward-runs", type=int, default=100, help="model-only batch-1 runs (default: 100)"
    )
    parser.add_argument(
        "--numerics-images",
        type=Path,
        default=None,
        help="folder of photos for the bfloat16 check (default: the folder of --image)",
    )
    parser.add_argument(
        "--ready-timeout", type=float, default=180.0, help="seconds to wait for GET /ready"
    )
    parser.add_argument("--skip-baseline", action="store_true", help="measure the service only")
    parser.add_argument(
        "--compare-faces",
        action="store_true",
        help="compare the service with the face stage on and off, without the model-only phase "
        "and the targets",
    )
    parser.add_argument("serve_overrides", nargs="*", help="extra serve.py overrides")
    args = parser.parse_args(argv)
    args.concurrency = sorted({int(value) for value in args.concurrency.split(",")})
    if THROUGHPUT_TARGET_CONCURRENCY not in args.concurrency and not args.compare_faces:
        args.concurrency = sorted({*args.concurrency, THROUGHPUT_TARGET_CONCURRENCY})
    if args.requests < 1 or args.rounds < 1:
        parser.error("--requests and --rounds must be positive")
    if args.size < 0:
        parser.error("--size must be 0 or more")
    if min(args.concurrency) < 1 or max(args.concurrency) > 64:
        parser.error("--concurrency values must be from 1 to 64")
    return args


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo, or the machine type elsewhere."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def load_average() -> str:
    return "/".join(f"{value:.2f}" for value in os.getloadavg())


def jpeg_bytes(path: Path, size: int) -> bytes:
    """Return the photo as a `size` x `size` JPEG, or its file unchanged when `size` is 0."""
    if size == 0:
        return path.read_bytes()
    image = Image.open(path).convert("RGB").resize((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile of ascending `sorted_values`."""
    rank = max(1, int(np.ceil(fraction * len(sorted_values))))
    return sorted_values[rank - 1]


# Model only ----------------------------------------------------------------------------------


@dataclass
class ForwardTimes:
    """Model-only timings of one runtime."""

    name: str
    batch1_ms: float
    batch32_images_per_s: float


def time_forward(models: dict, image_size: int, runs: int) -> list[ForwardTimes]:
    """Time each model at batch 1 (median ms) and batch 32 (images/s), interleaved.

    The models take turns in blocks of `FORWARD_BLOCK` batch-1 calls and single batch-32 calls,
    so a burst of load from other processes slows all of them alike instead of one. Within a
    block, only the first call follows another model, whose threads may still be spinning.
    """
    rng = np.random.default_rng(0)
    single = rng.standard_normal((1, 3, image_size, image_size), dtype=np.float32)
    many = rng.standard_normal((32, 3, image_size, image_size), dtype=np.float32)
    latencies: dict[str, list[float]] = {name: [] for name in models}
    batch_times: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():
        for _ in range(5):
            model(single)
        model(many)
    for _ in range(max(1, runs // FORWARD_BLOCK)):
        for name, model in models.items():
            for _ in range(FORWARD_BLOCK):
                start = time.perf_counter()
                model(single)
                latencies[name].append(time.perf_counter() - start)
    for _ in range(5):
        for name, model in models.items():
            start = time.perf_counter()
            model(many)
            batch_times[name].append(time.perf_counter() - start)
    return [
        ForwardTimes(
            name,
            statistics.median(latencies[name]) * 1000,
            32 / statistics.median(batch_times[name]),
        )
        for name in models
    ]


def measure_models(args: argparse.Namespace, settings) -> dict:
    """Time the served runtime, eager float32 torch and bfloat16 torch; compare bfloat16."""
    from facemask.serving.runtimes import TorchModel
    from facemask.serving.served_model import load_served_model

    uri, tracking_uri, threads = (
        settings.model_uri,
        settings.tracking_uri,
        settings.intra_op_threads,
    )
    served = load_served_model(
        uri, tracking_uri, settings.runtime, threads, torch_dtype=settings.torch_dtype
    )
    eager = load_served_model(uri, tracking_uri, runtime="torch", threads=threads)
    bf16 = TorchModel(eager.model.module, "bfloat16")
    size = served.preprocessing.image_size
    models = {
        served.runtime: served.model,
        "torch (float32)": eager.model,
        "torch (bfloat16)": bf16,
    }
    return {
        "image_size": size,
        "times": time_forward(models, size, args.forward_runs),
        "bf16": bf16_difference(eager, bf16, args.numerics_images or args.image.parent),
    }


def bf16_difference(eager, bf16, folder: Path) -> tuple[int, float, int]:
    """Return (images, max probability difference, label changes) of bfloat16 vs float32."""
    from facemask.data.images import decode_image

    files = sorted(path for path in folder.iterdir() if path.is_file())[:64]
    arrays = []
    for path in files:
        decoded = decode_image(path, draft_size=eager.preprocessing.draft_size)
        arrays.append(eager.preprocessing.apply(decoded.image))
    batch = np.stack(arrays)
    reference, reduced = eager.model(batch), bf16(batch)
    changed = int((reference.argmax(1) != reduced.argmax(1)).sum())
    return len(arrays), float(np.abs(reference - reduced).max()), changed


# HTTP load -----------------------------------------------------------------------------------


def multipart_request(port: int, payload: bytes) -> bytes:
    """Return a complete `POST /predict` HTTP/1.1 request with `payload` as the file part."""
    body = (
        (
            f"--{BOUNDARY}\r\n"
            'Content-Disposition: form-data; name="file"; filename="photo.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + payload
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    head = (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


async def _connection(port: int, request: bytes, quota: list[int], deadline: float, out: list):
    """Send requests on one keep-alive connection until the shared quota or deadline ends."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while quota[0] > 0 and time.perf_counter() < deadline:
            quota[0] -= 1
            start = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
            await reader.readexactly(length)
            if status != 200:
                raise RuntimeError(f"POST /predict returned {status}")
            out.append(time.perf_counter() - start)
    finally:
        writer.close()
        await writer.wait_closed()


def send_load(
    port: int, request: bytes, concurrency: int, count: int, timeout: float
) -> tuple[list[float], float]:
    """Send `count` requests over `concurrency` connections after 2 warm-up requests each.

    Returns the latencies in seconds and the elapsed seconds of the measured requests.
    """

    async def main() -> tuple[list[float], float]:
        warm: list[float] = []
        await asyncio.gather(
            *(
                _connection(port, request, [2], time.perf_counter() + timeout, warm)
                for _ in range(concurrency)
            )
        )
        latencies: list[float] = []
        quota = [count]
        start = time.perf_counter()
        deadline = start + timeout
        await asyncio.gather(
            *(_connection(port, request, quota, deadline, latencies) for _ in range(concurrency))
        )
        return latencies, time.perf_counter() - start

    return asyncio.run(main())


def summarise(latencies: list[float], elapsed: float, batches: tuple[float, float]) -> dict:
    """Return the request count, throughput, percentiles in ms and the mean micro-batch size."""
    ordered = sorted(value * 1000 for value in latencies)
    total, count = batches
    return {
        "requests": len(ordered),
        "throughput": len(ordered) / elapsed,
        "p50": percentile(ordered, 0.50),
        "p95": percentile(ordered, 0.95),
        "p99": percentile(ordered, 0.99),
        "mean_batch": total / count if count else float("nan"),
    }


# Servers -------------------------------------------------------------------------------------


@dataclass
class ServerRun:
    """Measurements of one server process."""

    label: str
    ready_s: float = 0.0
    peak_rss_mib: float = 0.0
    phases: dict[int, dict] = field(default_factory=dict)
    load_before: str = ""
    load_after: str = ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except OSError:
        return 0, ""


def wait_ready(base_url: str, process: subprocess.Popen, started: float, timeout: float) -> float:
    """Wait for `/ready` to return 200; return the seconds since `started`."""
    while time.perf_counter() - started < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"serve.py exited with status {process.returncode}")
        if http_get(f"{base_url}/ready")[0] == 200:
            return time.perf_counter() - started
        time.sleep(0.02)
    raise TimeoutError(f"{base_url}/ready did not return 200 within {timeout:.0f} s")


def peak_rss_mib(pid: int) -> float:
    """Return the peak resident set size (VmHWM) of process `pid`, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def batch_sizes(base_url: str) -> tuple[float, float]:
    """Return the micro-batcher's (sum, count) of batch sizes from /metrics."""
    text = http_get(f"{base_url}/metrics")[1]
    total = re.search(r"^facemask_inference_batch_size_sum (\S+)", text, re.M)
    count = re.search(r"^facemask_inference_batch_size_count (\S+)", text, re.M)
    return (float(total.group(1)), float(count.group(1))) if total and count else (0.0, 0.0)


def serve_command(args: argparse.Namespace, port: int, log_path: Path, extra) -> list[str]:
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
    return [*command, *args.serve_overrides, *extra]


@dataclass
class Server:
    """A started `serve.py` process and what the benchmark measured on it."""

    run: ServerRun
    process: subprocess.Popen
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_server(args: argparse.Namespace, label: str, log_path: Path, extra=()) -> Server:
    """Start `serve.py` and wait until `/ready` returns 200, recording the seconds it took."""
    port = free_port()
    command = serve_command(args, port, log_path, extra)
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    server = Server(ServerRun(label, load_before=load_average()), process, port)
    try:
        server.run.ready_s = wait_ready(server.base_url, process, started, args.ready_timeout)
    except BaseException:
        stop_server(server)
        raise
    return server


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        server.run.peak_rss_mib = peak_rss_mib(server.process.pid)
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=60)
    server.run.load_after = load_average()


def measure_level(servers: list[Server], payload: bytes, concurrency: int, args) -> None:
    """Load every server at one concurrency level, in `--rounds` turns, and store the result.

    Each round sends `--requests / --rounds` requests to each server in turn. The figures pool
    all rounds: percentiles over every latency, throughput over the summed elapsed time.
    """
    per_round = max(1, args.requests // args.rounds)
    pooled = {id(server): ([], 0.0, [0.0, 0.0]) for server in servers}
    for _ in range(args.rounds):
        for server in servers:
            latencies, elapsed, batches = pooled[id(server)]
            request = multipart_request(server.port, payload)
            before = batch_sizes(server.base_url)
            sent, seconds = send_load(
                server.port, request, concurrency, per_round, args.phase_timeout
            )
            after = batch_sizes(server.base_url)
            latencies.extend(sent)
            batches[0] += after[0] - before[0]
            batches[1] += after[1] - before[1]
            pooled[id(server)] = (latencies, elapsed + seconds, batches)
    for server in servers:
        latencies, elapsed, batches = pooled[id(server)]
        server.run.phases[concurrency] = summarise(latencies, elapsed, tuple(batches))


def measure_servers(args: argparse.Namespace, payload: bytes) -> tuple[ServerRun, ServerRun | None]:
    """Start the service and the baseline one after the other, then load them in turns."""
    servers: list[Server] = []
    with tempfile.TemporaryDirectory() as scratch:
        try:
            servers.append(start_server(args, "service", Path(scratch) / "service.jsonl"))
            if not args.skip_baseline:
                log_path = Path(scratch) / "baseline.jsonl"
                servers.append(start_server(args, "baseline", log_path, BASELINE_OVERRIDES))
            for concurrency in args.concurrency:
                measure_level(servers, payload, concurrency, args)
        finally:
            for server in servers:
                stop_server(server)
    runs = [server.run for server in servers]
    return runs[0], runs[1] if len(runs) > 1 else None


def faces_in_log(path: Path) -> int | None:
    """Return the faces per class summed over the first line of a prediction log, if any."""
    if not path.is_file():
        return None
    with path.open() as lines:
        first = lines.readline()
    counts = json.loads(first).get("face_counts") if first.strip() else None
    return sum(counts.values()) if counts else None


def measure_faces(args: argparse.Namespace, payload: bytes) -> tuple[ServerRun, ServerRun, int]:
    """Start the service with the face stage on and off, load them in turns.

    Returns both runs and the number of faces the service found in the payload.
    """
    servers: list[Server] = []
    with tempfile.TemporaryDirectory() as scratch:
        on_log = Path(scratch) / "faces-on.jsonl"
        try:
            servers.append(start_server(args, "faces on", on_log, FACES_ON_OVERRIDES))
            off_log = Path(scratch) / "faces-off.jsonl"
            servers.append(start_server(args, "faces off", off_log, FACES_OFF_OVERRIDES))
            for concurrency in args.concurrency:
                measure_level(servers, payload, concurrency, args)
        finally:
            for server in servers:
                stop_server(server)
        faces = faces_in_log(on_log)
    return servers[0].run, servers[1].run, faces if faces is not None else -1


def faces_report(on: ServerRun, off: ServerRun) -> list[str]:
    """Return the Markdown table of the service with the face stage on and off."""

    def row(name: str, with_faces: float, without: float, unit: str = "") -> str:
        ratio = f"{with_faces / without:.2f}x" if without else "-"
        unit = f" {unit}" if unit else ""
        return (
            f"| {name} | {with_faces:.1f}{unit} | {without:.1f}{unit} | "
            f"{with_faces - without:+.1f}{unit} | {ratio} |"
        )

    rows = [
        "| measure | faces on | faces off | difference | ratio |",
        "|---|---|---|---|---|",
    ]
    for key in ("p50", "p95", "p99"):
        rows.append(
            row(f"/predict {key}, concurrency 1", on.phases[1][key], off.phases[1][key], "ms")
        )
    for concurrency in on.phases:
        with_faces, without = on.phases[concurrency], off.phases[concurrency]
        rows.append(
            row(
                f"throughput, concurrency {concurrency}",
                with_faces["throughput"],
                without["throughput"],
                "req/s",
            )
        )
        rows.append(
            row(
                f"server time per image, concurrency {concurrency} (1 / throughput)",
                1000 / with_faces["throughput"],
                1000 / without["throughput"],
                "ms",
            )
        )
        rows.append(
            row(
                f"mean model inputs per call, concurrency {concurrency}",
                with_faces["mean_batch"],
                without["mean_batch"],
            )
        )
    rows.append(row("server peak RSS", on.peak_rss_mib, off.peak_rss_mib, "MiB"))
    rows.append(row("process start to /ready", on.ready_s, off.ready_s, "s"))
    return rows


def compare_faces(args: argparse.Namespace, payload: bytes) -> int:
    """Run and print the face stage on/off comparison."""
    if 1 not in args.concurrency:
        args.concurrency = sorted({1, *args.concurrency})
    load_start = load_average()
    on, off, faces = measure_faces(args, payload)
    print(f"host: {cpu_model()}, {os.cpu_count()} CPUs; Python {platform.python_version()}")
    print(f"input: {len(payload)} byte file from {args.image.name}; faces found: {faces}")
    print(
        f"requests per phase: {args.requests} in {args.rounds} rounds, "
        f"connections: {args.concurrency}"
    )
    print(f"servers: serve.py {' '.join(args.serve_overrides) or '(default settings)'}")
    print(f"load average (1/5/15 min): {load_start} at start")
    for run in (on, off):
        print(f"  {run.label}: {run.load_before} at its start, {run.load_after} at its stop")
    print()
    print("\n".join(faces_report(on, off)))
    return 0


# Report --------------------------------------------------------------------------------------


def table_row(name: str, figure: float, limit: str, baseline: float | None, met: str, unit: str):
    ratio = f"{figure / baseline:.2f}x" if baseline else "-"
    base = f"{baseline:.1f} {unit}" if baseline is not None else "-"
    return f"| {name} | {figure:.1f} {unit} | {limit} | {base} | {ratio} | {met} |"


def verdict(ok: bool) -> str:
    return "yes" if ok else "NO"


def model_rows(models: dict) -> list[str]:
    served, eager, _ = models["times"]
    return [
        table_row(
            f"model-only forward, batch 1, {served.name}",
            served.batch1_ms,
            "-",
            eager.batch1_ms,
            "-",
            "ms",
        ),
        table_row(
            f"model-only forward, batch 32, {served.name}",
            served.batch32_images_per_s,
            "-",
            eager.batch32_images_per_s,
            "-",
            "img/s",
        ),
    ]


def latency_rows(models: dict, service: ServerRun, base: dict[int, dict]) -> list[str]:
    p50 = service.phases[1]["p50"]
    p50_limit = P50_LIMIT_FACTOR * models["times"][0].batch1_ms
    rows = [
        table_row(
            "/predict p50, concurrency 1",
            p50,
            f"<= {p50_limit:.1f} ms ({P50_LIMIT_FACTOR}x forward)",
            base.get(1, {}).get("p50"),
            verdict(p50 <= p50_limit),
            "ms",
        )
    ]
    for key in ("p95", "p99"):
        baseline = base.get(1, {}).get(key)
        name = f"/predict {key}, concurrency 1"
        rows.append(table_row(name, service.phases[1][key], "-", baseline, "-", "ms"))
    return rows


def throughput_rows(service: ServerRun, base: dict[int, dict]) -> list[str]:
    rows = []
    for concurrency, phase in service.phases.items():
        baseline_rps = base.get(concurrency, {}).get("throughput")
        limit, met = "-", "-"
        if concurrency == THROUGHPUT_TARGET_CONCURRENCY and baseline_rps:
            minimum = THROUGHPUT_FACTOR * baseline_rps
            limit = f">= {minimum:.1f} req/s ({THROUGHPUT_FACTOR}x baseline)"
            met = verdict(phase["throughput"] >= minimum)
        name = f"throughput, concurrency {concurrency} (mean batch {phase['mean_batch']:.1f})"
        rows.append(table_row(name, phase["throughput"], limit, baseline_rps, met, "req/s"))
    return rows


def process_rows(service: ServerRun, baseline: ServerRun | None) -> list[str]:
    return [
        table_row(
            "server peak RSS",
            service.peak_rss_mib,
            f"<= {RSS_LIMIT_MIB} MiB",
            baseline.peak_rss_mib if baseline else None,
            verdict(service.peak_rss_mib <= RSS_LIMIT_MIB),
            "MiB",
        ),
        table_row(
            "process start to /ready",
            service.ready_s,
            f"<= {READY_LIMIT_S:.0f} s",
            baseline.ready_s if baseline else None,
            verdict(service.ready_s <= READY_LIMIT_S),
            "s",
        ),
    ]


def report(models: dict, service: ServerRun, baseline: ServerRun | None) -> list[str]:
    """Return the Markdown table of figures, limits and baseline, and the bfloat16 note."""
    base = baseline.phases if baseline else {}
    rows = [
        "| measure | figure | limit | baseline | ratio | target met |",
        "|---|---|---|---|---|---|",
        *model_rows(models),
        *latency_rows(models, service, base),
        *throughput_rows(service, base),
        *process_rows(service, baseline),
    ]
    bf16 = models["times"][2]
    images, difference, changed = models["bf16"]
    note = (
        f"model-only torch bfloat16 autocast: batch 1 {bf16.batch1_ms:.1f} ms, batch 32 "
        f"{bf16.batch32_images_per_s:.1f} img/s; on {images} real photos its probabilities "
        f"differ from float32 by up to {difference:.2g}, and {changed} predicted labels change"
    )
    return [*rows, "", note]


def serve_settings(args: argparse.Namespace):
    """Return the `ServeSettings` that serve.py builds from the same overrides."""
    from hydra import compose, initialize_config_dir

    from facemask.serving.settings import ServeSettings

    overrides = list(args.serve_overrides)
    if args.model_uri:
        overrides.append(f"model.uri={args.model_uri}")
    if args.tracking_uri:
        overrides.append(f"mlflow.tracking_uri={args.tracking_uri}")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return ServeSettings.from_config(compose(config_name="serve", overrides=overrides))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = serve_settings(args)
    payload = jpeg_bytes(args.image, args.size)
    if args.compare_faces:
        return compare_faces(args, payload)
    load_start = load_average()
    # The models are timed in a child process, so torch and its threads stay out of the process
    # that sends the HTTP load. In the same process they added about 2 ms to the median latency.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
        models = child.submit(measure_models, args, settings).result()
    service, baseline = measure_servers(args, payload)

    print(f"host: {cpu_model()}, {os.cpu_count()} CPUs; Python {platform.python_version()}")
    print(
        f"model: {settings.model_uri}, {models['image_size']} px input, "
        f"{settings.intra_op_threads} threads"
    )
    shape = f"{args.size}x{args.size} JPEG" if args.size else "file"
    print(f"input: {len(payload)} byte {shape} from {args.image.name}")
    print(
        f"requests per phase: {args.requests} in {args.rounds} rounds, "
        f"connections: {args.concurrency}"
    )
    print(f"service: serve.py {' '.join(args.serve_overrides) or '(default settings)'}")
    print(f"baseline server: serve.py {' '.join([*args.serve_overrides, *BASELINE_OVERRIDES])}")
    print(f"load average (1/5/15 min): {load_start} at start")
    for run in (service, baseline):
        if run is not None:
            print(f"  {run.label}: {run.load_before} at its start, {run.load_after} at its stop")
    print()
    print("\n".join(report(models, service, baseline)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
