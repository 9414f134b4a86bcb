"""The decoded-image cache on real photos: hits, misses, invalidation, corruption, eval parity."""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from facemask.data.datamodule import FaceMaskDataModule, ImageFolderDataset
from facemask.data.image_cache import (
    ImageCache,
    decode_for_eval,
    decode_for_training,
    read_entry,
    train_cache_side,
)
from facemask.data.images import decode_image
from facemask.data.transforms import Preprocessing, build_eval_transform, preprocess_file

# Real photos of the development set: large JPEGs (5760x3272 and 1024x977, so draft decoding
# applies), large PNGs (one palette), a WEBP, and a JPEG and a PNG smaller than a 64-px
# training entry (74 px).
LARGE_JPEGS = ("mask/with_mask175.jpg", "mask/with_mask361.jpg")
OTHER_FORMATS = ("mask/with_mask014.png", "mask/image_5.png", "mask/black10.webp")
SMALL = ("mask/0_0_0 copy 10.jpg", "mask/0_0_0 copy 2.png")

# Other tests in this process run MediaPipe's face detector, whose threads can leave a forked
# worker waiting forever on a lock, so workers start from a fresh forkserver process.
WORKER_START = "forkserver"


def _copy(real_data_root: Path, target: Path, relpaths: tuple[str, ...]) -> Path:
    for relpath in relpaths:
        destination = target / relpath
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(real_data_root / relpath, destination)
    return target


@pytest.fixture
def photos(tmp_path: Path, real_data_root: Path) -> Path:
    """A two-class folder of real photos in several formats and sizes."""
    relpaths = (*LARGE_JPEGS, *OTHER_FORMATS, *SMALL)
    root = _copy(real_data_root, tmp_path / "data", relpaths)
    (root / "no_mask").mkdir()
    for path in sorted((real_data_root / "no_mask").iterdir())[:6]:
        shutil.copyfile(path, root / "no_mask" / path.name)
    return root


def _datamodule(root: Path, cache_dir: Path | None, **options: object) -> FaceMaskDataModule:
    options.setdefault("image_size", 64)
    datamodule = FaceMaskDataModule(root, num_workers=0, cache_dir=cache_dir, **options)
    datamodule.setup()
    return datamodule


def _all_images(datamodule: FaceMaskDataModule, kind: str) -> ImageFolderDataset:
    """Return one dataset of every image of all splits, loaded as `kind` entries."""
    manifest = datamodule.manifest
    transform = datamodule.datasets["train" if kind == "train" else "test"].transform
    return ImageFolderDataset(
        [datamodule.root / path for path in manifest["path"]],
        [0] * len(manifest),
        list(manifest["sha256"]),
        transform,
        datamodule.image_loader(kind),
    )


def _load_all(dataset: ImageFolderDataset) -> list[np.ndarray]:
    pairs = zip(dataset.paths, dataset.sha256s, strict=True)
    return [dataset.image_loader.load(path, sha256) for path, sha256 in pairs]


def _entries(cache_dir: Path) -> list[Path]:
    return sorted((cache_dir / "images").rglob("*.rgb"))


def test_first_load_misses_then_hits(photos: Path, tmp_path: Path):
    datamodule = _datamodule(photos, tmp_path / "cache")
    dataset = _all_images(datamodule, "train")
    first = _load_all(dataset)
    assert dataset.image_loader.stats.misses == len(dataset)
    assert dataset.image_loader.stats.hits == 0
    assert len(_entries(tmp_path / "cache")) == len(dataset)

    again = _all_images(_datamodule(photos, tmp_path / "cache"), "train")
    second = _load_all(again)
    assert again.image_loader.stats.hits == len(again)
    assert again.image_loader.stats.misses == 0
    for cold, warm in zip(first, second, strict=True):
        np.testing.assert_array_equal(cold, warm)


def test_train_entry_is_downscaled_copy(photos: Path, tmp_path: Path):
    pre = Preprocessing(image_size=64)
    side = train_cache_side(64)
    assert side == math.ceil(64 * 1.15)
    large = decode_for_training(photos / LARGE_JPEGS[0], pre)
    assert min(large.shape[:2]) == side
    # 5760x3272 keeps its aspect ratio within one pixel of rounding.
    assert large.shape[1] == pytest.approx(side * 5760 / 3272, abs=1)
    for relpath in SMALL:
        small = decode_for_training(photos / relpath, pre)
        assert min(small.shape[:2]) < side
        np.testing.assert_array_equal(small, np.asarray(decode_image(photos / relpath).image))


