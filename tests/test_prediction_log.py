"""The JSON-lines prediction log: line integrity under threads and processes, and rotation."""

from __future__ import annotations

import json
import logging
import multiprocessing
import threading
from pathlib import Path

import pytest

from facemask.serving.prediction_log import PredictionLog, encode_record

# Larger than PIPE_BUF (4 KiB), so lines from unsynchronised writers could interleave.
PAYLOAD = "x" * 6000


def _all_lines(path: Path) -> list[str]:
    """Return the lines of the log and its rotated files, oldest file first."""
    files = sorted(path.parent.glob(path.name + ".*[0-9]"), key=lambda p: -int(p.suffix[1:]))
    lines: list[str] = []
    for file in [*files, path]:
        if file.exists():
            lines.extend(file.read_text().splitlines())
    return lines


def _append_from_process(path: str, writer: int, count: int, max_bytes: int) -> None:
    log = PredictionLog(Path(path), max_bytes=max_bytes, backups=1000)
    for seq in range(count):
        assert log.write({"writer": writer, "seq": seq, "payload": PAYLOAD})
    log.close()


def test_write_appends_one_json_line(tmp_path: Path):
    path = tmp_path / "logs" / "predictions.jsonl"
    log = PredictionLog(path, max_bytes=1_000_000, backups=2)

    assert log.write({"request_id": "a", "label": "mask", "note": "naïve"})
    assert log.write({"request_id": "b", "label": "no_mask"})
    log.close()

    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["request_id"] for line in lines] == ["a", "b"]
    assert json.loads(lines[0])["note"] == "naïve"
    assert path.read_bytes().endswith(b"\n")


def test_rotation_keeps_backups(tmp_path: Path):
    path = tmp_path / "predictions.jsonl"
    line_size = len(encode_record({"seq": 0, "pad": "y" * 80}))
    log = PredictionLog(path, max_bytes=line_size * 3, backups=2)

    for seq in range(10):
        assert log.write({"seq": seq, "pad": "y" * 80})
    log.close()

    assert path.with_name("predictions.jsonl.1").exists()
    assert path.with_name("predictions.jsonl.2").exists()
    assert not path.with_name("predictions.jsonl.3").exists()
    for file in tmp_path.glob("predictions.jsonl*[0-9l]"):
        assert file.stat().st_size <= line_size * 3
    sequence_numbers = [json.loads(line)["seq"] for line in _all_lines(path)]
    # Files hold three lines each: [9], .1 = [6, 7, 8], .2 = [3, 4, 5]; lines 0 to 2 were dropped.
    assert sequence_numbers == list(range(3, 10))


def test_rotation_without_backups_deletes(tmp_path: Path):
    path = tmp_path / "predictions.jsonl"
    log = PredictionLog(path, max_bytes=50, backups=0)

    for seq in range(3):
        log.write({"seq": seq, "pad": "z" * 30})
    log.close()

    assert [json.loads(line)["seq"] for line in path.read_text().splitlines()] == [2]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "predictions.jsonl",
        "predictions.jsonl.lock",
    ]


def test_writer_follows_rotation_by_another(tmp_path: Path):
    path = tmp_path / "predictions.jsonl"
    first = PredictionLog(path, max_bytes=200, backups=3)
    second = PredictionLog(path, max_bytes=200, backups=3)

    first.write({"writer": 1, "pad": "a" * 150})
    second.write({"writer": 2, "pad": "b" * 150})  # rotates the first line to .1
    first.write({"writer": 1, "pad": "c" * 150})  # must not append to the renamed file

    rotated = path.with_name("predictions.jsonl.1").read_text().splitlines()
    current = path.read_text().splitlines()
    assert [json.loads(line)["pad"][0] for line in rotated] == ["b"]
    assert [json.loads(line)["pad"][0] for line in current] == ["c"]


def test_threads_write_whole_lines(tmp_path: Path):
    path = tmp_path / "predictions.jsonl"
    log = PredictionLog(path, max_bytes=10_000_000, backups=1)

    def append(writer: int) -> None:
        for seq in range(100):
            log.write({"writer": writer, "seq": seq, "payload": PAYLOAD})

    threads = [threading.Thread(target=append, args=(writer,)) for writer in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    log.close()

    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 800
    assert {(r["writer"], r["seq"]) for r in records} == {
        (w, s) for w in range(8) for s in range(100)
    }


def test_processes_write_whole_lines_across_rotation(tmp_path: Path):
    path = tmp_path / "predictions.jsonl"
    context = multiprocessing.get_context("spawn")
    # About 40 lines per file, so the three processes rotate the file several times.
    max_bytes = 40 * 6050
    processes = [
        context.Process(target=_append_from_process, args=(str(path), writer, 300, max_bytes))
        for writer in range(3)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [process.exitcode for process in processes] == [0, 0, 0]

    lines = _all_lines(path)
    records = [json.loads(line) for line in lines]
    assert len(records) == 900
    assert all(record["payload"] == PAYLOAD for record in records)
    assert {(r["writer"], r["seq"]) for r in records} == {
        (w, s) for w in range(3) for s in range(300)
    }
    assert len(list(tmp_path.glob("predictions.jsonl.*[0-9]"))) >= 5
    for writer in range(3):
        # Each process appends in order, and rotation keeps the files in order.
        sequence = [r["seq"] for r in records if r["writer"] == writer]
        assert sequence == sorted(sequence)


def test_write_failure_is_logged_and_counted(tmp_path: Path, caplog):
    path = tmp_path / "a-directory"
    path.mkdir()
    log = PredictionLog(path, max_bytes=1000, backups=1)

    with caplog.at_level(logging.ERROR):
        assert not log.write({"request_id": "req-42"})
        assert not log.write({"request_id": "req-43"})

    assert log.failures == 2
    messages = [record.getMessage() for record in caplog.records]
    assert any("req-42" in message for message in messages)


def test_invalid_record_is_a_failure(tmp_path: Path):
    log = PredictionLog(tmp_path / "p.jsonl", max_bytes=1000, backups=1)

    assert not log.write({"request_id": "r", "value": float("nan")})

    assert log.failures == 1
    assert not (tmp_path / "p.jsonl").exists() or (tmp_path / "p.jsonl").read_text() == ""


@pytest.mark.parametrize(("max_bytes", "backups"), [(0, 1), (10, -1)])
def test_invalid_limits_raise(tmp_path: Path, max_bytes: int, backups: int):
    with pytest.raises(ValueError):
        PredictionLog(tmp_path / "p.jsonl", max_bytes=max_bytes, backups=backups)
