"""Download the public face-mask images and import them as one folder per class.

The development images come from the GitHub repository `chandrikadeb7/Face-Mask-Detection`. Its
`dataset/with_mask/` folder becomes the class `mask` and `dataset/without_mask/` becomes `no_mask`.
A zip file or folder obtained another way is imported the same way with `--from PATH`. Layout
detection, image checks and the expected class counts are in `facemask.data.importer`.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import logging
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from facemask.data.importer import (
    DatasetImportError,
    ImportReport,
    check_out_dir,
    has_class_images,
    import_dataset,
)
from facemask.settings import project_root

logger = logging.getLogger(__name__)

UPSTREAM_REPOSITORY = "chandrikadeb7/Face-Mask-Detection"
UPSTREAM_COMMIT = "7e500749401bad4bb338790fbdb89b58e41ef2d9"
DEFAULT_URL = f"https://codeload.github.com/{UPSTREAM_REPOSITORY}/zip/{UPSTREAM_COMMIT}"

MIB = 2**20
USER_AGENT = "facemask-download-data"

# Lines of skipped files printed by the CLI. The rest are counted, not listed.
MAX_SKIPPED_LINES = 20


class DownloadError(RuntimeError):
    """A download that failed after all retries, or that the server rejected."""


class _IncompleteBodyError(OSError):
    """The connection closed before the announced number of bytes arrived."""


def download_archive(
    url: str,
    dest: Path,
    *,
    timeout: float = 60.0,
    chunk_size: int = MIB,
    progress: bool = True,
    retries: int = 3,
    backoff: float = 1.0,
) -> Path:
    """Download `url` to `dest`, resuming a partial download left by an earlier attempt.

    The data goes to `dest` + `.part`, which is renamed to `dest` only once complete. When a
    `.part` file exists, the request sends an HTTP `Range` header for the remaining bytes.
    If the server responds with the whole file (status 200), the download restarts from zero.

    Args:
        url: The http(s) URL of the file.
        dest: The final path. Its parent folder is created.
        timeout: Seconds to wait for the connection and for each read.
        chunk_size: Bytes per read and write.
        progress: Whether to show a progress bar on stderr.
        retries: Further attempts after a network error or a 5xx status, each resuming where
            the previous one stopped.
        backoff: Seconds to wait before the first retry, doubled before each later one.

    Returns:
        `dest`.

    Raises:
        DownloadError: The server responded with a 4xx status, or every attempt failed.
    """
    if urllib.parse.urlparse(url).scheme not in ("http", "https"):
        raise DownloadError(f"Invalid URL {url!r}: expected an http:// or https:// URL")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")
    retries = max(retries, 0)
    hint = (
        "Check the network connection and the URL, or download the archive another way and "
        "import it with --from PATH (a zip file or a folder)."
    )
    for attempt in range(retries + 1):
        try:
            _fetch_into(url, part, timeout=timeout, chunk_size=chunk_size, progress=progress)
            break
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                raise DownloadError(f"Download of {url} failed: HTTP {exc.code}. {hint}") from exc
            error: Exception = exc
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            error = exc
        reason = _describe_error(error)
        if attempt == retries:
            raise DownloadError(
                f"Download of {url} failed after {retries + 1} attempts: {reason}. {hint}"
            ) from error
        delay = backoff * 2**attempt
        logger.warning(
            "Download of %s failed: %s. Retry %d of %d in %.1f s",
            url,
            reason,
            attempt + 1,
            retries,
            delay,
        )
        time.sleep(delay)
    part.replace(dest)
    logger.info("Downloaded %s to %s (%d bytes)", url, dest, dest.stat().st_size)
    return dest


def _describe_error(error: Exception) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code}"
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    if isinstance(error, TimeoutError):
        return "timed out"
    return str(error) or type(error).__name__


def _fetch_into(url: str, part: Path, *, timeout: float, chunk_size: int, progress: bool) -> None:
    """Write the rest of `url` into `part`, appending when the server honours the Range header."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code != 416 or not offset:
            raise
        # 416: the range starts at or past the end of the file.
        total = _content_range(exc.headers.get("Content-Range", ""))[1]
        exc.close()
        if total == offset:
            return
        logger.warning("Partial file %s does not match %s; restarting from zero", part, url)
        part.unlink()
        _fetch_into(url, part, timeout=timeout, chunk_size=chunk_size, progress=progress)
        return

    with response:
        start, total = _content_range(response.headers.get("Content-Range", ""))
        if response.status == 206 and start == offset:
            mode = "ab"
        elif response.status == 200:
            if offset:
                logger.warning("Server ignored the Range request for %s; restarting from zero", url)
            mode, offset = "wb", 0
        else:
            part.unlink(missing_ok=True)
            raise _IncompleteBodyError(
                f"unexpected response: status {response.status}, "
                f"Content-Range {response.headers.get('Content-Range')!r} for start {offset}"
            )
        length_header = response.headers.get("Content-Length", "")
        expected = int(length_header) if length_header.isdigit() else None
        if total is None and expected is not None:
            total = offset + expected
        received = _stream(response, part, mode, offset, total, chunk_size, progress)
    if expected is not None and received < expected:
        raise _IncompleteBodyError(f"connection closed after {offset + received} of {total} bytes")


