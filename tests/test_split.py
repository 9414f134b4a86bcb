"""Tests for the stratified, duplicate-aware train/val/test split."""

from __future__ import annotations

import csv
import logging
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facemask.data.scan import DatasetError, ImageRecord, scan_dataset
from facemask.data.split import (
    SPLIT_NAMES,
    build_manifest,
    group_images,
    normalise_stem,
    split_counts,
    stratified_group_split,
    validate_fractions,
)

FRACTIONS = (0.7, 0.15, 0.15)


@pytest.fixture(scope="module")
def real_records(real_data_root: Path) -> list[ImageRecord]:
    """Records of the real data set, built from its manifest.csv without decoding."""
    with (real_data_root / "manifest.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return [
        ImageRecord(
            path=real_data_root / row["path"],
            relpath=row["path"],
            label=row["label"],
            sha256=row["sha256"],
            width=int(row["width"]),
            height=int(row["height"]),
            mode=row["mode"],
            format=row["format"],
        )
        for row in sorted(rows, key=lambda row: row["path"])
    ]


def _splits_by_key(records: list[ImageRecord], splits: list[str], keys: list) -> dict:
    found = defaultdict(set)
    for key, split in zip(keys, splits, strict=True):
        found[key].add(split)
    return {key: value for key, value in found.items() if len(value) > 1}


def _write_class(root: Path, label: str, names: list[str], first_seed: int) -> None:
    folder = root / label
    folder.mkdir(parents=True, exist_ok=True)
    for offset, name in enumerate(names):
        pixels = np.random.default_rng(first_seed + offset).integers(0, 256, (8, 8, 3))
        Image.fromarray(pixels.astype(np.uint8)).save(folder / name, format="PNG")


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("0_0_x copy 3.jpg", "0_0_x"),
        ("0_0_x copy.jpg", "0_0_x"),
        ("0_0_X copy 2 2.png", "0_0_x"),
        ("OIP (11) (1).png", "oip"),
        ("2020-06-23-120048 (another copy).jpg", "2020-06-23-120048"),
        ("2020-06-23-120048 (copy).jpg", "2020-06-23-120048"),
        ("photo (3rd copy).jpg", "photo"),
        ("Photo - Copy (2).jpg", "photo"),
        ("copy.jpg", "copy"),
        ("my copycat.jpg", "my copycat"),
        ("with_mask12.jpeg", "with_mask12"),
        ("black3.jpg_1088Wx1632H", "black3"),
    ],
)
def test_normalise_stem(filename: str, expected: str) -> None:
    assert normalise_stem(filename) == expected


@pytest.mark.parametrize("fractions", [(0.7, 0.15, 0.15), [0.8, 0.1, 0.1], (1 / 3, 1 / 3, 1 / 3)])
def test_validate_fractions_accepts(fractions: tuple[float, ...]) -> None:
    result = validate_fractions(fractions)

    assert result == tuple(float(value) for value in fractions)
    assert all(isinstance(value, float) for value in result)


@pytest.mark.parametrize(
    ("fractions", "shown"),
    [
        ((0.8, 0.2), "[0.8, 0.2]"),
        ((0.7, 0.1, 0.1, 0.1), "[0.7, 0.1, 0.1, 0.1]"),
        ((1.0, 0.0, 0.0), "[1.0, 0.0, 0.0]"),
        ((0.9, 0.2, -0.1), "-0.1"),
        ((0.7, 0.15, 0.1), "[0.7, 0.15, 0.1]"),
        ((0.7, float("nan"), 0.3), "nan"),
        (("a", 0.5, 0.5), "'a'"),
    ],
)
def test_validate_fractions_rejects(fractions: tuple[object, ...], shown: str) -> None:
    with pytest.raises(DatasetError) as error:
        validate_fractions(fractions)

    message = str(error.value)
    assert shown in message
    assert "data.splits=[0.7,0.15,0.15]" in message


def test_group_ids_do_not_depend_on_order(real_records: list[ImageRecord]) -> None:
    subset = real_records[:400]

    forward = dict(zip((r.relpath for r in subset), group_images(subset), strict=True))
    reverse = list(reversed(subset))
    backward = dict(zip((r.relpath for r in reverse), group_images(reverse), strict=True))

    assert forward == backward
    assert sorted(set(forward.values())) == list(range(len(set(forward.values()))))


def test_real_copies_share_group(real_records: list[ImageRecord]) -> None:
    groups = dict(zip((r.relpath for r in real_records), group_images(real_records), strict=True))

    assert groups["mask/0_0_0.jpg"] == groups["mask/0_0_0 copy 2.jpg"]
    assert groups["mask/0_0_0.jpg"] == groups["mask/0_0_0 copy 2 2.jpg"]
    assert groups["mask/0_0_0.jpg"] == groups["mask/0_0_0 copy 2.png"]
    assert groups["mask/0_0_0.jpg"] != groups["mask/0_0_1.jpg"]
    assert groups["no_mask/0_0_anhu_0004.jpg"] != groups["no_mask/0_0_anhu_0020.jpg"]
    # Byte-identical files with unrelated names.
    assert groups["mask/with_mask219.jpg"] == groups["mask/with_mask286.jpg"]


def test_real_split_is_stratified(real_records: list[ImageRecord]) -> None:
    splits = stratified_group_split(real_records, FRACTIONS, seed=42)
    manifest = build_manifest(Path("/data"), real_records, splits, group_images(real_records))

    counts = split_counts(manifest)

    for label in ("mask", "no_mask"):
        class_total = counts[label].sum()
        for split, target in zip(SPLIT_NAMES, FRACTIONS, strict=True):
            share = counts.loc[split, label] / class_total
            assert abs(share - target) < 0.01, (label, split, share)