def test_changed_source_is_rebuilt(photos: Path, tmp_path: Path, real_data_root: Path):
    cache_dir = tmp_path / "cache"
    target = photos / SMALL[0]
    before = _all_images(_datamodule(photos, cache_dir), "train")
    old_hash = before.sha256s[before.paths.index(target.resolve())]
    old_pixels = before.image_loader.load(target, old_hash)

    replacement = real_data_root / LARGE_JPEGS[1]
    shutil.copyfile(replacement, target)
    after = _all_images(_datamodule(photos, cache_dir), "train")
    new_hash = after.sha256s[after.paths.index(target.resolve())]
    new_pixels = after.image_loader.load(target, new_hash)

    assert new_hash != old_hash
    assert after.image_loader.stats.misses == 1
    assert after.image_loader.entry_path(new_hash).is_file()
    expected = decode_for_training(replacement, after.image_loader.pre)
    np.testing.assert_array_equal(new_pixels, expected)
    assert old_pixels.shape != new_pixels.shape


def test_image_size_change_is_rebuilt(photos: Path, tmp_path: Path):
    cache_dir = tmp_path / "cache"
    small = _all_images(_datamodule(photos, cache_dir, image_size=64), "eval")
    path, sha256 = small.paths[0], small.sha256s[0]
    assert small.image_loader.load(path, sha256).shape == (64, 64, 3)

    larger = _all_images(_datamodule(photos, cache_dir, image_size=96), "eval")
    pixels = larger.image_loader.load(path, sha256)
    assert pixels.shape == (96, 96, 3)
    assert larger.image_loader.stats.misses == 1
    assert larger.image_loader.stats.hits == 0
    assert larger.image_loader.entry_path(sha256) != small.image_loader.entry_path(sha256)
    assert small.image_loader.entry_path(sha256).is_file()


