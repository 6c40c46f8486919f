"""benchmarks/plain_supervised.py: the plain cross-entropy reference of docs/evaluation.md."""

import importlib.util
import math
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SPEC = importlib.util.spec_from_file_location(
    "plain_supervised", ROOT / "benchmarks" / "plain_supervised.py"
)
plain_supervised = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(plain_supervised)


def test_features_are_the_mean_of_the_final_patch_tokens():
    """The kNN features are those of `m3i eval knn`: the final-normed tokens' mean, without the
    class token."""
    torch.manual_seed(0)
    model = plain_supervised.build_model("vit_tiny_patch16_224", 16, 4, 2)
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = model.norm(model.blocks(model._pos_embed(model.patch_embed(images))))
    expected = expected[:, model.num_prefix_tokens :].mean(dim=1)
    torch.testing.assert_close(plain_supervised.features(model, images), expected)


def test_the_loop_memorises_a_small_training_set():
    """64 images seen 12 times over: the cross-entropy falls far below chance (log 10 = 2.30),
    which it cannot without the optimiser's steps."""
    result = plain_supervised.train_and_probe(
        steps=60, batch=64, lr=1e-3, warmup=5, image_size=16, depth=2, num_train=64, num_val=32
    )
    assert result["cross_entropy_last_10"] < 0.5 * math.log(10)
