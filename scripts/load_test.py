"""Send a bounded load of `POST /predict` requests to the prediction service and report it.

    python scripts/load_test.py --image photo.jpg --requests 200 --duration 30 --concurrency 4

The run stops at whichever comes first: `--requests` sent or `--duration` seconds elapsed. It
prints throughput, latency percentiles (p50, p95, p99) and the errors by status, and exits with
status 1 when any request failed. `--json` prints the same report as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
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


def run_load(
    url: str,
    image: bytes,
    filename: str,
    requests: int,
    duration_s: float,
    concurrency: int,
    timeout_s: float = 30.0,
) -> LoadReport:
    """Post `image` to `url`/predict from `concurrency` threads and return the report.

    Raises:
        ValueError: A limit is out of range.
    """
    if not 1 <= requests <= MAX_REQUESTS:
        raise ValueError(f"requests={requests} is invalid; use 1 to {MAX_REQUESTS}")
    if not 0 < duration_s <= MAX_DURATION_S:
        raise ValueError(f"duration={duration_s} s is invalid; use more than 0 to {MAX_DURATION_S}")
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise ValueError(f"concurrency={concurrency} is invalid; use 1 to {MAX_CONCURRENCY}")

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

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    elapsed = time.monotonic() - start

    latencies.sort()
    total = len(latencies) + sum(errors.values())
    return LoadReport(
        url=endpoint,
        requests=total,
        ok=len(latencies),
        errors=dict(errors),
        elapsed_s=round(elapsed, 3),
        throughput_rps=round(total / elapsed, 2) if elapsed > 0 else 0.0,
        latency_ms={
            name: round(percentile(latencies, fraction), 1)
            for name, fraction in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99), ("max", 1.0))
        },
        concurrency=concurrency,
        stopped_by=counter.stopped_by,
        error_examples=examples,
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
        ]
    )


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
        )
    except (OSError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    print(json.dumps(asdict(report)) if args.json else format_report(report))
    return 0 if report.ok == report.requests and report.requests > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
