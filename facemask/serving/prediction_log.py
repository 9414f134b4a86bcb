"""Append one JSON line per prediction to a log file shared by threads and server processes.

Each line is written with one `os.write` on a file opened with O_APPEND, while the writer holds
an exclusive `fcntl.flock` on a lock file next to the log. Lines from concurrent requests or
from several processes therefore never interleave or cut each other. Rotation runs under the
same lock: a process whose descriptor still points at a renamed file notices the new inode and
reopens the path before it writes.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)


def encode_record(record: dict[str, Any]) -> bytes:
    """Encode one record as a compact JSON line in UTF-8."""
    return (
        json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False) + "\n"
    ).encode()


class PredictionLog:
    """A JSON-lines file that rotates at `max_bytes`, keeping `backups` older files.

    Args:
        path: The log file. Its folder is created if missing. The lock file is `<path>.lock`.
        max_bytes: A line that would grow the file past this size first rotates it, unless the
            file is empty, so a single line larger than this is still written.
        backups: Rotated files kept as `<path>.1` (newest) to `<path>.<backups>`. With 0 the
            log is deleted at rotation.
    """

    def __init__(self, path: Path, max_bytes: int, backups: int):
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        if backups < 0:
            raise ValueError(f"backups must be 0 or more, got {backups}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.failures = 0
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        # flock excludes other processes only; threads of this process share one descriptor.
        self._thread_lock = threading.Lock()
        self._fd: int | None = None
        self._lock_fd: int | None = None

    def write(self, record: dict[str, Any]) -> bool:
        """Append `record` as one line; returns False after logging and counting a failure.

        Blocking: call it from a worker thread, not from the event loop.
        """
        try:
            line = encode_record(record)
            with self._thread_lock:
                self._write_locked(line)
        except (OSError, ValueError, TypeError) as exc:
            self.failures += 1
            log.error(
                "Prediction log write failed for request %s (%s): %s; %d failures so far",
                record.get("request_id"),
                self.path,
                exc,
                self.failures,
            )
            return False
        return True

    def close(self) -> None:
        """Close the descriptors; a later `write` reopens them."""
        with self._thread_lock:
            for fd in (self._fd, self._lock_fd):
                if fd is not None:
                    os.close(fd)
            self._fd = self._lock_fd = None

    def _write_locked(self, line: bytes) -> None:
        if self._lock_fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self._lock_path, _OPEN_FLAGS, 0o644)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            fd = self._current_fd()
            size = os.fstat(fd).st_size
            if size > 0 and size + len(line) > self.max_bytes:
                self._rotate()
                fd = self._current_fd()
            written = os.write(fd, line)
            if written != len(line):
                # A regular-file write is cut short only by a full disk or a signal. Finish the
                # line so that the next writer does not append to half of it.
                view = memoryview(line)[written:]
                while view:
                    view = view[os.write(fd, view) :]
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _current_fd(self) -> int:
        """Return a descriptor of the file now at `path`, reopening after another rotation."""
        if self._fd is not None:
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            opened = os.fstat(self._fd)
            if current is not None and (current.st_ino, current.st_dev) == (
                opened.st_ino,
                opened.st_dev,
            ):
                return self._fd
            os.close(self._fd)
            self._fd = None
        self._fd = os.open(self.path, _OPEN_FLAGS, 0o644)
        return self._fd

    def _rotate(self) -> None:
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
            return
        for index in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{index + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        log.info("Rotated the prediction log %s", self.path)
