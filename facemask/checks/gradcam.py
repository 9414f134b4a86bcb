"""Grad-CAM maps for a fixed sample of test pictures, and the share of each map on the face.

A model that looks at the mask puts most of its positive attribution inside the face box. The
face box's share of the input area is the chance level: a map spread evenly over the input
puts that share on the face.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam
from matplotlib import patches
from torch import nn

from facemask.checks.pictures import (
    PICTURE_ERRORS,
    PictureClassifier,
    SkippedPicture,
    report_skipped,
    top_face,
    write_csv,
)
from facemask.checks.settings import CheckError
from facemask.data.transforms import build_eval_resize
from facemask.faces.stage import FaceSearch
from facemask.models.classifier import ProbabilityModel
from facemask.tracking.reports import plt, save_figure

log = logging.getLogger(__name__)

# Opacity of the heat map drawn over the input in the grid.
OVERLAY_ALPHA = 0.45


@dataclass
class CamSample:
    """One sampled test picture, as the model saw it, with its Grad-CAM map.

    Attributes:
        path: The picture's file.
        label: True class index.
        predicted: Predicted class index of the model input.
        probability: Probability of the predicted class.
        display: The model input before normalisation, HWC uint8, `image_size` square.
        face_box: (x0, y0, x1, y1) of the detected face in the input's pixels; None without one.
        cam: Grad-CAM map upsampled to the input size; None until computed.
    """

    path: Path
    label: int
    predicted: int
    probability: float
    display: np.ndarray
    face_box: tuple[float, float, float, float] | None
    cam: np.ndarray | None = None


def find_cam_layer(model: nn.Module, image_size: int) -> tuple[str, nn.Module]:
    """Return the name and module of the last 4-D feature map larger than 1x1, in forward order.

    That is the last convolutional feature map before global pooling: `layer4` in timm's
    resnet18, `blocks` in mobilenetv3_small_100 (its `conv_head` runs after pooling, on a 1x1
    map) and `bn2` in efficientnet_b0. A container's forward hook runs after its children's, so
    a container wins over its last child, which returns the same tensor.

    Raises:
        CheckError: No module returns such a map for a square input of `image_size` pixels.
    """
    outputs: list[tuple[str, nn.Module, torch.Size]] = []

    def record(name: str, module: nn.Module, args: object, output: object) -> None:
        if isinstance(output, torch.Tensor):
            outputs.append((name, module, output.shape))

    hooks = [
        module.register_forward_hook(partial(record, name))
        for name, module in model.named_modules()
    ]
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        for hook in hooks:
            hook.remove()
    maps = [
        (name, module)
        for name, module, shape in outputs
        if len(shape) == 4 and shape[2] * shape[3] > 1
    ]
    if not maps:
        raise CheckError(
            f"no layer of the model returns a feature map larger than 1x1 for {image_size}-pixel "
            "inputs, so Grad-CAM has no layer to use; set checks.gradcam=false"
        )
    return maps[-1]


def class_score_function(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return the function whose per-class output Grad-CAM differentiates.

    Grad-CAM uses the class score before softmax, which a `ProbabilityModel`'s backbone
    returns. For other models the function is the log-probability: the score minus the
    log-sum-exp of all scores. Its gradient therefore also carries the other classes' scores,
    and it loses the target class's part when that probability rounds to 1 in float32.
    """
    if isinstance(model, ProbabilityModel):
        return model.backbone
    # NOTE: with a probability that rounds to 1, the map follows only the other classes' scores.
    return lambda images: torch.log(model(images).clamp_min(1e-30))


def compute_cams(
    model: nn.Module,
    layer: nn.Module,
    inputs: np.ndarray,
    targets: Sequence[int],
    batch_size: int,
) -> np.ndarray:
    """Return the Grad-CAM maps of NCHW `inputs` for `targets`, upsampled to the input size.

    The maps keep their sign (captum's LayerGradCam with relu_attributions=False); callers
    take the positive part.
    """
    device = next(model.parameters()).device
    gradcam = LayerGradCam(class_score_function(model), layer)
    size = tuple(inputs.shape[2:])
    maps = []
    for start in range(0, len(inputs), batch_size):
        batch = torch.from_numpy(inputs[start : start + batch_size]).to(device)
        attribution = gradcam.attribute(batch, target=list(targets[start : start + batch_size]))
        upsampled = LayerAttribution.interpolate(attribution, size, interpolate_mode="bilinear")
        maps.append(upsampled[:, 0].detach().float().cpu().numpy())
    return np.concatenate(maps)


