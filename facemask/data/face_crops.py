"""Face crops as training samples: detected once per image and cached with the decoded pixels.

With `data.faces=true` every image of the dataset goes through the face stage
(`facemask.faces.stage.FaceStage`) once, on the picture that serving decodes
(`FaceStageSettings.draft_size`). Each face becomes one sample with its image's label; an image
without a detected face becomes one sample of the whole picture, as serving does. The split is
made on images before this, so the crops of one photo stay in one split.

Layout under the cache folder, next to the decoded-image cache:

    CACHE_DIR/faces/<digest>/search/<sha256[:2]>/<sha256>.json      regions found in the image
    CACHE_DIR/faces/<digest>/<kind>-<image_size>/<key[:2]>/<key>.rgb  one crop, key = <sha256>-<i>

`<digest>` covers the face stage settings and rule version, the image size, the decode settings
and the library versions, so other settings never read these entries. Crops are written before
the search file, and the search file is renamed into place last, so an interrupted preparation
leaves no image half done: the next run redoes the images without a search file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from facemask.data.image_cache import (
    CorruptEntryError,
    read_entry,
    settings_digest,
    train_cache_side,
    write_entry,
)
from facemask.data.images import InvalidImageError, decode_image
from facemask.data.transforms import Preprocessing, build_eval_resize
from facemask.faces.stage import STAGE_RULE_VERSION, FaceSearch, FaceStage, FaceStageSettings

log = logging.getLogger(__name__)

KINDS = ("train", "eval")


@dataclass(frozen=True)
class FaceSummary:
    """Face counts of a set of images.

    Attributes:
        images: Images searched.
        faces: Faces found in them.
        fallback_images: Images without a detected face, used whole.
        multi_face_images: Images with more than one face.
        samples: Training or evaluation samples made of them (faces and whole images).
    """

    images: int
    faces: int
    fallback_images: int
    multi_face_images: int
    samples: int

    @classmethod
    def of(cls, searches: Sequence[FaceSearch], samples: int) -> FaceSummary:
        return cls(
            images=len(searches),
            faces=sum(s.faces for s in searches),
            fallback_images=sum(s.fallback for s in searches),
            multi_face_images=sum(s.faces > 1 for s in searches),
            samples=samples,
        )


def downscale_for_training(pixels: np.ndarray, image_size: int) -> np.ndarray:
    """Downscale a crop so that its shorter side is at most `train_cache_side(image_size)`."""
    import cv2

    side = train_cache_side(image_size)
    height, width = pixels.shape[:2]
    shorter = min(height, width)
    if shorter <= side:
        return np.ascontiguousarray(pixels)
    scale = side / shorter
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)


class FaceCropCache:
    """Search images for faces once and keep their crops, ready for both training and evaluation.

    Args:
        cache_dir: Root of the cache; entries go under `cache_dir/faces`.
        pre: The evaluation preprocessing (image size, JPEG draft mode).
        settings: The face stage settings.
    """

    def __init__(self, cache_dir: Path, pre: Preprocessing, settings: FaceStageSettings):
        self.pre = pre
        self.settings = settings
        self.draft_size = settings.draft_size(pre.image_size, pre.jpeg_draft)
        key = json.dumps(
            {
                "images": settings_digest(pre),
                "image_size": pre.image_size,
                "stage_rule": STAGE_RULE_VERSION,
                "faces": settings.to_dict(),
                "draft_size": self.draft_size,
                "mediapipe": _version("mediapipe"),
            },
            sort_keys=True,
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        self.cache_dir = Path(cache_dir).expanduser()
        self.root = self.cache_dir / "faces" / digest
        self._stage: FaceStage | None = None

    def search_path(self, sha256: str) -> Path:
        return self.root / "search" / sha256[:2] / f"{sha256}.json"

    def crop_folder(self, kind: str) -> Path:
        return self.root / f"{kind}-{self.pre.image_size}"

    def crop_path(self, kind: str, key: str) -> Path:
        return self.crop_folder(kind) / key[:2] / f"{key}.rgb"

    @property
    def stage(self) -> FaceStage:
        if self._stage is None:
            self._stage = FaceStage(self.settings)
        return self._stage

    def prepare(self, paths: Sequence[Path], sha256s: Sequence[str]) -> dict[str, FaceSearch]:
        """Return the face search of every image, searching and cropping those not cached yet.

        Raises:
            InvalidImageError: An image fails to decode (the dataset scan already skips those).
        """
        searches: dict[str, FaceSearch] = {}
        todo = []
        for path, sha in zip(paths, sha256s, strict=True):
            cached = self._read_search(sha)
            if cached is None:
                todo.append((Path(path), sha))
            else:
                searches[sha] = cached
        if todo:
            log.info(
                "Finding faces in %d images (%d already cached under %s)",
                len(todo),
                len(searches),
                self.root,
            )
            searches.update(self._search_in_subprocesses(todo))
        return searches

    def _search_in_subprocesses(self, todo: list[tuple[Path, str]]) -> dict[str, FaceSearch]:
        """Search and store `todo` in spawned processes, never in this one.

        MediaPipe starts threads. A process that forks DataLoader workers after that can leave
        a worker waiting forever on a lock that a thread held at the fork, so the detector runs
        only in processes that are started fresh and fork nothing.
        """
        workers = max(1, min(len(os.sched_getaffinity(0)), 4, len(todo) // 50 or 1))
        chunk = max(1, min(64, len(todo) // (workers * 4) or 1))
        found: dict[str, FaceSearch] = {}
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            results = pool.map(
                _search_one,
                [(self.cache_dir, self.pre, self.settings, path, sha) for path, sha in todo],
                chunksize=chunk,
            )
            progress = tqdm(results, total=len(todo), desc="Finding faces", unit="img")
            for (_, sha), search in zip(todo, progress, strict=True):
                found[sha] = FaceSearch.from_dict(search)
        return found

    def _read_search(self, sha256: str) -> FaceSearch | None:
        path = self.search_path(sha256)
        try:
            return FaceSearch.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("Ignoring unreadable face search %s (%s)", path, exc)
            return None

    def _search_and_store(self, path: Path, sha256: str) -> FaceSearch:
        try:
            picture = np.asarray(decode_image(path, draft_size=self.draft_size).image)
        except InvalidImageError as exc:
            raise InvalidImageError(f"{path}: {exc}") from exc
        search = self.stage.search(picture)
        resize = build_eval_resize(self.pre)
        for index, crop in enumerate(search.crops(picture)):
            key = f"{sha256}-{index}"
            write_entry(
                self.crop_path("train", key), downscale_for_training(crop, self.pre.image_size)
            )
            write_entry(
                self.crop_path("eval", key), resize(image=np.ascontiguousarray(crop))["image"]
            )
        _write_json(self.search_path(sha256), search.to_dict())
        return search

    def loader(self, kind: str) -> FaceCropLoader:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; use one of {KINDS}")
        return FaceCropLoader(self.crop_folder(kind))


_WORKER_CACHES: dict[tuple, FaceCropCache] = {}


def _search_one(args: tuple[Path, Preprocessing, FaceStageSettings, Path, str]) -> dict:
    """Search one image in a worker process and return the search as a dictionary."""
    cache_dir, pre, settings, path, sha256 = args
    key = (cache_dir, pre, settings)
    cache = _WORKER_CACHES.get(key)
    if cache is None:
        cache = _WORKER_CACHES[key] = FaceCropCache(cache_dir, pre, settings)
    return cache._search_and_store(path, sha256).to_dict()


class FaceCropLoader:
    """Load cached face crops by key (`<sha256>-<index>`); the `ImageFolderDataset` loader."""

    def __init__(self, folder: Path):
        self.folder = folder

    def load(self, path: Path, key: str) -> np.ndarray:
        entry = self.folder / key[:2] / f"{key}.rgb"
        try:
            pixels = read_entry(entry)
        except CorruptEntryError as exc:
            raise RuntimeError(
                f"face crop cache entry {entry} of {path} is corrupt ({exc}); delete "
                f"{self.folder.parent} and start again to rebuild it"
            ) from exc
        if pixels is None:
            raise RuntimeError(
                f"face crop cache entry {entry} of {path} is missing; delete "
                f"{self.folder.parent} and start again to rebuild it"
            )
        return pixels


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(data, file)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "missing"
