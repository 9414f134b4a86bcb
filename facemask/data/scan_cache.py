"""A JSON file of per-file check results, so that a re-scan decodes only new or changed files.

The file maps each relpath to the file's size and mtime_ns at check time plus the check result:
`sha256`, `width`, `height`, `mode` and `format` for a usable image, or `error` with the reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Bump when the stored fields change, so that older cache files are ignored.
CACHE_VERSION = 1

IMAGE_FIELDS = ("sha256", "width", "height", "mode", "format")


def cache_file_for(cache_dir: Path, root: Path) -> Path:
    """Return the cache file in `cache_dir` for the dataset at the absolute path `root`."""
    digest = hashlib.sha256(str(root).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return Path(cache_dir).expanduser() / f"scan-{root.name}-{digest}.json"


def entry_matches(entry: dict[str, Any], stat: os.stat_result) -> bool:
    """Return whether a cache entry is complete and was made for a file with this size and mtime."""
    if entry.get("size") != stat.st_size or entry.get("mtime_ns") != stat.st_mtime_ns:
        return False
    if isinstance(entry.get("error"), str):
        return True
    return all(field in entry for field in IMAGE_FIELDS)


def load_cache(path: Path, checker: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Read the entries of a cache file, keyed by relpath.

    Returns an empty mapping when the file is missing, unreadable or was written with different
    `checker` settings. An unreadable file is logged as a warning.
    """
    if not path.exists():
        return {}
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        if payload.get("version") != CACHE_VERSION or payload.get("checker") != checker:
            logger.info("Ignoring scan cache %s, written with other settings", path)
            return {}
        entries = payload["entries"]
        if not isinstance(entries, dict) or not all(isinstance(e, dict) for e in entries.values()):
            raise TypeError("entries is not a mapping of relpath to object")
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        logger.warning(
            "Ignoring unreadable scan cache %s (%s); all files will be decoded", path, exc
        )
        return {}
    return entries


def save_cache(
    path: Path, root: Path, entries: dict[str, dict[str, Any]], checker: dict[str, Any]
) -> None:
    """Write the cache file atomically, logging a warning instead of raising on failure."""
    payload = {"version": CACHE_VERSION, "checker": checker, "root": str(root), "entries": entries}
    temp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Readers never see a partly written cache, because os.replace swaps in a complete file.
        with tempfile.NamedTemporaryFile(
            "w", encoding="utf-8", dir=path.parent, prefix=path.name, suffix=".tmp", delete=False
        ) as handle:
            temp_name = handle.name
            json.dump(payload, handle)
        os.replace(temp_name, path)
    except OSError as exc:
        logger.warning("Cannot write scan cache %s (%s); the next scan decodes again", path, exc)
        if temp_name is not None:
            Path(temp_name).unlink(missing_ok=True)
