"""The LightningDataModule: scan a class-folder dataset, split it and serve batches."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from torch.utils.data import DataLoader, Dataset

from facemask.data.face_crops import FaceCropCache, FaceCropLoader, FaceSummary
from facemask.data.image_cache import FileDecoder, ImageCache
from facemask.data.loader_settings import (
    LoaderSettings,
    local_process_count,
    resolve_loader_settings,
)
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
    Framing,
    Preprocessing,
    build_eval_transform,
    build_train_transform,
)
from facemask.faces.stage import FaceSearch, FaceStageSettings

log = logging.getLogger(__name__)


ImageLoader = ImageCache | FileDecoder | FaceCropLoader

FACE_SAMPLES = ("all", "largest")


class ImageFolderDataset(Dataset):
    """Images with integer labels, loaded through `image_loader` and transformed on access.

    Args:
        paths: Image files.
        labels: Class index of each file.
        sha256s: The key of each sample in `image_loader`: the hex SHA-256 of the file from the
            dataset scan, or `<sha256>-<i>` for face `i` of the file with a `FaceCropLoader`.
        transform: An albumentations transform from HWC uint8 pixels to a CHW float tensor.
        image_loader: An `ImageCache`, or a `FileDecoder` that decodes on every access.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int],
        sha256s: Sequence[str],
        transform: Any,
        image_loader: ImageLoader,
    ):
        if not len(paths) == len(labels) == len(sha256s):
            raise ValueError(
                f"{len(paths)} paths, {len(labels)} labels and {len(sha256s)} hashes. "
                "Pass one label and one hash per path."
            )
        self.paths = list(paths)
        self.labels = list(labels)
        self.sha256s = list(sha256s)
        self.transform = transform
        self.image_loader = image_loader
        self._prepared_pid: int | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        self._prepare_process()
        pixels = self.image_loader.load(self.paths[index], self.sha256s[index])
        return self.transform(image=np.asarray(pixels))["image"], self.labels[index]

    def _prepare_process(self) -> None:
        """Seed the transform and limit OpenCV's threads once in each process that loads images.

        Forked DataLoader workers inherit one albumentations random generator, so without a
        new seed every worker would draw the same augmentations. torch gives each worker its own
        initial seed (a base seed drawn from the global generator, plus the worker id), so
        `seed_everything` makes the augmentations reproducible.
        """
        pid = os.getpid()
        if self._prepared_pid == pid:
            return
        self._prepared_pid = pid
        self.transform.set_random_seed(torch.initial_seed() % 2**32)
        if torch.utils.data.get_worker_info() is not None:
            # Workers run in parallel with the training step, which already uses every core.
            cv2.setNumThreads(1)