def box_coverage(box: tuple[float, float, float, float], width: int, height: int) -> np.ndarray:
    """Return the fraction of each pixel of a `height` x `width` grid that `box` covers."""
    x0, y0, x1, y1 = box
    columns = np.arange(width)
    rows = np.arange(height)
    cover_x = np.clip(np.minimum(x1, columns + 1) - np.maximum(x0, columns), 0.0, 1.0)
    cover_y = np.clip(np.minimum(y1, rows + 1) - np.maximum(y0, rows), 0.0, 1.0)
    return np.outer(cover_y, cover_x)


def in_box_share(cam: np.ndarray, box: tuple[float, float, float, float]) -> float | None:
    """Return the share of the positive attribution of `cam` inside `box`.

    Returns None when no pixel of `cam` is positive.
    """
    positive = np.clip(cam, 0.0, None)
    total = float(positive.sum())
    if total <= 0.0:
        return None
    coverage = box_coverage(box, cam.shape[1], cam.shape[0])
    return float((positive * coverage).sum() / total)


def sample_pictures(
    paths: Sequence[Path], labels: Sequence[int], classes: int, per_class: int, seed: int
) -> list[tuple[Path, int]]:
    """Pick `per_class` pictures of each class (fewer when a class has fewer) with a seeded RNG.

    Each class draws from its own paths, sorted, with its own generator, so the sample depends
    only on the seed and on that class's test pictures.
    """
    sample: list[tuple[Path, int]] = []
    for label in range(classes):
        members = sorted(Path(p) for p, y in zip(paths, labels, strict=True) if y == label)
        count = min(per_class, len(members))
        rng = np.random.default_rng([seed, label])
        chosen = sorted(rng.choice(len(members), size=count, replace=False).tolist())
        sample.extend((members[i], label) for i in chosen)
    return sample


def _model_input(
    classifier: PictureClassifier, rgb: np.ndarray
) -> tuple[np.ndarray, tuple[float, float, float, float] | None]:
    """Return the pixels that the model classifies and the face box in model input pixels.

    The pixels are the crop of the highest-scoring face when the model has a face stage and a
    face is found, and the whole picture otherwise. The box is None without a face.
    """
    face = top_face(classifier.locator.search(rgb))
    if face is None:
        return rgb, None
    pixels = rgb
    box = face.box
    if classifier.stage is not None:
        x0, y0, x1, y1 = face.crop
        pixels = rgb[y0:y1, x0:x1]
        box = box.shifted(-x0, -y0)
    # The evaluation transform stretches the pixels to a square of `image_size`.
    size = classifier.preprocessing.image_size
    height, width = pixels.shape[:2]
    box = box.clipped(width, height)
    scale_x = size / width
    scale_y = size / height
    return pixels, (box.x0 * scale_x, box.y0 * scale_y, box.x1 * scale_x, box.y1 * scale_y)


def _prepare_samples(
    classifier: PictureClassifier, pictures: Sequence[tuple[Path, int]]
) -> tuple[list[CamSample], np.ndarray, list[SkippedPicture]]:
    """Decode the pictures, classify their model inputs, and return the samples and NCHW inputs."""
    resize = build_eval_resize(classifier.preprocessing)
    usable: list[tuple[Path, int, np.ndarray, tuple[float, float, float, float] | None]] = []
    skipped: list[SkippedPicture] = []
    for path, label in pictures:
        try:
            pixels, box = _model_input(classifier, classifier.decode(path))
        except PICTURE_ERRORS as exc:
            skipped.append(SkippedPicture(path, str(exc)))
            continue
        usable.append((path, label, np.ascontiguousarray(pixels), box))

    items = [
        (pixels, FaceSearch.whole_picture(pixels.shape[1], pixels.shape[0]))
        for _, _, pixels, _ in usable
    ]
    results = classifier.classify(items)
    samples = []
    for (path, label, pixels, box), result in zip(usable, results, strict=True):
        samples.append(
            CamSample(
                path=path,
                label=label,
                predicted=classifier.class_names.index(result.label),
                probability=result.probabilities[result.label],
                display=resize(image=pixels)["image"],
                face_box=box,
            )
        )
    size = classifier.preprocessing.image_size
    inputs = np.empty((0, 3, size, size), dtype=np.float32)
    if usable:
        inputs = np.stack([classifier.prepare(pixels) for _, _, pixels, _ in usable])
    return samples, inputs.astype(np.float32), skipped


