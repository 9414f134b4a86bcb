"""Fixtures shared by the test modules."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# The repository is checked out next to a `shared` folder that contains the development data set.
REAL_DATA_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "facemask-data"


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    """Return the real mask / no_mask data set folder, failing the test if it is missing."""
    assert REAL_DATA_ROOT.is_dir(), (
        f"real data set not found at {REAL_DATA_ROOT}; place the facemask-data folder there"
    )
    return REAL_DATA_ROOT


# Pictures from other sources, for evaluation only; next to the development data set.
REAL_OOD_ROOT = REAL_DATA_ROOT.parent / "facemask-ood"


@pytest.fixture(scope="session")
def real_ood_root() -> Path:
    """Return the OOD mask / no_mask folder, skipping the test if it is missing."""
    if not REAL_OOD_ROOT.is_dir():
        pytest.skip(f"OOD data set not found at {REAL_OOD_ROOT}; place facemask-ood there")
    return REAL_OOD_ROOT


def encode_image(img: Image.Image, file_format: str, **params: object) -> bytes:
    """Return `img` saved in `file_format` with Pillow's save `params`."""
    buffer = io.BytesIO()
    img.save(buffer, format=file_format, **params)
    return buffer.getvalue()


def noise_image(size: tuple[int, int], seed: int, mode: str = "RGB") -> Image.Image:
    """Return a picture of random pixels, so that its bytes differ for each seed."""
    channels = len(mode)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels))
    return Image.fromarray(pixels.astype(np.uint8).squeeze(), mode=mode)


@pytest.fixture(scope="session")
def odd_image_files() -> dict[str, bytes]:
    """Return decodable files in unusual formats, modes and names, keyed by file name.

    `rotated_exif6.jpg` stores 40x20 pixels with EXIF orientation 6, so it shows as 20x40.
    """
    palette = Image.new("P", (12, 10), 1)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display.
    return {
        "png_named.jpg": encode_image(noise_image((16, 12), 1), "PNG"),
        "webp_no_extension": encode_image(noise_image((16, 12), 2), "WEBP", lossless=True),
        "rgba.png": encode_image(noise_image((16, 12), 3, "RGBA"), "PNG"),
        "palette_transparent.png": encode_image(palette, "PNG", transparency=1),
        "grey.png": encode_image(noise_image((16, 12), 4, "L"), "PNG"),
        "grey16.png": encode_image(Image.new("I;16", (16, 12), 40_000), "PNG"),
        "cmyk.jpg": encode_image(Image.new("CMYK", (16, 12), (0, 128, 255, 0)), "JPEG"),
        "rotated_exif6.jpg": encode_image(noise_image((40, 20), 5), "JPEG", exif=exif),
    }


@pytest.fixture(scope="session")
def broken_image_files() -> dict[str, bytes]:
    """Return files that must fail to decode, keyed by file name."""
    jpeg = encode_image(noise_image((64, 64), 6), "JPEG", quality=95)
    return {
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "text.jpg": b"This is a text file, not a JPEG.\n",
        "empty.jpg": b"",
    }


@dataclass(frozen=True)
class TrainedModel:
    """A model trained on a small real subset and registered in a temporary MLflow store."""

    tracking_uri: str
    store: Path
    data_root: Path
    run_id: str
    model_name: str
    version: str
    alias: str
    best_checkpoint: str

    @property
    def alias_uri(self) -> str:
        return f"models:/{self.model_name}@{self.alias}"


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory, real_data_root: Path) -> TrainedModel:
    """Train one epoch at 64 pixels on 24 photos per class and register the model (about 15 s)."""
    from facemask.training import train
    from tests.helpers import compose_train_config, copy_real_subset, small_training_overrides

    data_root = copy_real_subset(real_data_root, tmp_path_factory.mktemp("model-data"), 24)
    store = tmp_path_factory.mktemp("model-store")
    tracking_uri = f"sqlite:///{store / 'mlflow.db'}"
    cfg = compose_train_config(small_training_overrides(data_root, store, store / "run"))
    result = train(cfg)
    return TrainedModel(
        tracking_uri=tracking_uri,
        store=store,
        data_root=data_root,
        run_id=result.run_id,
        model_name=result.registration.model_name,
        version=result.registration.version,
        alias=result.registration.alias,
        best_checkpoint=result.best_checkpoint,
    )
