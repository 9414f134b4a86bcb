"""Send a bounded load of `POST /predict` requests to the prediction service and report it.

    python scripts/load_test.py --image photo.jpg --requests 200 --duration 30 --concurrency 4

The run stops at whichever comes first: `--requests` sent or `--duration` seconds elapsed. It
prints throughput, latency percentiles (p50, p95, p99) and the errors by status, and exits with
status 1 when any request failed. `--json` prints the same report as one JSON object.

`--health-interval MS` also sends `GET /health` every MS milliseconds from one more client
during the run and reports its latency percentiles, which show whether the event loop stays
responsive while `/predict` is saturated. `--server-pid PID` samples the resident memory
(VmRSS) of that local process every half second and reports it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

log = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8000"
# Hard caps, so that a typo cannot turn the script into a flood.
MAX_REQUESTS = 100_000
MAX_DURATION_S = 3600.0
MAX_CONCURRENCY = 64
MIN_HEALTH_INTERVAL_MS = 10.0
RSS_SAMPLE_INTERVAL_S = 0.5


@dataclass
class LoadReport:
    """Outcome of one load run; latencies are in milliseconds."""

    url: str
    requests: int
    ok: int
    errors: dict[str, int]
    elapsed_s: float
    throughput_rps: float
    latency_ms: dict[str, float]
    concurrency: int
    stopped_by: str
    error_examples: list[str] = field(default_factory=list)
    health: dict[str, float] | None = None
    rss_mib: dict[str, float] | None = None


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile of ascending `sorted_values` (`fraction` in [0, 1])."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


class _Counter:
    """Hands out request numbers until the count or the deadline is reached."""

    def __init__(self, limit: int, deadline: float) -> None:
        self._next = 0
        self._limit = limit
        self._deadline = deadline
        self._lock = threading.Lock()
        self.stopped_by = "requests"

    def take(self) -> int | None:
        with self._lock:
            if time.monotonic() >= self._deadline:
                self.stopped_by = "duration"
                return None
            if self._next >= self._limit:
                return None
            self._next += 1
            return self._next


def _latency_summary(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        name: round(percentile(ordered, fraction), 1)
        for name, fraction in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99), ("max", 1.0))
    }


def read_rss_mib(pid: int) -> float:
    """Return the resident memory of process `pid` in MiB, from /proc (Linux only)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise OSError(f"/proc/{pid}/status has no VmRSS line")


