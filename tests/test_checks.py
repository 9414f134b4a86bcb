"""End-of-training checks on real photos with a small untrained model and a real MLflow store."""

from __future__ import annotations

import csv
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
import timm
import torch
from omegaconf import OmegaConf
from PIL import Image

from facemask.checks import (
    CheckError,
    CheckSettings,
    PictureClassifier,
    face_crop,
    list_ood_files,
    run_checks,
    zoom_out,
)
from facemask.checks.framing import frame_picture
from facemask.checks.gradcam import box_coverage, find_cam_layer, in_box_share, sample_pictures
from facemask.checks.pictures import top_face
from facemask.data.transforms import Preprocessing
from facemask.faces import FaceStage, FaceStageSettings
from facemask.faces.pipeline import classify_faces
from facemask.models.classifier import FaceMaskClassifier
from facemask.settings import project_root

CLASSES = ["mask", "no_mask"]
IMAGE_SIZE = 64
TEST_PER_CLASS = 10
OOD_PER_CLASS = 4
CAM_PER_CLASS = 2


@dataclass(frozen=True)
class CheckRun:
    client: mlflow.MlflowClient
    run_id: str
    metrics: dict[str, float]
    output_dir: Path
    ood_images: int


def spread_files(folder: Path, count: int) -> list[Path]:
    """Return `count` files of `folder` spread over its sorted listing, which mixes sources."""
    files = sorted(folder.iterdir())
    return files[:: max(1, len(files) // count)][:count]


def new_run(tmp: Path) -> tuple[mlflow.MlflowClient, str]:
    client = mlflow.MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    experiment = client.create_experiment("checks", artifact_location=str(tmp / "artifacts"))
    return client, client.create_run(experiment).info.run_id


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    classifier = FaceMaskClassifier(name="resnet18", class_names=CLASSES, pretrained=False)
    return classifier.probability_model().eval()


@pytest.fixture(scope="module")
def test_pictures(real_data_root: Path) -> tuple[list[Path], list[int]]:
    paths: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(CLASSES):
        chosen = spread_files(real_data_root / name, TEST_PER_CLASS)
        paths.extend(chosen)
        labels.extend([index] * len(chosen))
    return paths, labels


@pytest.fixture(scope="module")
def ood_folder(tmp_path_factory, real_ood_root: Path, broken_image_files) -> Path:
    """A few OOD photos per class and one undecodable file, in a temporary folder."""
    root = tmp_path_factory.mktemp("ood")
    for name in CLASSES:
        (root / name).mkdir()
        for path in spread_files(real_ood_root / name, OOD_PER_CLASS):
            shutil.copy2(path, root / name / path.name)
    (root / "mask" / "truncated.jpg").write_bytes(broken_image_files["truncated.jpg"])
    (root / "manifest.csv").write_text("path,label\n")
    return root


@pytest.fixture(scope="module")
def face_stage_run(tmp_path_factory, model, test_pictures, ood_folder) -> CheckRun:
    """All checks once, for a model of face crops (about 10 s on two cores)."""
    tmp = tmp_path_factory.mktemp("face-stage-run")
    client, run_id = new_run(tmp)
    paths, labels = test_pictures
    metrics = run_checks(
        client=client,
        run_id=run_id,
        model=model,
        class_names=CLASSES,
        preprocessing=Preprocessing(image_size=IMAGE_SIZE),
        face_stage=FaceStageSettings(),
        test_paths=paths,
        test_labels=labels,
        ood_root=ood_folder,
        output_dir=tmp / "output",
        settings={"cam_per_class": CAM_PER_CLASS},
    )
    return CheckRun(client, run_id, metrics, tmp / "output", OOD_PER_CLASS * len(CLASSES))


def test_checks_return_and_log_metrics(face_stage_run):
    metrics = face_stage_run.metrics
    shares = [
        "ood/acc",
        "ood/balanced_acc",
        "ood/recall_mask",
        "ood/recall_no_mask",
        "ood/fallback_rate",
        "framing/as_is_acc",
        "framing/face_crop_acc",
        "framing/zoom_out_acc",
        "framing/max_gap",
        "framing/fallback_rate",
        "cam/in_face_share",
        "cam/face_area_share",
    ]
    for key in shares:
        assert key in metrics, key
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics[key])
    accuracies = [metrics[f"framing/{name}_acc"] for name in ("as_is", "face_crop", "zoom_out")]
    assert metrics["framing/max_gap"] == pytest.approx(max(accuracies) - min(accuracies))
    assert metrics["framing/images"] == 2 * TEST_PER_CLASS
    assert metrics["cam/pictures"] == 2 * CAM_PER_CLASS
    logged = face_stage_run.client.get_run(face_stage_run.run_id).data.metrics
    assert logged == pytest.approx(metrics)


def test_ood_counts_and_skips_undecodable_file(face_stage_run):
    metrics = face_stage_run.metrics
    assert metrics["ood/images"] == face_stage_run.ood_images
    assert metrics["ood/skipped"] == 1
    folder = face_stage_run.output_dir / "checks" / "ood"
    with (folder / "skipped.csv").open() as handle:
        skipped = list(csv.DictReader(handle))
    assert [Path(row["path"]).name for row in skipped] == ["truncated.jpg"]
    with (folder / "pictures.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == face_stage_run.ood_images
    assert set(rows[0]) == {"path", "label", "predicted", "prob_mask", "prob_no_mask", "faces"}
    for row in rows:
        assert float(row["prob_mask"]) + float(row["prob_no_mask"]) == pytest.approx(1.0)


def test_checks_log_artifacts(face_stage_run, tmp_path):
    client = face_stage_run.client
    run_id = face_stage_run.run_id
    listed = {
        item.path
        for folder in ("ood", "framing", "gradcam")
        for item in client.list_artifacts(run_id, folder)
    }
    expected = {
        "ood/confusion_matrix.png",
        "ood/pictures.csv",
        "ood/skipped.csv",
        "framing/pictures.csv",
        "gradcam/grid.png",
        "gradcam/samples.csv",
    }
    assert expected <= listed
    grid = client.download_artifacts(run_id, "gradcam/grid.png", str(tmp_path))
    with Image.open(grid) as image:
        image.load()
        assert image.format == "PNG"
        assert image.width > 200
        assert image.height > 200


def test_whole_picture_model_checks(tmp_path, model, test_pictures, broken_image_files, caplog):
    client, run_id = new_run(tmp_path)
    paths, labels = test_pictures
    broken = tmp_path / "text.jpg"
    broken.write_bytes(broken_image_files["text.jpg"])
    caplog.set_level(logging.INFO, logger="facemask.checks")
    metrics = run_checks(
        client=client,
        run_id=run_id,
        model=model,
        class_names=CLASSES,
        preprocessing=Preprocessing(image_size=IMAGE_SIZE),
        face_stage=None,
        test_paths=[*paths[:3], broken, *paths[-3:]],
        test_labels=[*labels[:3], 0, *labels[-3:]],
        ood_root=None,
        output_dir=tmp_path / "output",
        # Every picture of each class is sampled, so the skipped file is always among them.
        settings=CheckSettings(cam_per_class=4),
    )
    assert "OOD check skipped: data.ood_root is not set" in caplog.text
    assert not [key for key in metrics if key.startswith("ood/")]
    assert metrics["framing/images"] == 6
    assert metrics["framing/skipped"] == 1
    assert 0.0 <= metrics["framing/max_gap"] <= 1.0
    assert metrics["cam/pictures"] == 6
    assert 0.0 <= metrics["cam/in_face_share"] <= 1.0
    # The default face stage finds the faces, although the model classifies whole pictures.
    assert metrics["cam/face_area_share"] < 1.0


def test_framings_change_the_pixels(model, test_pictures):
    classifier = PictureClassifier(
        model, CLASSES, Preprocessing(image_size=IMAGE_SIZE), FaceStageSettings()
    )
    rgb = classifier.decode(test_pictures[0][0])
    framings, found = frame_picture(classifier, rgb, 2.0)
    (as_is, _), (cropped, crop_search), (zoomed, zoom_search) = framings
    assert found
    assert as_is is rgb
    x0, y0, x1, y1 = top_face(classifier.stage.search(rgb)).crop
    np.testing.assert_array_equal(cropped, rgb[y0:y1, x0:x1])
    assert cropped.shape[0] * cropped.shape[1] < rgb.shape[0] * rgb.shape[1]
    assert zoomed.shape[:2] == (2 * rgb.shape[0], 2 * rgb.shape[1])
    assert crop_search.width == cropped.shape[1]
    assert zoom_search.width == zoomed.shape[1]


def test_zoom_out_centres_picture_on_mean_colour():
    rgb = np.zeros((10, 20, 3), dtype=np.uint8)
    rgb[:, :10] = (200, 100, 50)
    zoomed = zoom_out(rgb, 2.0)
    assert zoomed.shape == (20, 40, 3)
    np.testing.assert_array_equal(zoomed[5:15, 10:30], rgb)
    np.testing.assert_array_equal(zoomed[0, 0], (100, 50, 25))
    np.testing.assert_array_equal(zoomed[-1, -1], (100, 50, 25))


def test_face_crop_keeps_picture_without_face():
    flat = np.full((120, 160, 3), 90, dtype=np.uint8)
    search = FaceStage().search(flat)
    assert search.fallback
    assert face_crop(flat, search) is flat


def test_batched_classification_matches_classify_faces(model, test_pictures):
    preprocessing = Preprocessing(image_size=IMAGE_SIZE)
    classifier = PictureClassifier(model, CLASSES, preprocessing, FaceStageSettings(), batch_size=3)
    pictures = [classifier.decode(path) for path in test_pictures[0][::4]]
    batched = classifier.classify([(rgb, classifier.search(rgb)) for rgb in pictures])
    for rgb, result in zip(pictures, batched, strict=True):
        single = classify_faces(
            rgb, classifier.stage, classifier.prepare, classifier.infer, CLASSES
        )
        assert result.label == single.label
        assert [face.box for face in result.faces] == [face.box for face in single.faces]
        for name in CLASSES:
            assert result.probabilities[name] == pytest.approx(single.probabilities[name], abs=1e-5)


def test_missing_ood_class_folder_raises(tmp_path):
    (tmp_path / "mask").mkdir()
    (tmp_path / "mask" / "a.jpg").write_bytes(b"")
    with pytest.raises(CheckError, match=r"no class folder for \['no_mask'\]"):
        list_ood_files(tmp_path, CLASSES)


def test_extra_ood_folder_raises(tmp_path):
    for name in [*CLASSES, "other"]:
        (tmp_path / name).mkdir()
    with pytest.raises(CheckError, match=r"folders \['other'\] that are not classes"):
        list_ood_files(tmp_path, CLASSES)


def test_missing_ood_root_raises(tmp_path):
    with pytest.raises(CheckError, match="does not exist"):
        list_ood_files(tmp_path / "absent", CLASSES)


def test_run_checks_missing_ood_class(tmp_path, model, test_pictures):
    (tmp_path / "ood" / "mask").mkdir(parents=True)
    client, run_id = new_run(tmp_path)
    with pytest.raises(CheckError, match="no_mask"):
        run_checks(
            client=client,
            run_id=run_id,
            model=model,
            class_names=CLASSES,
            preprocessing=Preprocessing(image_size=IMAGE_SIZE),
            face_stage=None,
            test_paths=test_pictures[0][:1],
            test_labels=test_pictures[1][:1],
            ood_root=tmp_path / "ood",
            output_dir=tmp_path / "output",
            settings=CheckSettings(framing=False, gradcam=False),
        )


@pytest.mark.parametrize(
    ("name", "layer"),
    [("resnet18", "layer4"), ("mobilenetv3_small_100", "blocks"), ("efficientnet_b0", "bn2")],
)
def test_cam_layer_is_last_feature_map(name, layer):
    network = timm.create_model(name, pretrained=False, num_classes=2).eval()
    found, module = find_cam_layer(network, 64)
    assert found == layer
    assert module is network.get_submodule(layer)


def test_in_box_share_counts_positive_attribution():
    cam = np.zeros((4, 4))
    cam[1:3, 1:3] = 2.0
    cam[0, 0] = -5.0
    assert in_box_share(cam, (1.0, 1.0, 3.0, 3.0)) == pytest.approx(1.0)
    assert in_box_share(cam, (1.0, 1.0, 2.0, 3.0)) == pytest.approx(0.5)
    assert in_box_share(np.ones((4, 4)), (0.0, 0.0, 2.0, 4.0)) == pytest.approx(0.5)
    assert in_box_share(-np.ones((4, 4)), (0.0, 0.0, 2.0, 2.0)) is None
    assert box_coverage((0.5, 0.0, 1.5, 1.0), 2, 1).tolist() == [[0.5, 0.5]]


def test_cam_sample_is_seeded_per_class():
    paths = [Path(f"{index:02d}.jpg") for index in range(30)]
    labels = [index % 2 for index in range(30)]
    first = sample_pictures(paths, labels, 2, 4, seed=0)
    assert first == sample_pictures(list(reversed(paths)), list(reversed(labels)), 2, 4, seed=0)
    assert [label for _, label in first] == [0] * 4 + [1] * 4
    assert first != sample_pictures(paths, labels, 2, 4, seed=1)
    assert len(sample_pictures(paths[:3], labels[:3], 2, 4, seed=0)) == 3


def test_config_file_matches_settings():
    values = OmegaConf.to_container(OmegaConf.load(project_root() / "conf/checks/default.yaml"))
    assert CheckSettings.from_dict(values) == CheckSettings()


def test_unknown_setting_raises():
    with pytest.raises(CheckError, match="unknown checks keys"):
        CheckSettings.from_dict({"zoom": 2.0})


def test_model_in_training_mode_raises():
    network = FaceMaskClassifier(name="resnet18", pretrained=False).probability_model().train()
    with pytest.raises(ValueError, match="training mode"):
        PictureClassifier(network, CLASSES, Preprocessing(image_size=IMAGE_SIZE), None)
