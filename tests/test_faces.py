"""The face stage on real photos, and training samples made of face crops."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from facemask.data.images import decode_image
from facemask.faces import FaceBox, FaceSearch, FaceStage, FaceStageSettings
from facemask.faces.pipeline import classify_faces, combine
from facemask.faces.stage import square_crop

# A street photo with several people, most in masks.
GROUP_PHOTO = "mask/with_mask293.jpg"


@pytest.fixture(scope="module")
def stage() -> FaceStage:
    return FaceStage()


def picture(root: Path, relative: str) -> np.ndarray:
    return np.asarray(decode_image(root / relative, draft_size=512).image)


def test_finds_several_faces_in_a_group_photo(stage, real_data_root):
    rgb = picture(real_data_root, GROUP_PHOTO)
    search = stage.search(rgb)
    assert search.faces >= 5
    assert not search.fallback
    height, width = rgb.shape[:2]
    for region in search.regions:
        x0, y0, x1, y1 = region.crop
        assert 0 <= x0 < x1 <= width
        assert 0 <= y0 < y1 <= height
        box = region.box
        # The crop contains the whole face box.
        assert x0 <= box.x0 + 1
        assert box.x1 - 1 <= x1
        assert y0 <= box.y0 + 1
        assert box.y1 - 1 <= y1


def test_tiles_find_faces_the_whole_frame_misses(real_data_root):
    rgb = picture(real_data_root, GROUP_PHOTO)
    plain = FaceStage(FaceStageSettings(tiles=1)).search(rgb)
    tiled = FaceStage(FaceStageSettings(tiles=2)).search(rgb)
    assert tiled.faces > plain.faces


def test_no_face_falls_back_to_the_whole_picture(stage):
    flat = np.full((240, 320, 3), 200, dtype=np.uint8)
    search = stage.search(flat)
    assert search.fallback
    assert search.faces == 0
    assert [r.crop for r in search.regions] == [(0, 0, 320, 240)]
    assert search.crops(flat)[0].shape == flat.shape


def test_border_retry_finds_frame_filling_face(stage, real_data_root):
    rgb = picture(real_data_root, GROUP_PHOTO)
    box = max(stage.search(rgb).regions, key=lambda r: r.box.area).box
    # The largest face, cut to its box and enlarged so that it fills a 256x256 frame.
    tight = cv2.resize(rgb[int(box.y0) : int(box.y1), int(box.x0) : int(box.x1)], (256, 256))
    without = FaceStage(FaceStageSettings(border_scale=1.0, tiles=1)).search(tight)
    with_retry = FaceStage(FaceStageSettings(tiles=1)).search(tight)
    assert with_retry.faces >= without.faces
    assert not with_retry.fallback


def test_search_round_trips_through_json(stage, real_data_root):
    search = stage.search(picture(real_data_root, GROUP_PHOTO))
    again = FaceSearch.from_dict(json.loads(json.dumps(search.to_dict())))
    assert again == search


def test_square_crop_is_clipped_to_the_picture():
    assert square_crop(FaceBox(0, 0, 10, 10, 1.0), 0.5, 100, 100) == (0, 0, 15, 15)
    assert square_crop(FaceBox(40, 40, 60, 60, 1.0), 0.25, 100, 100) == (35, 35, 65, 65)


def test_settings_reject_bad_values():
    with pytest.raises(ValueError, match="tiles"):
        FaceStageSettings(tiles=0)
    with pytest.raises(ValueError, match="unknown face stage keys"):
        FaceStageSettings.from_dict({"margin": 0.2, "colour": "red"})
    with pytest.raises(ValueError, match="unknown face detector"):
        FaceStage(FaceStageSettings(detector="nope"))


def test_one_unmasked_face_makes_the_picture_unmasked():
    faces = [{"mask": 0.9, "no_mask": 0.1}, {"mask": 0.2, "no_mask": 0.8}]
    assert combine(faces, ["mask", "no_mask"]) == pytest.approx({"mask": 0.2, "no_mask": 0.8})
    assert combine(faces[:1], ["mask", "no_mask"]) == faces[0]


def test_classify_faces_classifies_each_face(stage, real_data_root):
    rgb = picture(real_data_root, GROUP_PHOTO)
    seen = []

    def prepare(crop: np.ndarray) -> np.ndarray:
        seen.append(crop.shape)
        return np.zeros((3, 8, 8), np.float32)

    def infer(batch: np.ndarray) -> np.ndarray:
        # The first face unmasked, the others masked.
        out = np.tile([0.9, 0.1], (len(batch), 1))
        out[0] = [0.3, 0.7]
        return out

    result = classify_faces(rgb, stage, prepare, infer, ["mask", "no_mask"])
    assert len(result.faces) == len(seen) >= 5
    assert result.label == "no_mask"
    counts = result.counts(["mask", "no_mask"])
    assert counts == {"mask": len(seen) - 1, "no_mask": 1}
    whole = classify_faces(rgb, None, prepare, infer, ["mask", "no_mask"])
    assert whole.fallback and len(whole.faces) == 1


@pytest.fixture(scope="module")
def face_data(real_data_root, tmp_path_factory) -> Path:
    """Twelve photos per class and the group photo."""
    import shutil

    from tests.helpers import copy_real_subset

    root = copy_real_subset(real_data_root, tmp_path_factory.mktemp("face-data"), 12)
    shutil.copy2(real_data_root / GROUP_PHOTO, root / GROUP_PHOTO)
    return root


def face_datamodule(root: Path, cache_dir: Path):
    from facemask.data.datamodule import FaceMaskDataModule

    datamodule = FaceMaskDataModule(
        root, image_size=64, batch_size=4, num_workers=0, cache_dir=cache_dir, faces=True
    )
    datamodule.setup("fit")
    return datamodule


def test_face_crops_split_by_photo(face_data, tmp_path, monkeypatch):
    datamodule = face_datamodule(face_data, tmp_path / "cache")
    manifest = datamodule.manifest
    split_of = dict(zip(manifest["sha256"], manifest["split"], strict=True))
    total = 0
    for split, dataset in datamodule.datasets.items():
        shas = {key.rsplit("-", 1)[0] for key in dataset.sha256s}
        assert {split_of[sha] for sha in shas} <= {split}
        summary = datamodule.face_summary[split]
        assert len(dataset) == summary.samples
        assert summary.samples == summary.faces + summary.fallback_images
        assert summary.images == (manifest["split"] == split).sum()
        total += summary.faces
        image, label = dataset[0]
        assert tuple(image.shape) == (3, 64, 64)
    group = manifest[manifest["path"] == GROUP_PHOTO].iloc[0]
    assert group["faces"] >= 5
    assert total == manifest["faces"].sum()
    # A second setup reads the cached searches and crops without running the detector.
    import facemask.data.face_crops as face_crops

    def no_detector(*args, **kwargs):
        raise AssertionError("the detector ran although every image was cached")

    monkeypatch.setattr(face_crops, "FaceStage", no_detector)
    again = face_datamodule(face_data, tmp_path / "cache")
    assert list(again.datasets["train"].sha256s) == list(datamodule.datasets["train"].sha256s)


def test_largest_face_only(face_data, tmp_path):
    from facemask.data.datamodule import FaceMaskDataModule

    datamodule = FaceMaskDataModule(
        face_data,
        image_size=64,
        num_workers=0,
        cache_dir=tmp_path / "cache",
        faces=True,
        face_samples="largest",
    )
    datamodule.setup("fit")
    for split, dataset in datamodule.datasets.items():
        assert len(dataset) == datamodule.face_summary[split].images
    group = datamodule.manifest[datamodule.manifest["path"] == GROUP_PHOTO].iloc[0]
    split = datamodule.datasets[group["split"]]
    keys = [key for key in split.sha256s if key.startswith(group["sha256"])]
    assert len(keys) == 1


def test_faces_need_a_cache_folder(face_data):
    from facemask.data.datamodule import FaceMaskDataModule

    with pytest.raises(ValueError, match="cache_dir"):
        FaceMaskDataModule(face_data, faces=True, cache_dir=None)


def test_face_training_stores_stage(face_data, tmp_path):
    import mlflow

    from facemask.training import train
    from tests.helpers import compose_train_config, small_training_overrides

    store = tmp_path / "store"
    overrides = small_training_overrides(
        face_data, store, tmp_path / "run", "data.faces=true", "data.face_stage.margin=0.3"
    )
    result = train(compose_train_config(overrides))
    info = mlflow.models.get_model_info(result.registration.model_uri)
    assert info.metadata["face_stage"]["margin"] == 0.3
    client = mlflow.MlflowClient(result.tracking_uri)
    metrics = client.get_run(result.run_id).data.metrics
    assert metrics["faces/train/faces"] + metrics["faces/val/faces"] >= 5
    assert "faces/test/fallback_images" in metrics

    # facemask evaluate classifies the faces of each photo with the stored stage.
    from facemask.data.scan import scan_dataset
    from facemask.evaluation import predict_dataset
    from facemask.serving.model_store import load_model_bundle

    bundle = load_model_bundle(result.registration.model_uri, result.tracking_uri)
    assert bundle.face_stage.margin == 0.3
    scan = scan_dataset(face_data)
    by_faces = predict_dataset(bundle, scan, batch_size=8)
    whole = predict_dataset(bundle, scan, batch_size=8, faces=False)
    group = [r.relpath for r in by_faces.records].index(GROUP_PHOTO)
    assert by_faces.probs.shape == whole.probs.shape
    assert not np.allclose(by_faces.probs[group], whole.probs[group])