def _stream(
    response: http.client.HTTPResponse,
    part: Path,
    mode: str,
    offset: int,
    total: int | None,
    chunk_size: int,
    progress: bool,
) -> int:
    received = 0
    bar = tqdm(
        total=total,
        initial=offset,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=part.name.removesuffix(".part"),
        disable=not progress,
    )
    with part.open(mode) as out, bar:
        # NOTE: http.client returns b"" when the peer closes early, so the caller compares the
        # count with Content-Length. Without Content-Length a cut connection looks complete, and
        # only the zip check in `fetch_archive` catches the truncated file.
        while chunk := response.read(chunk_size):
            out.write(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    return received


def _content_range(header: str) -> tuple[int | None, int | None]:
    """Return the first byte and total size from `bytes S-E/T` or `bytes */T`."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", header)
    if not match:
        return None, None
    start = int(match.group(1)) if match.group(1) else None
    total = int(match.group(2)) if match.group(2).isdigit() else None
    return start, total


def default_cache_dir() -> Path:
    """Return the folder that keeps downloaded archives: `<project root>/data/downloads`."""
    return project_root() / "data" / "downloads"


def archive_file_name(url: str) -> str:
    """Return the cache file name for `url`: its last path segment plus a hash of the whole URL."""
    segments = [s for s in urllib.parse.urlparse(url).path.split("/") if s]
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", segments[-1]) if segments else "archive"
    stem = stem.removesuffix(".zip") or "archive"
    digest = hashlib.sha256(url.encode()).hexdigest()[:8]
    return f"{stem}-{digest}.zip"


def fetch_archive(
    url: str,
    cache_dir: Path,
    *,
    timeout: float = 60.0,
    retries: int = 3,
    progress: bool = True,
) -> Path:
    """Return the cached zip file for `url`, downloading it unless a valid copy is cached.

    Raises:
        DownloadError: The download failed, or the downloaded file is not a zip file.
    """
    archive = Path(cache_dir) / archive_file_name(url)
    if archive.exists():
        if zipfile.is_zipfile(archive):
            logger.info("Using the cached archive %s", archive)
            return archive
        logger.warning("Cached file %s is not a valid zip file; downloading it again", archive)
        archive.unlink()
    download_archive(url, archive, timeout=timeout, retries=retries, progress=progress)
    if not zipfile.is_zipfile(archive):
        raise DownloadError(
            f"The file downloaded from {url} to {archive} is not a valid zip file. Check that "
            "the URL points to a zip archive; the next run replaces the file."
        )
    return archive


def ensure_dataset(
    root: Path,
    *,
    url: str = DEFAULT_URL,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> Path:
    """Download and import the dataset into `root` unless `root` already contains images.

    `root` counts as ready when at least one class folder in it contains an image file. Otherwise
    the archive is downloaded into `cache_dir` (default `<project root>/data/downloads`), or
    taken from there if already downloaded, and imported into `root`.

    Returns:
        `root`.

    Raises:
        DownloadError: The download failed.
        DatasetImportError: `root` contains other files, or the archive has no usable images.
    """
    root = Path(root)
    if has_class_images(root):
        logger.debug("Dataset folder %s already contains images; nothing to download", root)
        return root
    # Fail before a long download when the import would be rejected anyway.
    check_out_dir(root, force=False)
    archive = fetch_archive(url, cache_dir or default_cache_dir(), progress=progress)
    import_dataset(archive, root)
    return root


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the `facemask-download-data` command."""
    parser = argparse.ArgumentParser(
        prog="facemask-download-data",
        description=(
            "Download the face-mask images and import them as one folder per class "
            "(dataset/with_mask -> mask, dataset/without_mask -> no_mask). "
            "Every file is decoded, and files that fail to decode are skipped and listed."
        ),
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="PATH",
        help="dataset folder to create, one sub-folder per class "
        "(default: <project root>/data/raw)",
    )
    parser.add_argument(
        "--url",
        default=DEFAULT_URL,
        help=f"http(s) URL of the zip archive to download (default: {DEFAULT_URL})",
    )
    parser.add_argument(
        "--from",
        dest="source",
        type=Path,
        default=None,
        metavar="PATH",
        help="import this zip file or folder instead of downloading; it may use the upstream "
        "layout (dataset/with_mask, dataset/without_mask) or one folder per class",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace the contents of a non-empty --out folder"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        metavar="PATH",
        help="folder that keeps the downloaded archive for reuse and for resuming a broken "
        "download (default: <project root>/data/downloads)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="seconds to wait for the connection and for each read (default: 60)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=3,
        metavar="COUNT",
        help="further download attempts after a network error (default: 3)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="do not show the download progress bar"
    )
    return parser


def format_report(report: ImportReport) -> str:
    """Return the summary that the CLI prints: counts per class, skipped files and location."""
    lines = [f"Imported {report.total:,} images ({report.layout} layout) into {report.out_dir}"]
    width = max(len(name) for name in report.counts)
    lines += [f"  {name:<{width}}  {count:>7,}" for name, count in sorted(report.counts.items())]
    if report.skipped:
        lines.append(f"Skipped {len(report.skipped):,} files:")
        lines += [f"  {s.path}: {s.reason}" for s in report.skipped[:MAX_SKIPPED_LINES]]
        if len(report.skipped) > MAX_SKIPPED_LINES:
            lines.append(f"  ... and {len(report.skipped) - MAX_SKIPPED_LINES:,} more")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the `facemask-download-data` command and return its exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out_dir = args.out if args.out is not None else project_root() / "data" / "raw"
    try:
        check_out_dir(out_dir, force=args.force)
        source = args.source
        if source is None:
            source = fetch_archive(
                args.url,
                args.cache_dir or default_cache_dir(),
                timeout=args.timeout,
                retries=args.retries,
                progress=not args.no_progress,
            )
        report = import_dataset(source, out_dir, force=args.force)
    except (DownloadError, DatasetImportError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    print(format_report(report))
    return 0
