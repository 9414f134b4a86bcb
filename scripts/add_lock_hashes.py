"""Add `--hash=sha256:...` to every pin of a pip lock file, so pip installs it in hash mode.

    python scripts/add_lock_hashes.py requirements.lock

pip resolves the pinned file for this platform and Python without installing anything
(`pip install --dry-run --report`), and the hash of each chosen wheel or source archive is
written next to its pin. pip then checks every download against it, so a changed file on an
index stops the install. The hashes are those of this platform's files: regenerate the lock on
the platform that installs it (Linux x86-64 and Python 3.11 for this project's machines and image).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def normalise(name: str) -> str:
    """Return the package name as PEP 503 compares it."""
    return re.sub(r"[-_.]+", "-", name).lower()


def resolved_hashes(lock: Path) -> dict[str, str]:
    """Return `{normalised name: sha256}` of the files pip would install for `lock`."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.json"
        command = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--no-deps",
            "--quiet",
            "--report",
            str(report),
            "-r",
            str(lock),
        ]
        subprocess.run(command, check=True)
        entries = json.loads(report.read_text())["install"]
    hashes = {}
    for entry in entries:
        archive = entry["download_info"].get("archive_info", {})
        digest = archive.get("hashes", {}).get("sha256")
        if digest is None:
            raise SystemExit(
                f"pip reported no sha256 for {entry['metadata']['name']} "
                f"({entry['download_info']['url']}); pin a release with a published wheel"
            )
        hashes[normalise(entry["metadata"]["name"])] = digest
    return hashes


def add_hashes(lock: Path) -> int:
    """Rewrite `lock` with one hash per pin; return the number of pins."""
    pins = []
    for line in lock.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith("--hash"):
            continue
        match = PIN.match(stripped)
        if match is None:
            raise SystemExit(f"{lock}: not a `name==version` pin: {line!r}")
        pins.append((match.group(1), match.group(2)))
    plain = lock.with_suffix(".plain")
    plain.write_text("".join(f"{name}=={version}\n" for name, version in pins))
    try:
        hashes = resolved_hashes(plain)
    finally:
        plain.unlink()
    missing = [name for name, _ in pins if normalise(name) not in hashes]
    if missing:
        raise SystemExit(f"pip resolved no file for {', '.join(missing)}")
    lines = [
        "# Every dependency, pinned with the sha256 of the file installed on Linux x86-64 with\n",
        "# Python 3.11. Regenerate with `make lock`.\n",
    ]
    for name, version in pins:
        lines.append(f"{name}=={version} \\\n    --hash=sha256:{hashes[normalise(name)]}\n")
    lock.write_text("".join(lines))
    return len(pins)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lock", type=Path, help="a file of `name==version` lines")
    args = parser.parse_args()
    count = add_hashes(args.lock)
    print(f"{args.lock}: {count} pins, each with its sha256")


if __name__ == "__main__":
    main()