@pytest.mark.parametrize("damage", ["truncate", "flip_pixel", "garbage", "empty"])
def test_corrupt_entry_is_rebuilt(
    photos: Path, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
):
    dataset = _all_images(_datamodule(photos, tmp_path / "cache"), "train")
    path = photos / LARGE_JPEGS[0]
    sha256 = dataset.sha256s[dataset.paths.index(path.resolve())]
    expected = dataset.image_loader.load(path, sha256).copy()
    entry = dataset.image_loader.entry_path(sha256)
    data = bytearray(entry.read_bytes())
    if damage == "truncate":
        entry.write_bytes(data[: len(data) // 2])
    elif damage == "flip_pixel":
        data[len(data) // 2] ^= 0xFF
        entry.write_bytes(bytes(data))
    elif damage == "garbage":
        entry.write_bytes(b"not a cache entry" * 4)
    else:
        entry.write_bytes(b"")

    with caplog.at_level(logging.WARNING, logger="facemask.data.image_cache"):
        rebuilt = dataset.image_loader.load(path, sha256)

    np.testing.assert_array_equal(rebuilt, expected)
    assert dataset.image_loader.stats.rebuilt == 1
    assert any("corrupt image cache entry" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(read_entry(entry), expected)


@pytest.mark.parametrize("jpeg_draft", [True, False])
def test_cached_eval_tensors_equal_serving(photos: Path, tmp_path: Path, jpeg_draft: bool):
    datamodule = _datamodule(photos, tmp_path / "cache", image_size=64, jpeg_draft=jpeg_draft)
    pre = datamodule.preprocessing
    uncached = _all_images(_datamodule(photos, None, image_size=64, jpeg_draft=jpeg_draft), "eval")
    for attempt in ("cold", "warm"):
        cached = _all_images(datamodule, "eval")
        for index, path in enumerate(cached.paths):
            served = preprocess_file(path, pre)
            assert torch.equal(cached[index][0], served), (attempt, path.name)
            assert torch.equal(uncached[index][0], served), path.name
        stats = cached.image_loader.stats
        expected = (0, len(cached)) if attempt == "cold" else (len(cached), 0)
        assert (stats.hits, stats.misses) == expected


def test_eval_entry_follows_exif_orientation(tmp_path: Path, odd_image_files: dict[str, bytes]):
    source = tmp_path / "rotated.jpg"
    source.write_bytes(odd_image_files["rotated_exif6.jpg"])
    pre = Preprocessing(image_size=32)
    cache = ImageCache(tmp_path / "cache", pre, "eval")
    sha256 = hashlib.sha256(source.read_bytes()).hexdigest()
    cached = build_eval_transform(pre)(image=cache.load(source, sha256))["image"]
    assert torch.equal(cached, preprocess_file(source, pre))
    train = decode_for_training(source, pre)
    assert train.shape[:2] == (40, 20)


def test_file_changed_after_scan_uncached(
    photos: Path, tmp_path: Path, real_data_root: Path, caplog: pytest.LogCaptureFixture
):
    dataset = _all_images(_datamodule(photos, tmp_path / "cache"), "eval")
    target = photos / SMALL[0]
    index = dataset.paths.index(target.resolve())
    replacement = real_data_root / OTHER_FORMATS[0]
    shutil.copyfile(replacement, target)

    with caplog.at_level(logging.WARNING, logger="facemask.data.image_cache"):
        pixels = dataset.image_loader.load(target, dataset.sha256s[index])

    np.testing.assert_array_equal(pixels, decode_for_eval(replacement, dataset.image_loader.pre))
    assert not dataset.image_loader.entry_path(dataset.sha256s[index]).exists()
    assert dataset.image_loader.stats.uncached == 1
    assert any("changed since the dataset scan" in r.getMessage() for r in caplog.records)


def test_unwritable_cache_only_warns(
    photos: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    datamodule = _datamodule(photos, tmp_path / "scan-cache")
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder should be", encoding="utf-8")
    cache = ImageCache(blocked, datamodule.preprocessing, "train")
    paths = [datamodule.root / p for p in datamodule.manifest["path"]]

    with caplog.at_level(logging.WARNING, logger="facemask.data.image_cache"):
        for path, sha256 in zip(paths, datamodule.manifest["sha256"], strict=True):
            pixels = cache.load(path, sha256)
            np.testing.assert_array_equal(pixels, decode_for_training(path, cache.pre))

    warnings = [r for r in caplog.records if "Cannot write image cache entry" in r.getMessage()]
    assert len(warnings) == 1


def test_concurrent_workers_share_entries(photos: Path, tmp_path: Path):
    datamodule = _datamodule(photos, tmp_path / "cache")
    single = _all_images(datamodule, "eval")
    # Every image four times, read by two worker processes at once.
    repeated = ImageFolderDataset(
        single.paths * 4,
        single.labels * 4,
        single.sha256s * 4,
        single.transform,
        single.image_loader,
    )
    loader = DataLoader(repeated, batch_size=2, num_workers=2, multiprocessing_context=WORKER_START)
    batches = torch.cat([images for images, _ in loader])

    for index, path in enumerate(repeated.paths):
        assert torch.equal(batches[index], preprocess_file(path, datamodule.preprocessing)), path
    entries = _entries(tmp_path / "cache")
    assert len(entries) == len(single)
    assert list((tmp_path / "cache").rglob("*.tmp")) == []
    for entry in entries:
        assert read_entry(entry).shape == (64, 64, 3)


def test_workers_draw_different_augmentations(photos: Path, tmp_path: Path):
    datamodule = _datamodule(photos, tmp_path / "cache")
    train = _all_images(datamodule, "train")
    same_image = ImageFolderDataset(
        train.paths[:1] * 8, [0] * 8, train.sha256s[:1] * 8, train.transform, train.image_loader
    )
    loader = DataLoader(
        same_image, batch_size=1, num_workers=2, multiprocessing_context=WORKER_START
    )
    images = [batch for batch, _ in loader]
    # Batches alternate between the two workers, so 0 and 1 come from different workers.
    assert not torch.equal(images[0], images[1])
    assert len({tuple(image.flatten()[:64].tolist()) for image in images}) > 4


def test_cache_off_writes_nothing(photos: Path, tmp_path: Path):
    datamodule = _datamodule(photos, tmp_path / "cache", image_cache=False)
    dataset = datamodule.datasets["test"]
    for index, path in enumerate(dataset.paths):
        assert torch.equal(dataset[index][0], preprocess_file(path, datamodule.preprocessing))
    assert not datamodule.uses_image_cache
    assert _entries(tmp_path / "cache") == []
