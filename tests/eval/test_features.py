"""Frozen features: timm's eval view of every image, the same with DataLoader workers."""

import numpy as np
import pytest
import timm
import timm.data
import torch
from PIL import Image

from m3i.config import load_config
from m3i.data.specs import open_source
from m3i.eval.features import extract
from m3i.train.monitors import TrainingMonitor

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as timm's


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, depth=1,
        num_classes=0, global_pool="avg", fc_norm=False,
    ).eval()  # fmt: skip


@pytest.fixture(scope="module")
def source():
    """Shapes at 24 pixels for a 16-pixel model: every view is resized and cropped."""
    return open_source("shapes", "val", num_samples=13, image_size=24)


@pytest.mark.parametrize("crop_pct", [0.875, 1.0])
def test_features_are_the_models_on_timms_eval_views(model, source, crop_pct):
    """By hand: each image as PIL through timm's create_transform (16 px, bicubic, crop_pct),
    then the mean of the ViT's patch tokens."""
    transform = timm.data.create_transform(
        input_size=(3, 16, 16), crop_pct=crop_pct, crop_mode="center",
        interpolation="bicubic", mean=MEAN, std=STD,
    )  # fmt: skip
    images = torch.stack(
        [transform(Image.fromarray(np.asarray(s.image.permute(1, 2, 0)))) for s in source]
    )
    with torch.no_grad():
        tokens = model.forward_features(images)[:, model.num_prefix_tokens :]
    features = extract(model, source, batch_size=5, dense=True, crop_pct=crop_pct)
    torch.testing.assert_close(features.pooled, tokens.mean(dim=1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features.dense, tokens, atol=1e-5, rtol=1e-5)
    assert features.labels.tolist() == [s.label for s in source]


def test_workers_give_the_same_features_in_the_same_order(model, source):
    alone = extract(model, source, batch_size=5, dense=True)
    shared = extract(model, source, batch_size=5, dense=True, workers=2)
    assert torch.equal(alone.pooled, shared.pooled)
    assert torch.equal(alone.dense, shared.dense)
    assert torch.equal(alone.labels, shared.labels)


def test_the_online_knn_monitor_sees_the_same_views():
    """The training monitor's kNN images are `m3i eval`'s default views: timm's eval transform
    at crop_pct 0.875 (here of 24-pixel shapes for a 16-pixel model)."""
    overrides = ["model.depth=1", "monitor.knn_train=6", "monitor.knn_val=4"]
    overrides += ["data.image_size=24", "model.img_size=16"]
    cfg = load_config("supervised", overrides=overrides)
    monitor = TrainingMonitor(cfg, torch.device("cpu"))
    transform = timm.data.create_transform(
        input_size=(3, 16, 16), crop_pct=0.875, interpolation="bicubic", mean=MEAN, std=STD
    )
    for images, split in ((monitor.memory, "train"), (monitor.queries, "val")):
        source = open_source("shapes", split, num_samples=len(images), image_size=24)
        expected = [
            transform(Image.fromarray(np.asarray(s.image.permute(1, 2, 0)))) for s in source
        ]
        assert torch.equal(images, torch.stack(expected))
