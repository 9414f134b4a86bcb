"""The LightningDataModule: scan a class-folder dataset, split it and serve batches."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from facemask.data.images import decode_image
from facemask.data.scan import ScanResult, SkippedFile, scan_dataset
from facemask.data.split import (
    SPLIT_NAMES,
    build_manifest,
    group_images,
    split_counts,
    stratified_group_split,
    validate_fractions,
)
from facemask.data.transforms import (
    Augmentation,
    Preprocessing,
    build_eval_transform,
    build_train_transform,
    image_to_tensor,
)

log = logging.getLogger(__name__)


class ImageFolderDataset(Dataset):
    """Images with integer labels, decoded and transformed on access."""

    def __init__(
        self, paths: Sequence[Path], labels: Sequence[int], transform: Any, draft_size: int | None
    ):
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = list(paths)
        self.labels = list(labels)
        self.transform = transform
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = decode_image(self.paths[index], draft_size=self.draft_size).image
        return image_to_tensor(image, self.transform), self.labels[index]


def default_num_workers() -> int:
    """Return a DataLoader worker count that leaves one core to the training loop."""
    return max(1, min(8, (os.cpu_count() or 1) - 1))


class FaceMaskDataModule(L.LightningDataModule):
    """Stratified, duplicate-aware train/val/test split of a folder with one sub-folder per class.

    Args:
        root: Dataset folder with one sub-folder per class.
        image_size: Side of the square model input in pixels.
        batch_size: Images per batch.
        num_workers: DataLoader worker processes; None picks one less than the CPU count.
        splits: Train, validation and test fractions; they must add up to 1.
        seed: Seed of the split and of the shuffling.
        augment: Keyword arguments of `facemask.data.transforms.Augmentation`.
        jpeg_draft: Decode JPEG files at reduced scale (see `Preprocessing.jpeg_draft`).
        cache_dir: Folder for the scan cache; None disables caching.
        pin_memory: Pin batches in page-locked memory (useful on GPUs).
        download: Fetch the public dataset into `root` when it contains no images.
        download_url: Archive to fetch instead of the public dataset's; None uses the default.
        download_dir: Folder that keeps downloaded archives; None uses `data/downloads`.
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int = 224,
        batch_size: int = 32,
        num_workers: int | None = None,
        splits: Sequence[float] = (0.7, 0.15, 0.15),
        seed: int = 42,
        augment: dict[str, Any] | None = None,
        jpeg_draft: bool = True,
        cache_dir: str | Path | None = None,
        pin_memory: bool = False,
        download: bool = False,
        download_url: str | None = None,
        download_dir: str | Path | None = None,
    ):
        super().__init__()
        self.root = Path(root).expanduser().resolve()
        self.fractions = validate_fractions(splits)
        self.preprocessing = Preprocessing(image_size=image_size, jpeg_draft=jpeg_draft)
        self.augmentation = Augmentation(**(augment or {}))
        self.batch_size = batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.seed = seed
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.pin_memory = pin_memory
        self.download = download
        self.download_url = download_url
        self.download_dir = Path(download_dir) if download_dir else None
        self.scan: ScanResult | None = None
        self.manifest: pd.DataFrame | None = None
        self.datasets: dict[str, ImageFolderDataset] = {}

    def prepare_data(self) -> None:
        if self.download:
            from facemask.data.download import DEFAULT_URL, ensure_dataset

            ensure_dataset(
                self.root, url=self.download_url or DEFAULT_URL, cache_dir=self.download_dir
            )

    def setup(self, stage: str | None = None) -> None:
        if self.manifest is not None:
            return
        self.scan = scan_dataset(self.root, cache_dir=self.cache_dir)
        records = self.scan.records
        groups = group_images(records)
        splits = stratified_group_split(records, self.fractions, seed=self.seed)
        self.manifest = build_manifest(self.root, records, splits, groups)
        label_index = {name: i for i, name in enumerate(self.classes)}
        train_tf = build_train_transform(self.preprocessing, self.augmentation)
        eval_tf = build_eval_transform(self.preprocessing)
        for split in SPLIT_NAMES:
            rows = self.manifest[self.manifest["split"] == split]
            self.datasets[split] = ImageFolderDataset(
                [self.root / p for p in rows["path"]],
                [label_index[label] for label in rows["label"]],
                train_tf if split == "train" else eval_tf,
                self.preprocessing.draft_size,
            )
        log.info("Split of %s (seed %d):\n%s", self.root, self.seed, self.counts.to_string())

    @property
    def classes(self) -> list[str]:
        """Class names, sorted; index i is the model's output i."""
        return self._require_scan().classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def skipped(self) -> list[SkippedFile]:
        """Files found in the class folders that could not be decoded."""
        return self._require_scan().skipped

    @property
    def counts(self) -> pd.DataFrame:
        """Images per split and class."""
        if self.manifest is None:
            raise RuntimeError("call setup() first")
        return split_counts(self.manifest)

    def split_paths(self, split: str) -> list[Path]:
        """Return the image paths of one split, in the order its DataLoader yields them."""
        return list(self.datasets[split].paths)

    def _require_scan(self) -> ScanResult:
        if self.scan is None:
            raise RuntimeError("call setup() first")
        return self.scan

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