def summarize_rss(samples: list[float]) -> dict[str, float]:
    """Summarize RSS samples: first, last, max, and the medians of the 2nd and 4th quarters.

    The first quarter is left out of the growth figure, because it contains the warm-up (thread
    pools, allocator arenas) rather than a leak.
    """
    quarter = max(1, len(samples) // 4)
    second = statistics.median(samples[quarter : 2 * quarter] or samples)
    last = statistics.median(samples[-quarter:])
    return {
        "samples": len(samples),
        "first": round(samples[0], 1),
        "last": round(samples[-1], 1),
        "max": round(max(samples), 1),
        "second_quarter_median": round(second, 1),
        "last_quarter_median": round(last, 1),
        "growth": round(last - second, 1),
    }


class _Monitor:
    """Probes `/health` and samples a server's RSS on background threads until stopped."""

    def __init__(
        self, url: str, health_interval_s: float | None, pid: int | None, timeout_s: float
    ):
        self.url = url.rstrip("/") + "/health"
        self.health_interval_s = health_interval_s
        self.pid = pid
        self.timeout_s = timeout_s
        self.health_latencies: list[float] = []
        self.health_failures = 0
        self.rss_samples: list[float] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> _Monitor:
        if self.health_interval_s is not None:
            self._threads.append(threading.Thread(target=self._probe_health, daemon=True))
        if self.pid is not None:
            self.rss_samples.append(read_rss_mib(self.pid))
            self._threads.append(threading.Thread(target=self._sample_rss, daemon=True))
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _probe_health(self) -> None:
        assert self.health_interval_s is not None
        with httpx.Client(timeout=self.timeout_s) as client:
            while not self._stop.wait(self.health_interval_s):
                sent = time.perf_counter()
                try:
                    ok = client.get(self.url).status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    self.health_latencies.append((time.perf_counter() - sent) * 1000)
                else:
                    self.health_failures += 1

    def _sample_rss(self) -> None:
        assert self.pid is not None
        while not self._stop.wait(RSS_SAMPLE_INTERVAL_S):
            try:
                self.rss_samples.append(read_rss_mib(self.pid))
            except OSError:
                return  # The process has exited.

    def health_report(self) -> dict[str, float] | None:
        if self.health_interval_s is None:
            return None
        return {
            **_latency_summary(self.health_latencies),
            "requests": len(self.health_latencies) + self.health_failures,
            "failures": self.health_failures,
        }


def run_load(
    url: str,
    image: bytes,
    filename: str,
    requests: int,
    duration_s: float,
    concurrency: int,
    timeout_s: float = 30.0,
    health_interval_ms: float | None = None,
    server_pid: int | None = None,
) -> LoadReport:
    """Post `image` to `url`/predict from `concurrency` threads and return the report.

    Args:
        health_interval_ms: If set, also probe `GET /health` at this interval, in milliseconds.
        server_pid: If set, sample the VmRSS of this local process during the run.

    Raises:
        ValueError: A limit is out of range.
        OSError: `server_pid` is not a readable local process.
    """
    if not 1 <= requests <= MAX_REQUESTS:
        raise ValueError(f"requests={requests} is invalid; use 1 to {MAX_REQUESTS}")
    if not 0 < duration_s <= MAX_DURATION_S:
        raise ValueError(f"duration={duration_s} s is invalid; use more than 0 to {MAX_DURATION_S}")
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise ValueError(f"concurrency={concurrency} is invalid; use 1 to {MAX_CONCURRENCY}")
    if health_interval_ms is not None and health_interval_ms < MIN_HEALTH_INTERVAL_MS:
        raise ValueError(
            f"health interval={health_interval_ms} ms is invalid; use {MIN_HEALTH_INTERVAL_MS} "
            "ms or more"
        )

    endpoint = url.rstrip("/") + "/predict"
    start = time.monotonic()
    counter = _Counter(requests, start + duration_s)
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    examples: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(timeout=timeout_s) as client:
            while counter.take() is not None:
                sent = time.perf_counter()
                try:
                    response = client.post(endpoint, files={"file": (filename, image)})
                    outcome = "ok" if response.status_code == 200 else str(response.status_code)
                    detail = response.text[:200]
                except httpx.HTTPError as exc:
                    outcome, detail = type(exc).__name__, str(exc)[:200]
                elapsed_ms = (time.perf_counter() - sent) * 1000
                with lock:
                    if outcome == "ok":
                        latencies.append(elapsed_ms)
                    else:
                        errors[outcome] += 1
                        if len(examples) < 5:
                            examples.append(f"{outcome}: {detail}")

    health_interval_s = None if health_interval_ms is None else health_interval_ms / 1000
    with (
        _Monitor(url, health_interval_s, server_pid, timeout_s) as monitor,
        ThreadPoolExecutor(max_workers=concurrency) as pool,
    ):
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    elapsed = time.monotonic() - start

    total = len(latencies) + sum(errors.values())
    return LoadReport(
        url=endpoint,
        requests=total,
        ok=len(latencies),
        errors=dict(errors),
        elapsed_s=round(elapsed, 3),
        throughput_rps=round(total / elapsed, 2) if elapsed > 0 else 0.0,
        latency_ms=_latency_summary(latencies),
        concurrency=concurrency,
        stopped_by=counter.stopped_by,
        error_examples=examples,
        health=monitor.health_report(),
        rss_mib=summarize_rss(monitor.rss_samples) if monitor.rss_samples else None,
    )


def format_report(report: LoadReport) -> str:
    """Return the report as a few human-readable lines."""
    latency = ", ".join(f"{name} {value:.1f}" for name, value in report.latency_ms.items())
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(report.errors.items())) or "none"
    return "\n".join(
        [
            f"target      {report.url} ({report.concurrency} concurrent)",
            f"requests    {report.requests} in {report.elapsed_s:.2f} s "
            f"(stopped by {report.stopped_by} limit)",
            f"throughput  {report.throughput_rps:.2f} requests/s",
            f"latency ms  {latency}",
            f"errors      {errors}",
            *(f"  {example}" for example in report.error_examples),
            *([f"/health ms  {_format_fields(report.health)}"] if report.health else []),
            *([f"RSS MiB     {_format_fields(report.rss_mib)}"] if report.rss_mib else []),
        ]
    )


def _format_fields(values: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:g}" for name, value in values.items())


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=DEFAULT_URL, help=f"service base URL ({DEFAULT_URL})")
    parser.add_argument("--image", type=Path, required=True, help="image file to post")
    parser.add_argument(
        "--requests", type=int, default=200, help="maximum number of requests (200)"
    )
    parser.add_argument(
        "--duration", type=float, default=30.0, help="maximum run time in seconds (30)"
    )
    parser.add_argument("--concurrency", type=int, default=4, help="parallel clients (4)")
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="per-request timeout in seconds (30)"
    )
    parser.add_argument(
        "--health-interval",
        type=float,
        default=None,
        help="also probe GET /health every this many milliseconds during the run (off)",
    )
    parser.add_argument(
        "--server-pid",
        type=int,
        default=None,
        help="sample the resident memory of this local server process (off)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the load test; return 0 when every request succeeded, 1 otherwise, 2 on bad input."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    # httpx logs every request at INFO, which would bury the report.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        image = args.image.read_bytes()
        report = run_load(
            args.url,
            image,
            args.image.name,
            args.requests,
            args.duration,
            args.concurrency,
            args.timeout,
            args.health_interval,
            args.server_pid,
        )
    except (OSError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    print(json.dumps(asdict(report)) if args.json else format_report(report))
    health_failed = report.health is not None and report.health["failures"] > 0
    succeeded = report.ok == report.requests and report.requests > 0 and not health_failed
    return 0 if succeeded else 1


if __name__ == "__main__":
    sys.exit(main())
