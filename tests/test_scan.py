"""Tests for finding and checking the images of a class-folder dataset."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image

import facemask.data.scan as scan_module
from facemask.data.scan import DatasetError, ImageRecord, discover_classes, scan_dataset


def _real_files(real_data_root: Path, label: str, count: int) -> list[Path]:
    with (real_data_root / "manifest.csv").open(encoding="utf-8") as handle:
        rows = [row for row in csv.DictReader(handle) if row["label"] == label]
    rows.sort(key=lambda row: (int(row["width"]) * int(row["height"]), row["path"]))
    return [real_data_root / row["path"] for row in rows[:count]]


def _make_dataset(
    root: Path,
    real_data_root: Path,
    classes: tuple[str, ...] = ("mask", "no_mask"),
) -> Path:
    for label in classes:
        source_label = label if label in ("mask", "no_mask") else "mask"
        for source in _real_files(real_data_root, source_label, 3):
            target = root / label / source.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    return root


@pytest.fixture
def dataset(
    tmp_path: Path,
    real_data_root: Path,
    odd_image_files: dict[str, bytes],
    broken_image_files: dict[str, bytes],
) -> Path:
    """Two classes of real images, plus odd, broken and hidden files in `mask`."""
    root = _make_dataset(tmp_path / "data", real_data_root)
    for name, data in {**odd_image_files, **broken_image_files}.items():
        (root / "mask" / name).write_bytes(data)
    (root / "mask" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "mask" / ".thumbnails").mkdir()
    (root / "mask" / ".thumbnails" / "bad.jpg").write_bytes(b"not an image")
    (root / "mask" / "nested" / "deeper").mkdir(parents=True)
    shutil.copyfile(root / "mask" / "grey.png", root / "mask" / "nested" / "deeper" / "a b.png")
    (root / ".cache").mkdir()
    (root / "README.txt").write_text("not a class", encoding="utf-8")
    return root


def _scan(root: Path, **kwargs: object) -> scan_module.ScanResult:
    kwargs.setdefault("progress", False)
    kwargs.setdefault("workers", 1)
    return scan_dataset(root, **kwargs)


def _count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real_decode = scan_module.decode_image

    def counting_decode(source: object, **kwargs: object) -> object:
        calls.append("decode")
        return real_decode(source, **kwargs)

    monkeypatch.setattr(scan_module, "decode_image", counting_decode)
    return calls


def test_discover_classes_sorted(dataset: Path) -> None:
    (dataset / "a_first").mkdir()

    assert discover_classes(dataset) == ["a_first", "mask", "no_mask"]


def test_scan_finds_usable_images(dataset: Path, odd_image_files: dict[str, bytes]) -> None:
    result = _scan(dataset)

    relpaths = [record.relpath for record in result.records]
    assert result.classes == ["mask", "no_mask"]
    assert result.root == dataset.resolve()
    assert relpaths == sorted(relpaths)
    assert len(result.records) == 3 + len(odd_image_files) + 1 + 3
    assert "mask/nested/deeper/a b.png" in relpaths
    for name in odd_image_files:
        assert f"mask/{name}" in relpaths
    assert not any("/." in relpath for relpath in relpaths)
    for record in result.records:
        assert record.path.is_absolute()
        assert record.path == dataset.resolve() / record.relpath
        assert record.label == record.relpath.split("/")[0]
        assert record.sha256 == hashlib.sha256(record.path.read_bytes()).hexdigest()


def test_scan_reports_modes_formats_and_rotation(dataset: Path) -> None:
    records = {record.relpath: record for record in _scan(dataset).records}

    assert records["mask/png_named.jpg"].format == "PNG"
    assert records["mask/webp_no_extension"].format == "WEBP"
    assert records["mask/rgba.png"].mode == "RGBA"
    assert records["mask/palette_transparent.png"].mode == "P"
    assert records["mask/grey.png"].mode == "L"
    assert records["mask/grey16.png"].mode == "I;16"
    assert records["mask/cmyk.jpg"].mode == "CMYK"
    rotated = records["mask/rotated_exif6.jpg"]
    assert (rotated.width, rotated.height) == (20, 40)


def test_scan_skips_broken_files(
    dataset: Path, broken_image_files: dict[str, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="facemask.data"):
        result = _scan(dataset)

    skipped = {item.relpath: item for item in result.skipped}
    assert sorted(skipped) == sorted(f"mask/{name}" for name in broken_image_files)
    assert all(item.label == "mask" for item in skipped.values())
    assert "cannot decode JPEG" in skipped["mask/truncated.jpg"].reason
    assert "not a supported image" in skipped["mask/text.jpg"].reason
    assert "not a supported image" in skipped["mask/empty.jpg"].reason
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("Skipped 3 files" in message for message in warnings), warnings
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any(message.startswith("Skipped mask/truncated.jpg:") for message in infos), infos


def test_scan_three_classes(tmp_path: Path, real_data_root: Path) -> None:
    root = _make_dataset(tmp_path, real_data_root, ("mask", "mask_incorrect", "no_mask"))

    result = _scan(root)

    assert result.classes == ["mask", "mask_incorrect", "no_mask"]
    assert {record.label for record in result.records} == set(result.classes)
    assert sum(record.label == "mask_incorrect" for record in result.records) == 3


def test_scan_selected_classes_keep_order(tmp_path: Path, real_data_root: Path) -> None:
    root = _make_dataset(tmp_path, real_data_root, ("mask", "mask_incorrect", "no_mask"))

    result = _scan(root, classes=["no_mask", "mask"])

    assert result.classes == ["no_mask", "mask"]
    assert {record.label for record in result.records} == {"mask", "no_mask"}


def test_scan_worker_pool_matches_single_process(dataset: Path) -> None:
    for index in range(scan_module.MIN_FILES_FOR_POOL):
        shutil.copyfile(dataset / "mask" / "grey.png", dataset / "no_mask" / f"copy{index}.png")

    single = _scan(dataset, workers=1)
    pooled = _scan(dataset, workers=2)

    assert pooled.records == single.records
    assert pooled.skipped == single.skipped


def test_missing_root_names_path_and_fix(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"

    with pytest.raises(DatasetError) as error:
        _scan(missing)

    message = str(error.value)
    assert str(missing) in message
    assert "data.root=" in message
    assert "python scripts/download_data.py" in message


def test_root_that_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "data.zip"
    path.write_bytes(b"PK")

    with pytest.raises(DatasetError, match="is not a folder") as error:
        _scan(path)
    assert str(path) in str(error.value)


def test_root_without_class_folders(tmp_path: Path) -> None:
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "image.jpg").write_bytes(b"")

    with pytest.raises(DatasetError, match="no class sub-folders") as error:
        _scan(tmp_path)
    assert str(tmp_path) in str(error.value)


def test_single_class_is_rejected(tmp_path: Path, real_data_root: Path) -> None:
    root = _make_dataset(tmp_path, real_data_root, ("mask",))

    with pytest.raises(DatasetError, match="at least 2") as error:
        _scan(root)
    assert "['mask']" in str(error.value)


def test_unknown_selected_class(dataset: Path) -> None:
    with pytest.raises(DatasetError, match="not found") as error:
        _scan(dataset, classes=["mask", "masks"])
    assert "'masks'" in str(error.value)


def test_class_with_only_broken_files(dataset: Path, broken_image_files: dict[str, bytes]) -> None:
    shutil.rmtree(dataset / "no_mask")
    (dataset / "no_mask").mkdir()
    for name, data in broken_image_files.items():
        (dataset / "no_mask" / name).write_bytes(data)

    with pytest.raises(DatasetError) as error:
        _scan(dataset)

    message = str(error.value)
    assert "'no_mask'" in message
    assert str(dataset.resolve() / "no_mask") in message
    assert f"every file in it ({len(broken_image_files)})" in message


def test_class_folder_without_files(dataset: Path) -> None:
    (dataset / "empty_class" / ".hidden").mkdir(parents=True)

    with pytest.raises(DatasetError, match="'empty_class'") as error:
        _scan(dataset)
    assert "contains no files" in str(error.value)


def test_invalid_worker_count(dataset: Path) -> None:
    with pytest.raises(DatasetError, match="workers=0"):
        _scan(dataset, workers=0)


def test_cache_reuse_skips_decoding(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_dir = tmp_path / "cache"
    first = _scan(dataset, cache_dir=cache_dir)
    calls = _count_decodes(monkeypatch)

    second = _scan(dataset, cache_dir=cache_dir)

    assert calls == []
    assert second.records == first.records
    assert second.skipped == first.skipped
    assert len(list(cache_dir.glob("*.json"))) == 1
    assert list(cache_dir.glob("*.tmp")) == []


def test_cache_rechecks_changed_file(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_dir = tmp_path / "cache"
    _scan(dataset, cache_dir=cache_dir)
    changed = dataset / "mask" / "grey.png"
    Image.new("L", (30, 20), 7).save(changed, format="PNG")
    broken = dataset / "no_mask" / sorted(os.listdir(dataset / "no_mask"))[0]
    stat = broken.stat()
    broken.write_bytes(b"x" * stat.st_size)  # Same size, so only the mtime reveals the change.
    os.utime(broken, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    calls = _count_decodes(monkeypatch)

    result = _scan(dataset, cache_dir=cache_dir)

    assert len(calls) == 2
    records = {record.relpath: record for record in result.records}
    assert (records["mask/grey.png"].width, records["mask/grey.png"].height) == (30, 20)
    assert records["mask/grey.png"].sha256 == hashlib.sha256(changed.read_bytes()).hexdigest()
    skipped = {item.relpath for item in result.skipped}
    assert broken.relative_to(dataset).as_posix() in skipped


def test_corrupt_cache_is_ignored(
    dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache_dir = tmp_path / "cache"
    expected = _scan(dataset, cache_dir=cache_dir)
    (cache_file,) = cache_dir.glob("*.json")
    cache_file.write_text('{"checker": {"version": 1', encoding="utf-8")

    with caplog.at_level(logging.WARNING, logger="facemask.data"):
        result = _scan(dataset, cache_dir=cache_dir)

    assert result.records == expected.records
    assert any("unreadable scan cache" in r.getMessage() for r in caplog.records)
    assert json.loads(cache_file.read_text(encoding="utf-8"))["entries"]


def test_full_real_dataset_matches_manifest(real_data_root: Path, tmp_path: Path) -> None:
    started = time.perf_counter()
    result = scan_dataset(real_data_root, cache_dir=tmp_path, workers=2, progress=False)
    cold_seconds = time.perf_counter() - started

    with (real_data_root / "manifest.csv").open(encoding="utf-8") as handle:
        expected = {row["path"]: row for row in csv.DictReader(handle)}
    assert result.classes == ["mask", "no_mask"]
    assert result.skipped == []
    assert len(result.records) == len(expected) == 4094
    for record in result.records:
        row = expected[record.relpath]
        assert record.label == row["label"], record.relpath
        assert record.sha256 == row["sha256"], record.relpath
        assert (record.width, record.height) == (int(row["width"]), int(row["height"]))
        assert (record.mode, record.format) == (row["mode"], row["format"]), record.relpath

    started = time.perf_counter()
    warm = scan_dataset(real_data_root, cache_dir=tmp_path, progress=False)
    warm_seconds = time.perf_counter() - started
    assert warm.records == result.records
    # Loose bound: a warm scan only stats files, so it must be far faster than decoding them.
    assert warm_seconds < max(2.0, cold_seconds / 2), (cold_seconds, warm_seconds)


def test_record_is_frozen(dataset: Path) -> None:
    record: ImageRecord = _scan(dataset).records[0]

    with pytest.raises(AttributeError):
        record.label = "other"  # type: ignore[misc]


def test_incomplete_cache_entry_is_rechecked(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_dir = tmp_path / "cache"
    expected = _scan(dataset, cache_dir=cache_dir)
    (cache_file,) = cache_dir.glob("*.json")
    payload = json.loads(cache_file.read_text(encoding="utf-8"))
    del payload["entries"]["mask/grey.png"]["sha256"]
    cache_file.write_text(json.dumps(payload), encoding="utf-8")
    calls = _count_decodes(monkeypatch)

    result = _scan(dataset, cache_dir=cache_dir)

    assert len(calls) == 1
    assert result.records == expected.records


def test_unwritable_cache_dir_only_warns(
    dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("a file where the cache folder should be", encoding="utf-8")

    with caplog.at_level(logging.WARNING, logger="facemask.data"):
        result = _scan(dataset, cache_dir=not_a_folder)

    assert len(result.records) > 0
    assert any("Cannot write scan cache" in r.getMessage() for r in caplog.records)


def test_broken_symlink_is_skipped(dataset: Path) -> None:
    (dataset / "no_mask" / "gone.jpg").symlink_to(dataset / "does-not-exist.jpg")

    result = _scan(dataset)

    skipped = {item.relpath: item.reason for item in result.skipped}
    assert "cannot read file" in skipped["no_mask/gone.jpg"]
