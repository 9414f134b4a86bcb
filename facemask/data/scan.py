"""Find the images of a class-folder dataset and check that each one decodes.

A dataset root contains one sub-folder per class, and the folder name is the label. Images may sit
at any depth inside a class folder. Names that start with "." are ignored at every level.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL
from tqdm import tqdm

from facemask.data.images import DEFAULT_MAX_PIXELS, InvalidImageError, decode_image
from facemask.data.scan_cache import cache_file_for, entry_matches, load_cache, save_cache
from facemask.hardware import usable_cpu_count

logger = logging.getLogger(__name__)

# JPEGs are checked at up to 1/8 scale. libjpeg still reads every entropy-coded byte at that
# scale, so truncated files are still caught. A 5760x3272 photo decodes in 15 ms instead of
# 135 ms (Pillow 13.0, one core of the development machine).
CHECK_DRAFT_SIZE = 32

# Files at or under this count are checked in the calling process, where a pool costs more than
# it saves.
MIN_FILES_FOR_POOL = 16

# The summary warning lists at most this many skipped files; each one is also logged at INFO.
MAX_SKIPPED_IN_SUMMARY = 20

DOWNLOAD_HINT = "python scripts/download_data.py"


class DatasetError(ValueError):
    """A dataset folder, or a setting about it, that cannot be used for training."""


@dataclass(frozen=True)
class ImageRecord:
    """One image file that decodes, with its label and properties.

    Attributes:
        path: Absolute path of the file.
        relpath: POSIX path relative to the dataset root, such as `mask/a b.jpg`.
        label: Class name, which is the name of the class folder.
        sha256: Hex SHA-256 of the file's bytes.
        width: Width in pixels after EXIF orientation.
        height: Height in pixels after EXIF orientation.
        mode: Pillow mode of the file before conversion to RGB.
        format: Pillow format name of the file.
    """

    path: Path
    relpath: str
    label: str
    sha256: str
    width: int
    height: int
    mode: str
    format: str


@dataclass(frozen=True)
class SkippedFile:
    """A file inside a class folder that is not a usable image, and why."""

    relpath: str
    label: str
    reason: str


@dataclass
class ScanResult:
    """Usable images and skipped files of a dataset, both sorted by relative path."""

    root: Path
    classes: list[str]
    records: list[ImageRecord]
    skipped: list[SkippedFile]


def discover_classes(root: Path) -> list[str]:
    """Return the sorted names of the non-hidden sub-folders of `root`.

    Raises:
        DatasetError: `root` does not exist, is not a folder, or has no class sub-folders.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetError(
            f"Dataset folder {root} does not exist. Set data.root=PATH to a folder with one "
            f"sub-folder of images per class, or download the data with `{DOWNLOAD_HINT}`."
        )
    if not root.is_dir():
        raise DatasetError(
            f"Dataset root {root} is not a folder. Set data.root=PATH to a folder with one "
            "sub-folder of images per class."
        )
    classes = sorted(
        entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith(".")
    )
    if not classes:
        raise DatasetError(
            f"Dataset folder {root} has no class sub-folders. Put the images of each class in "
            f"a sub-folder named after the class, such as {root / 'mask'}."
        )
    return classes