class FaceMaskDataModule(L.LightningDataModule):
    """Stratified, duplicate-aware train/val/test split of a folder with one sub-folder per class.

    Args:
        root: Dataset folder with one sub-folder per class.
        image_size: Side of the square model input in pixels.
        batch_size: Images per batch.
        num_workers: DataLoader workers per training process; None uses this process's share
            of the CPUs minus one (see `facemask.data.loader_settings.default_num_workers`).
        splits: Train, validation and test fractions; they must add up to 1.
        seed: Seed of the split and of the shuffling.
        augment: Keyword arguments of `facemask.data.transforms.Augmentation`.
        jpeg_draft: Decode JPEG files at reduced scale (see `Preprocessing.jpeg_draft`).
        cache_dir: Folder for the scan cache and the decoded-image cache; None disables both.
        pin_memory: Pin batches in page-locked memory; None pins when training on CUDA.
        download: Fetch the public dataset into `root` when it contains no images.
        download_url: Archive to fetch instead of the public dataset's; None uses the default.
        download_dir: Folder that keeps downloaded archives; None uses `data/downloads`.
        image_cache: Keep decoded, downscaled images under `cache_dir/images`, so that each
            file is decoded once (see `facemask.data.image_cache`).
        persistent_workers: Keep the workers between epochs; None keeps them when there are any.
        prefetch_factor: Batches loaded ahead by each worker; None keeps at least 4 in flight.
        framing: Keyword arguments of `facemask.data.transforms.Framing`, the augmentations
            against framing shortcuts.
        faces: Train and test on the faces that the face stage finds in each image, one sample
            per face, the whole image when none is found (see `facemask.data.face_crops`).
            Needs `cache_dir`.
        face_stage: Keyword arguments of `facemask.faces.stage.FaceStageSettings`.
        face_samples: `all` makes every detected face a sample with its image's label;
            `largest` keeps only the largest face of each image, because the label of a photo
            describes its main subject and people in the background may differ.
        ood_root: A class-folder dataset from another source, evaluated at the end of training
            and never trained on; None skips that check.
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
        pin_memory: bool | None = None,
        download: bool = False,
        download_url: str | None = None,
        download_dir: str | Path | None = None,
        image_cache: bool = True,
        persistent_workers: bool | None = None,
        prefetch_factor: int | None = None,
        framing: dict[str, Any] | None = None,
        faces: bool = False,
        face_stage: dict[str, Any] | None = None,
        face_samples: str = "all",
        ood_root: str | Path | None = None,
    ):
        super().__init__()
        self.root = Path(root).expanduser().resolve()
        self.fractions = validate_fractions(splits)
        self.preprocessing = Preprocessing(image_size=image_size, jpeg_draft=jpeg_draft)
        self.augmentation = Augmentation(**(augment or {}))
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.persistent_workers = persistent_workers
        self.prefetch_factor = prefetch_factor
        self.seed = seed
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.image_cache = image_cache
        self.pin_memory = pin_memory
        self.download = download
        self.download_url = download_url
        self.download_dir = Path(download_dir) if download_dir else None
        self.scan: ScanResult | None = None
        self.manifest: pd.DataFrame | None = None
        self.datasets: dict[str, ImageFolderDataset] = {}
        self.framing = Framing(**(framing or {}))
        self.faces = faces
        self.face_stage_settings = FaceStageSettings(**(face_stage or {})) if faces else None
        if faces and cache_dir is None:
            raise ValueError(
                "data.faces=true keeps the face crops under data.cache_dir; set data.cache_dir"
            )
        if face_samples not in FACE_SAMPLES:
            raise ValueError(
                f"data.face_samples must be one of {FACE_SAMPLES}, got {face_samples!r}"
            )
        self.face_samples = face_samples
        self.ood_root = Path(ood_root).expanduser().resolve() if ood_root else None
        self.face_summary: dict[str, FaceSummary] = {}
        # Invalid DataLoader settings fail here, before a training run starts.
        self.loader_settings()

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
        if self.face_stage_settings is not None:
            self._setup_faces(label_index)
        else:
            for split in SPLIT_NAMES:
                rows = self.manifest[self.manifest["split"] == split]
                kind = "train" if split == "train" else "eval"
                self.datasets[split] = ImageFolderDataset(
                    [self.root / p for p in rows["path"]],
                    [label_index[label] for label in rows["label"]],
                    list(rows["sha256"]),
                    self._transform(kind),
                    self.image_loader(kind),
                )
        log.info("Split of %s (seed %d):\n%s", self.root, self.seed, self.counts.to_string())
        if self.face_stage_settings is not None:
            log.info("Face crops are cached under %s", self.cache_dir / "faces")
        elif self.uses_image_cache:
            log.info("Decoded images are cached under %s", self.cache_dir / "images")

    def _setup_faces(self, label_index: dict[str, int]) -> None:
        """Build datasets of face crops, one sample per face, split by source image."""
        cache = FaceCropCache(self.cache_dir, self.preprocessing, self.face_stage_settings)
        manifest = self.manifest
        searches = cache.prepare(
            [self.root / p for p in manifest["path"]], list(manifest["sha256"])
        )
        manifest["faces"] = [searches[sha].faces for sha in manifest["sha256"]]
        for split in SPLIT_NAMES:
            rows = manifest[manifest["split"] == split]
            paths, labels, keys = [], [], []
            for path, label, sha in zip(rows["path"], rows["label"], rows["sha256"], strict=True):
                for index in self._sample_regions(searches[sha]):
                    paths.append(self.root / path)
                    labels.append(label_index[label])
                    keys.append(f"{sha}-{index}")
            kind = "train" if split == "train" else "eval"
            self.datasets[split] = ImageFolderDataset(
                paths, labels, keys, self._transform(kind), cache.loader(kind)
            )
            summary = FaceSummary.of([searches[sha] for sha in rows["sha256"]], len(paths))
            self.face_summary[split] = summary
            log.info(
                "%s: %d images, %d faces, %d images with several faces, %d without a face "
                "(used whole); %d samples (face_samples=%s)",
                split,
                summary.images,
                summary.faces,
                summary.multi_face_images,
                summary.fallback_images,
                summary.samples,
                self.face_samples,
            )

    def _sample_regions(self, search: FaceSearch) -> list[int]:
        """Return the indices of the regions of one image that become samples."""
        if self.face_samples == "largest":
            areas = [region.box.area for region in search.regions]
            return [int(np.argmax(areas))]
        return list(range(len(search.regions)))

    def split_images(self, split: str) -> tuple[list[Path], list[int]]:
        """Return the source images of one split and their class indices, one entry per image."""
        if self.manifest is None:
            raise RuntimeError("call setup() first")
        rows = self.manifest[self.manifest["split"] == split]
        label_index = {name: i for i, name in enumerate(self.classes)}
        return [self.root / p for p in rows["path"]], [label_index[x] for x in rows["label"]]

    @property
    def uses_image_cache(self) -> bool:
        """Whether the datasets load through the decoded-image cache."""
        return self.image_cache and self.cache_dir is not None

    def image_loader(self, kind: str) -> ImageLoader:
        """Return the image loader of `train` or `eval` datasets."""
        if self.uses_image_cache:
            return ImageCache(self.cache_dir, self.preprocessing, kind)
        return FileDecoder(self.preprocessing)

    def _transform(self, kind: str) -> Any:
        if kind == "train":
            return build_train_transform(self.preprocessing, self.augmentation, self.framing)
        return build_eval_transform(self.preprocessing)

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
        """Return the image path of each sample of one split, in DataLoader order.

        With `faces`, an image with several faces appears once per face.
        """
        return list(self.datasets[split].paths)

    def _require_scan(self) -> ScanResult:
        if self.scan is None:
            raise RuntimeError("call setup() first")
        return self.scan

    def loader_settings(self) -> LoaderSettings:
        """Resolve the DataLoader settings for the attached Trainer, or for one process without."""
        trainer = self.trainer
        return resolve_loader_settings(
            num_workers=self.num_workers,
            persistent_workers=self.persistent_workers,
            prefetch_factor=self.prefetch_factor,
            pin_memory=self.pin_memory,
            local_processes=local_process_count(trainer.num_devices if trainer else None),
            on_cuda=trainer is not None and isinstance(trainer.accelerator, CUDAAccelerator),
        )

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        settings = self.loader_settings()
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=settings.num_workers,
            persistent_workers=settings.persistent_workers,
            prefetch_factor=settings.prefetch_factor,
            pin_memory=settings.pin_memory,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
