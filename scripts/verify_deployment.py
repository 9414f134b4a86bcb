"""Check a running prediction service end to end: `python scripts/verify_deployment.py URL`.

Waits up to `--wait` seconds for `GET /ready`, posts a real photo to `POST /predict`, and checks
that the response names one of the model's classes with probabilities that sum to 1. With
`--expect LABEL` the predicted label must also match. Exits 0 when every check passes, else 1.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import httpx

log = logging.getLogger(__name__)


class VerificationError(RuntimeError):
    """The service responded, but not as a healthy deployment must."""


def wait_ready(client: httpx.Client, timeout_s: float) -> None:
    """Poll `GET /ready` every 0.5 s until it returns 200 or `timeout_s` passes.

    Raises:
        VerificationError: The service did not become ready in time.
    """
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        try:
            response = client.get("/ready", timeout=5)
            if response.status_code == 200:
                return
            last = f"status {response.status_code}"
        except httpx.TransportError as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() >= deadline:
            raise VerificationError(f"GET /ready did not return 200 within {timeout_s} s ({last})")
        time.sleep(0.5)


def verify(client: httpx.Client, image: Path, expect: str | None) -> dict[str, Any]:
    """Post `image` to `/predict`, check the response against `/info`, and return its body.

    Raises:
        VerificationError: A response has the wrong status or content.
    """
    info = client.get("/info")
    if info.status_code != 200:
        raise VerificationError(f"GET /info returned status {info.status_code}: {info.text[:200]}")
    classes = info.json()["classes"]
    response = client.post("/predict", files={"file": (image.name, image.read_bytes())})
    if response.status_code != 200:
        raise VerificationError(
            f"POST /predict returned status {response.status_code}: {response.text[:200]}"
        )
    body = response.json()
    if body.get("label") not in classes:
        raise VerificationError(f"label {body.get('label')!r} is not one of {classes}")
    total = sum(float(body[name]) for name in classes)
    if not math.isclose(total, 1.0, abs_tol=1e-4):
        raise VerificationError(f"class probabilities sum to {total}, expected 1")
    if expect is not None and body["label"] != expect:
        raise VerificationError(
            f"predicted {body['label']!r} for {image.name}, expected {expect!r}"
        )
    return body


def main(argv: list[str] | None = None) -> int:
    """Run the checks against the URL on the command line."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    # httpx logs every request at INFO, which would bury the report.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="service base URL, for example http://127.0.0.1:8000")
    parser.add_argument("--image", type=Path, required=True, help="photo to post")
    parser.add_argument("--expect", help="label the photo must get, for example no_mask")
    parser.add_argument("--wait", type=float, default=60.0, help="seconds to wait for /ready (60)")
    args = parser.parse_args(argv)
    if not args.image.is_file():
        log.error("Image %s not found; pass an existing photo with --image", args.image)
        return 2
    try:
        with httpx.Client(base_url=args.url, timeout=30) as client:
            wait_ready(client, args.wait)
            body = verify(client, args.image, args.expect)
    except (VerificationError, httpx.HTTPError) as exc:
        log.error("Deployment check of %s failed: %s", args.url, exc)
        return 1
    probabilities = ", ".join(f"{k} {v:.3f}" for k, v in body.items() if isinstance(v, float))
    log.info(
        "Deployment at %s is healthy: %s -> %s (%s, model version %s)",
        args.url,
        args.image.name,
        body["label"],
        probabilities,
        body.get("model_version"),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