def test_real_split_has_no_leaks(real_records: list[ImageRecord]) -> None:
    splits = stratified_group_split(real_records, FRACTIONS, seed=42)
    groups = group_images(real_records)
    stems = [(r.label, normalise_stem(r.relpath.rsplit("/", 1)[-1])) for r in real_records]

    assert _splits_by_key(real_records, splits, [r.sha256 for r in real_records]) == {}
    assert _splits_by_key(real_records, splits, stems) == {}
    assert _splits_by_key(real_records, splits, groups) == {}


def test_split_reproducible_for_seed(real_records: list[ImageRecord]) -> None:
    first = stratified_group_split(real_records, FRACTIONS, seed=42)
    second = stratified_group_split(real_records, FRACTIONS, seed=42)
    other = stratified_group_split(real_records, FRACTIONS, seed=7)

    assert first == second
    changed = sum(a != b for a, b in zip(first, other, strict=True))
    assert changed > len(real_records) // 10


def test_duplicates_land_in_one_split(tmp_path: Path) -> None:
    _write_class(tmp_path, "mask", [f"m{index}.png" for index in range(12)], first_seed=100)
    _write_class(tmp_path, "no_mask", [f"n{index}.png" for index in range(12)], first_seed=200)
    shutil.copyfile(tmp_path / "mask" / "m0.png", tmp_path / "mask" / "renamed.png")
    _write_class(tmp_path, "mask", ["x.png", "x copy 2.png", "X (1).png"], first_seed=300)
    records = scan_dataset(tmp_path, workers=1, progress=False).records
    relpaths = [record.relpath for record in records]

    groups = dict(zip(relpaths, group_images(records), strict=True))
    assert groups["mask/m0.png"] == groups["mask/renamed.png"]
    assert groups["mask/x.png"] == groups["mask/x copy 2.png"] == groups["mask/X (1).png"]
    assert len(set(groups.values())) == 12 + 12 + 1
    for seed in range(20):
        splits = dict(zip(relpaths, stratified_group_split(records, seed=seed), strict=True))
        assert splits["mask/m0.png"] == splits["mask/renamed.png"], seed
        assert splits["mask/x.png"] == splits["mask/x copy 2.png"] == splits["mask/X (1).png"]


def test_three_classes_split(tmp_path: Path) -> None:
    for offset, label in enumerate(("mask", "mask_incorrect", "no_mask")):
        _write_class(tmp_path, label, [f"{index}.png" for index in range(20)], offset * 100)
    records = scan_dataset(tmp_path, workers=1, progress=False).records

    splits = stratified_group_split(records, FRACTIONS, seed=0)
    counts = split_counts(build_manifest(tmp_path, records, splits, group_images(records)))

    assert list(counts.columns) == ["mask", "mask_incorrect", "no_mask", "total"]
    for label in ("mask", "mask_incorrect", "no_mask"):
        assert counts[label].tolist() == [14, 3, 3]


def test_class_with_two_groups_is_rejected(tmp_path: Path) -> None:
    _write_class(tmp_path, "mask", [f"{index}.png" for index in range(10)], first_seed=0)
    _write_class(tmp_path, "no_mask", ["a.png", "a copy.png", "b.png"], first_seed=50)
    records = scan_dataset(tmp_path, workers=1, progress=False).records

    with pytest.raises(DatasetError, match="'no_mask' has 2 distinct image groups"):
        stratified_group_split(records, FRACTIONS)


def test_group_with_mixed_labels_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _write_class(tmp_path, "mask", [f"{index}.png" for index in range(6)], first_seed=0)
    _write_class(tmp_path, "no_mask", [f"{index}.png" for index in range(6)], first_seed=50)
    shutil.copyfile(tmp_path / "mask" / "0.png", tmp_path / "no_mask" / "same.png")
    records = scan_dataset(tmp_path, workers=1, progress=False).records

    with caplog.at_level(logging.WARNING, logger="facemask.data.split"):
        splits = stratified_group_split(records, FRACTIONS)

    by_path = dict(zip((r.relpath for r in records), splits, strict=True))
    assert by_path["mask/0.png"] == by_path["no_mask/same.png"]
    messages = [record.getMessage() for record in caplog.records]
    assert any("different labels" in message and "same.png" in message for message in messages)


def test_manifest_columns_and_counts(real_records: list[ImageRecord]) -> None:
    groups = group_images(real_records)
    splits = stratified_group_split(real_records, FRACTIONS, seed=1)

    manifest = build_manifest(Path("/data"), real_records, splits, groups)
    counts = split_counts(manifest)

    assert list(manifest.columns) == [
        "path",
        "label",
        "sha256",
        "group",
        "split",
        "width",
        "height",
    ]
    assert manifest["path"].tolist() == [record.relpath for record in real_records]
    assert manifest.attrs["root"] == str(Path("/data"))
    assert list(counts.index) == list(SPLIT_NAMES)
    assert list(counts.columns) == ["mask", "no_mask", "total"]
    assert counts["total"].sum() == len(real_records)
    assert (counts["total"] == counts["mask"] + counts["no_mask"]).all()


def test_manifest_rejects_length_mismatch(real_records: list[ImageRecord]) -> None:
    with pytest.raises(ValueError, match="different lengths"):
        build_manifest(Path("/data"), real_records[:3], ["train"] * 2, [0, 1, 2])
