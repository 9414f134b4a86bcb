"""The training augmentation and its `strength` factor, applied to a real photo."""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import pytest
import torch

from facemask.data.images import decode_image
from facemask.data.transforms import (
    Augmentation,
    Preprocessing,
    build_eval_transform,
    build_train_transform,
    image_to_tensor,
)


@pytest.fixture(scope="module")
def photo(real_data_root: Path):
    path = sorted((real_data_root / "mask").glob("*.jpg"))[0]
    return decode_image(path).image


def _steps(transform: A.Compose) -> dict[str, A.BasicTransform]:
    return {type(step).__name__: step for step in transform.transforms}


def test_strength_zero_leaves_only_resize_and_flip(photo):
    pre = Preprocessing(image_size=64)
    aug = Augmentation(hflip=0.0, strength=0.0)
    steps = _steps(build_train_transform(pre, aug))
    assert "RandomResizedCrop" not in steps
    assert "Affine" not in steps
    assert "ColorJitter" not in steps
    trained = image_to_tensor(photo, build_train_transform(pre, aug))
    evaluated = image_to_tensor(photo, build_eval_transform(pre))
    assert torch.equal(trained, evaluated)


def test_strength_scales_crop_rotation_and_colour():
    doubled = Augmentation(scale_min=0.6, rotate=15.0, color_jitter=0.2, strength=2.0).scaled()
    assert doubled.scale_min == pytest.approx(0.2)
    assert doubled.rotate == pytest.approx(30.0)
    assert doubled.color_jitter == pytest.approx(0.4)
    assert doubled.hflip == 0.5
    assert doubled.strength == 1.0
    # The crop keeps at least 8% of the area however strong the factor.
    assert Augmentation(scale_min=0.6, strength=4.0).scaled().scale_min == pytest.approx(0.08)


def test_strong_augmentation_still_yields_model_input(photo):
    pre = Preprocessing(image_size=64)
    tensor = image_to_tensor(photo, build_train_transform(pre, Augmentation(strength=4.0)))
    assert tensor.shape == (3, 64, 64)
    assert torch.isfinite(tensor).all()


@pytest.mark.parametrize("strength", [-0.1, 4.5])
def test_strength_out_of_range_raises(strength):
    with pytest.raises(ValueError, match="augment.strength"):
        Augmentation(strength=strength)