def plot_cam_grid(
    samples: Sequence[CamSample], class_names: Sequence[str], columns: int, path: Path
) -> Path:
    """Write a grid of inputs with their Grad-CAM overlay, one row per class, as a PNG."""
    rows = len(class_names)
    fig, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 3.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    filled = [0] * rows
    for sample in samples:
        ax = axes[sample.label][filled[sample.label]]
        filled[sample.label] += 1
        ax.imshow(sample.display)
        positive = np.clip(sample.cam, 0.0, None) if sample.cam is not None else None
        if positive is not None and positive.max() > 0:
            ax.imshow(
                positive / positive.max(), cmap="jet", alpha=OVERLAY_ALPHA, vmin=0.0, vmax=1.0
            )
        if sample.face_box is not None:
            x0, y0, x1, y1 = sample.face_box
            ax.add_patch(
                patches.Rectangle(
                    (x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="white", linewidth=1.5
                )
            )
        ax.set_title(
            f"true {class_names[sample.label]}\n"
            f"pred {class_names[sample.predicted]} {sample.probability:.2f}",
            fontsize=8,
        )
    fig.suptitle("Grad-CAM of the predicted class; white box: detected face", fontsize=9)
    return save_figure(fig, path)


def run_gradcam_check(
    classifier: PictureClassifier,
    test_paths: Sequence[Path],
    test_labels: Sequence[int],
    per_class: int,
    seed: int,
    folder: Path,
) -> tuple[dict[str, float], list[Path]]:
    """Compute Grad-CAM maps for a fixed sample of test pictures; write the grid and a CSV.

    Returns:
        The metrics `cam/pictures` (sampled pictures used), `cam/pictures_with_face` (those with
        a face box and a positive map), `cam/in_face_share` and `cam/face_area_share` (means
        over the pictures with a face, logged when there is one), and the written files.
    """
    class_names = classifier.class_names
    pictures = sample_pictures(test_paths, test_labels, len(class_names), per_class, seed)
    folder.mkdir(parents=True, exist_ok=True)
    samples, inputs, skipped = _prepare_samples(classifier, pictures)
    written = report_skipped("Grad-CAM", skipped, folder)
    metrics: dict[str, float] = {"cam/pictures": float(len(samples))}
    if not samples:
        log.warning("Grad-CAM check: no test picture could be used, so it draws nothing")
        return metrics, written

    size = classifier.preprocessing.image_size
    layer_name, layer = find_cam_layer(classifier.model, size)
    cams = compute_cams(
        classifier.model, layer, inputs, [s.predicted for s in samples], classifier.batch_size
    )
    rows = []
    shares = []
    areas = []
    for sample, cam in zip(samples, cams, strict=True):
        sample.cam = cam
        share = None
        area = None
        if sample.face_box is not None:
            share = in_box_share(cam, sample.face_box)
            area = float(box_coverage(sample.face_box, size, size).sum()) / (size * size)
            if share is not None:
                shares.append(share)
                areas.append(area)
        rows.append(
            {
                "path": str(sample.path),
                "label": class_names[sample.label],
                "predicted": class_names[sample.predicted],
                "probability": sample.probability,
                "face_found": sample.face_box is not None,
                "in_face_share": "" if share is None else share,
                "face_area_share": "" if area is None else area,
            }
        )
    written.append(write_csv(rows, folder / "samples.csv"))
    written.append(plot_cam_grid(samples, class_names, max(1, per_class), folder / "grid.png"))

    metrics["cam/pictures_with_face"] = float(len(shares))
    if not shares:
        log.warning(
            "Grad-CAM on layer %s for %d test pictures: no picture has a detected face and a "
            "positive map, so cam/in_face_share is not logged",
            layer_name,
            len(samples),
        )
        return metrics, written
    metrics["cam/in_face_share"] = float(np.mean(shares))
    metrics["cam/face_area_share"] = float(np.mean(areas))
    log.info(
        "Grad-CAM on layer %s for %d test pictures: %.1f%% of the positive attribution falls on "
        "the face, which covers %.1f%% of the input (mean over %d pictures with a face)",
        layer_name,
        len(samples),
        100 * metrics["cam/in_face_share"],
        100 * metrics["cam/face_area_share"],
        len(shares),
    )
    return metrics, written
