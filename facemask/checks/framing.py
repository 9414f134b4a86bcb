"""Framing invariance: the test pictures as they are, cut to their face, and zoomed out.

A model that learned the mask and not the framing of the training photos keeps its accuracy
under all three framings. A large gap points at a model that relies on how much of the frame a
face fills.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from facemask.checks.pictures import (
    PICTURE_ERRORS,
    PictureClassifier,
    SkippedPicture,
    chunks,
    report_skipped,
    top_face,
    write_csv,
)
from facemask.faces.stage import FaceSearch

log = logging.getLogger(__name__)

FRAMINGS = ("as_is", "face_crop", "zoom_out")


def face_crop(rgb: np.ndarray, search: FaceSearch) -> np.ndarray:
    """Cut `rgb` to the square crop of its highest-scoring face, or return `rgb` without a face.

    The crop is the one the face stage computed with `facemask.faces.stage.square_crop`: the
    face box with its margin, squared and clipped to the picture.
    """
    region = top_face(search)
    if region is None:
        return rgb
    x0, y0, x1, y1 = region.crop
    return rgb[y0:y1, x0:x1]


def zoom_out(rgb: np.ndarray, scale: float) -> np.ndarray:
    """Centre `rgb` on a canvas `scale` times its width and height, filled with its mean colour.

    A flat canvas contains no structure, so every face that the detector finds in the result is
    a face of the picture. A blurred, enlarged copy would keep the layout of an enlarged face at
    low contrast. BlazeFace runs on the frame downscaled to 128 pixels, where the blur shrinks
    to a few pixels, so it can still detect that face, and a whole-picture model receives it too.
    """
    height, width = rgb.shape[:2]
    canvas_height = max(height, int(round(height * scale)))
    canvas_width = max(width, int(round(width * scale)))
    mean = np.rint(rgb.reshape(-1, rgb.shape[2]).mean(axis=0)).astype(np.uint8)
    canvas = np.empty((canvas_height, canvas_width, rgb.shape[2]), dtype=np.uint8)
    canvas[:] = mean
    top = (canvas_height - height) // 2
    left = (canvas_width - width) // 2
    canvas[top : top + height, left : left + width] = rgb
    return canvas


def frame_picture(
    classifier: PictureClassifier, rgb: np.ndarray, scale: float
) -> tuple[list[tuple[np.ndarray, FaceSearch]], bool]:
    """Return the three framings of `rgb`, each with the regions that the pipeline classifies.

    The face for `face_crop` comes from the model's face stage, or from a default one for a
    model of whole pictures.

    Returns:
        A (pixels, search) pair for each of `as_is`, `face_crop` and `zoom_out`, and whether a
        face was found.
    """
    located = classifier.locator.search(rgb)
    as_is = located if classifier.stage is not None else classifier.search(rgb)
    cropped = face_crop(rgb, located)
    crop_search = as_is if cropped is rgb else classifier.search(cropped)
    zoomed = zoom_out(rgb, scale)
    framings = [(rgb, as_is), (cropped, crop_search), (zoomed, classifier.search(zoomed))]
    return framings, not located.fallback


def run_framing_check(
    classifier: PictureClassifier,
    test_paths: Sequence[Path],
    test_labels: Sequence[int],
    zoom_out_scale: float,
    folder: Path,
) -> tuple[dict[str, float], list[Path]]:
    """Classify the test pictures in the three framings and compare the accuracies.

    A picture without a detected face keeps its whole frame in `face_crop`.

    Returns:
        The metrics `framing/{as_is,face_crop,zoom_out}_acc`, `framing/max_gap`,
        `framing/fallback_rate` (share without a detected face), `framing/images` and
        `framing/skipped`, and the written files.
    """
    class_names = classifier.class_names
    pictures = list(zip(test_paths, test_labels, strict=True))
    rows: list[dict[str, object]] = []
    correct: dict[str, list[bool]] = {name: [] for name in FRAMINGS}
    faces_found: list[bool] = []
    skipped: list[SkippedPicture] = []
    with tqdm(total=len(pictures), desc="Framing check", unit="img") as bar:
        for chunk in chunks(pictures, classifier.batch_size):
            items: list[tuple[np.ndarray, FaceSearch]] = []
            used = []
            for path, label in chunk:
                try:
                    rgb = classifier.decode(path)
                    framings, found = frame_picture(classifier, rgb, zoom_out_scale)
                except PICTURE_ERRORS as exc:
                    skipped.append(SkippedPicture(Path(path), str(exc)))
                    continue
                items.extend(framings)
                used.append((path, label, found))
            results = classifier.classify(items)
            for index, (path, label, found) in enumerate(used):
                row: dict[str, object] = {"path": str(path), "label": class_names[label]}
                for offset, name in enumerate(FRAMINGS):
                    result = results[len(FRAMINGS) * index + offset]
                    row[name] = result.label
                    correct[name].append(result.label == class_names[label])
                row["face_found"] = found
                rows.append(row)
                faces_found.append(found)
            bar.update(len(chunk))

    folder.mkdir(parents=True, exist_ok=True)
    written = report_skipped("Framing", skipped, folder)
    metrics: dict[str, float] = {
        "framing/images": float(len(rows)),
        "framing/skipped": float(len(skipped)),
    }
    if not rows:
        log.error("Framing check: none of the %d test pictures could be used", len(pictures))
        return metrics, written

    written.append(write_csv(rows, folder / "pictures.csv"))
    accuracies = {name: float(np.mean(correct[name])) for name in FRAMINGS}
    for name, accuracy in accuracies.items():
        metrics[f"framing/{name}_acc"] = accuracy
    metrics["framing/max_gap"] = max(accuracies.values()) - min(accuracies.values())
    metrics["framing/fallback_rate"] = 1.0 - float(np.mean(faces_found))
    log.info(
        "Framing check on %d test pictures: accuracy as is %.4f, cut to the face %.4f, "
        "zoomed out %.1fx %.4f, max gap %.4f; no face found in %.1f%% (left as is for the crop)",
        len(rows),
        accuracies["as_is"],
        accuracies["face_crop"],
        zoom_out_scale,
        accuracies["zoom_out"],
        metrics["framing/max_gap"],
        100 * metrics["framing/fallback_rate"],
    )
    return metrics, written
