"""The LightningModule and backbone creation."""

from __future__ import annotations

import huggingface_hub.constants
import pytest
import timm
import torch
from safetensors.torch import save_file

from facemask.models.backbone import BackboneError, PretrainedWeightsError, create_backbone
from facemask.models.classifier import FaceMaskClassifier


def test_classifier_outputs_logits_per_class():
    model = FaceMaskClassifier(name="resnet18", class_names=["a", "b", "c"], pretrained=False)
    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(4, 3, 64, 64))
        probs = model.probability_model()(torch.randn(4, 3, 64, 64))
    assert logits.shape == (4, 3)
    assert probs.shape == (4, 3)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(4))
    assert bool((probs >= 0).all())


def test_num_classes_must_match_data():
    with pytest.raises(ValueError, match="derived from the data"):
        FaceMaskClassifier(class_names=["mask", "no_mask"], pretrained=False, num_classes=3)


def test_unknown_model_name_suggests_names():
    with pytest.raises(BackboneError, match="resnet_18.*not a timm model"):
        create_backbone("resnet_18", 2, pretrained=False)


def test_offline_pretrained_error_names_both_fixes(monkeypatch):
    # With the hub in offline mode the download fails at once, as it does without a network.
    # huggingface_hub reads the variable when it is imported, so the constant is patched too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PretrainedWeightsError) as excinfo:
        create_backbone("resnet18", 2, pretrained=True)
    message = str(excinfo.value)
    assert "model.pretrained=false" in message
    assert "model.weights_file=PATH" in message


def test_weights_file_loads_local_weights(tmp_path):
    source = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    path = tmp_path / "resnet18.safetensors"
    save_file(source.state_dict(), str(path))
    model = create_backbone("resnet18", 2, weights_file=path)
    torch.testing.assert_close(model.conv1.weight, source.conv1.weight)
    assert model.get_classifier().out_features == 2


def test_missing_weights_file_is_named(tmp_path):
    missing = tmp_path / "absent.safetensors"
    with pytest.raises(BackboneError, match="absent.safetensors"):
        create_backbone("resnet18", 2, weights_file=missing)