def scan_dataset(
    root: Path,
    *,
    classes: list[str] | None = None,
    cache_dir: Path | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> ScanResult:
    """Find every file in the class folders of `root` and decode each one to check it.

    Files that fail to decode become `SkippedFile`s. A warning gives their count, and each one is
    logged at INFO.

    Args:
        root: Dataset folder with one sub-folder per class.
        classes: Class folders to use, in this order. Defaults to `discover_classes(root)`.
        cache_dir: Folder for a JSON file of check results. A file whose size and mtime match
            its cache entry is not decoded again. `None` disables the cache.
        workers: Number of processes that decode images. Defaults to the number of usable CPUs.
        progress: Whether to show a progress bar while decoding.

    Raises:
        DatasetError: The root or a class folder is missing or has no usable image, or there
            are fewer than 2 classes.
    """
    started = time.perf_counter()
    if workers is not None and workers < 1:
        raise DatasetError(f"workers={workers} is invalid; use 1 or more, or None for all CPUs.")
    found = discover_classes(root)
    root = Path(root).expanduser().resolve()
    classes = _select_classes(root, found, classes)
    files = {label: _list_files(root / label) for label in classes}

    cache_path = cache_file_for(cache_dir, root) if cache_dir is not None else None
    checker = _checker_settings()
    cache = load_cache(cache_path, checker) if cache_path is not None else {}
    entries, pending = _reuse_cached_entries(root, files, cache)

    try:
        _check_pending(pending, entries, workers=workers, progress=progress)
    finally:
        # Also after an interrupt, so that a restarted scan resumes where this one stopped.
        if cache_path is not None and (pending or set(cache) != set(entries)):
            save_cache(cache_path, root, entries, checker)

    result = _build_result(root, classes, files, entries)
    _report_skipped(root, result.skipped)
    _require_usable_images(root, result, files)
    logger.info(
        "Scanned %d images in %d classes under %s in %.1f s (%d decoded, %d from the cache)",
        len(result.records),
        len(classes),
        root,
        time.perf_counter() - started,
        len(pending),
        len(entries) - len(pending),
    )
    return result


def _select_classes(root: Path, found: list[str], requested: list[str] | None) -> list[str]:
    if requested is None:
        classes = found
    else:
        classes = list(requested)
        missing = [name for name in classes if name not in found]
        if missing:
            raise DatasetError(
                f"Class folders {missing} not found in {root}, which has {found}. "
                "Fix the class list or create the folders."
            )
        if len(set(classes)) != len(classes):
            raise DatasetError(f"Class list {classes} names a class twice; list each once.")
    if len(classes) < 2:
        raise DatasetError(
            f"Dataset folder {root} has {len(classes)} class folder(s) {classes}, but a "
            "classifier needs at least 2. Add a sub-folder of images for each class."
        )
    return classes


def _list_files(folder: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        # Pruning in place stops os.walk from entering hidden folders such as `.git`.
        dirnames[:] = [name for name in dirnames if not name.startswith(".")]
        found.extend(Path(dirpath, name) for name in filenames if not name.startswith("."))
    return sorted(found)


def _reuse_cached_entries(
    root: Path, files: dict[str, list[Path]], cache: dict[str, dict[str, Any]]
) -> tuple[dict[str, dict[str, Any]], list[tuple[str, Path, os.stat_result]]]:
    """Split the files into cache entries that still match and files to check."""
    entries: dict[str, dict[str, Any]] = {}
    pending: list[tuple[str, Path, os.stat_result]] = []
    for paths in files.values():
        for path in paths:
            relpath = path.relative_to(root).as_posix()
            try:
                stat = path.stat()
            except OSError as exc:  # Deleted since listing, or a broken symbolic link.
                entries[relpath] = {"error": f"cannot read file: {exc}"}
                continue
            cached = cache.get(relpath)
            if cached is not None and entry_matches(cached, stat):
                entries[relpath] = cached
            else:
                pending.append((relpath, path, stat))
    return entries, pending


def _check_pending(
    pending: list[tuple[str, Path, os.stat_result]],
    entries: dict[str, dict[str, Any]],
    *,
    workers: int | None,
    progress: bool,
) -> None:
    if not pending:
        return
    workers = usable_cpu_count() if workers is None else workers
    paths = [str(path) for _, path, _ in pending]
    bar = tqdm(total=len(paths), desc="Checking images", unit="img", disable=not progress)
    executor = None
    try:
        if workers == 1 or len(paths) <= MIN_FILES_FOR_POOL:
            results: Iterable[dict[str, Any]] = map(check_image_file, paths)
        else:
            executor = ProcessPoolExecutor(max_workers=workers)
            chunksize = max(1, min(64, len(paths) // (workers * 8)))
            results = executor.map(check_image_file, paths, chunksize=chunksize)
        for (relpath, _, stat), result in zip(pending, results, strict=True):
            entries[relpath] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, **result}
            bar.update()
    finally:
        bar.close()
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


def _checker_settings() -> dict[str, Any]:
    # A different Pillow version or pixel limit can change which files decode.
    return {
        "pillow": PIL.__version__,
        "draft_size": CHECK_DRAFT_SIZE,
        "max_pixels": DEFAULT_MAX_PIXELS,
    }


def check_image_file(path: str) -> dict[str, Any]:
    """Hash and decode one file.

    Returns:
        `sha256`, `width`, `height`, `mode` and `format` for a usable image, or `error` with the
        reason for a file that cannot be read or decoded.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return {"error": f"cannot read file: {exc}"}
    try:
        decoded = decode_image(data, draft_size=CHECK_DRAFT_SIZE)
    except InvalidImageError as exc:
        return {"error": str(exc)}
    return {
        "sha256": hashlib.sha256(data).hexdigest(),
        "width": decoded.width,
        "height": decoded.height,
        "mode": decoded.mode,
        "format": decoded.format,
    }


def _build_result(
    root: Path,
    classes: list[str],
    files: dict[str, list[Path]],
    entries: dict[str, dict[str, Any]],
) -> ScanResult:
    records: list[ImageRecord] = []
    skipped: list[SkippedFile] = []
    for label, paths in files.items():
        for path in paths:
            relpath = path.relative_to(root).as_posix()
            entry = entries[relpath]
            if "error" in entry:
                skipped.append(SkippedFile(relpath=relpath, label=label, reason=entry["error"]))
                continue
            records.append(
                ImageRecord(
                    path=path,
                    relpath=relpath,
                    label=label,
                    sha256=entry["sha256"],
                    width=entry["width"],
                    height=entry["height"],
                    mode=entry["mode"],
                    format=entry["format"],
                )
            )
    records.sort(key=lambda record: record.relpath)
    skipped.sort(key=lambda item: item.relpath)
    return ScanResult(root=root, classes=classes, records=records, skipped=skipped)


def _report_skipped(root: Path, skipped: list[SkippedFile]) -> None:
    if not skipped:
        return
    names = ", ".join(item.relpath for item in skipped[:MAX_SKIPPED_IN_SUMMARY])
    if len(skipped) > MAX_SKIPPED_IN_SUMMARY:
        names += f" and {len(skipped) - MAX_SKIPPED_IN_SUMMARY} more (see the INFO log)"
    logger.warning(
        "Skipped %d files under %s that are not usable images: %s", len(skipped), root, names
    )
    for item in skipped:
        logger.info("Skipped %s: %s", item.relpath, item.reason)


def _require_usable_images(root: Path, result: ScanResult, files: dict[str, list[Path]]) -> None:
    usable = {label: 0 for label in result.classes}
    for record in result.records:
        usable[record.label] += 1
    for label, count in usable.items():
        if count > 0:
            continue
        folder = root / label
        total = len(files[label])
        if total == 0:
            detail = "the folder contains no files"
        else:
            detail = f"every file in it ({total}) was skipped as undecodable (see the log)"
        raise DatasetError(
            f"Class {label!r} has no usable image in {folder}: {detail}. "
            "Add images of this class, or remove the folder."
        )
