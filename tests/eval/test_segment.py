"""Linear segmentation probe: metrics, patch class shares, the soft loss and a toy probe."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from m3i.eval.segment import (
    patch_frequencies,
    segment_probe,
    segmentation_scores,
    soft_cross_entropy,
    token_grid,
)
from m3i.eval.settings import DenseSettings


def one_hot_logits(predicted: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, H, W) class map -> (N, K, H, W) logits whose argmax is that map."""
    return F.one_hot(predicted, num_classes).permute(0, 3, 1, 2).float()


def brute_force_scores(predicted: np.ndarray, truth: np.ndarray, num_classes: int) -> dict:
    """IoU per class over every pixel of every image, averaged over the classes that occur
    in prediction or truth; pixel accuracy over every pixel."""
    ious = []
    for c in range(num_classes):
        intersection = union = 0
        for p, t in zip(predicted.ravel(), truth.ravel(), strict=True):
            intersection += int(p == c and t == c)
            union += int(p == c or t == c)
        if union:
            ious.append(intersection / union)
    correct = sum(int(p == t) for p, t in zip(predicted.ravel(), truth.ravel(), strict=True))
    return {"miou": 100.0 * sum(ious) / len(ious), "pixel_acc": 100.0 * correct / truth.size}


def test_segmentation_scores_by_hand():
    # truth        prediction
    # 0 0 0 1      0 0 1 1
    # 0 0 1 1      0 2 1 1
    # class 0: truth 5 px, predicted 3 px, all inside the truth -> IoU 3/5 = 0.6
    # class 1: truth 3 px, predicted 4 px covering them         -> IoU 3/4 = 0.75
    # class 2: predicted 1 px, no truth                         -> IoU 0   (counted)
    # classes 3, 4: in neither                                  ->         (not counted)
    # mIoU = (0.6 + 0.75 + 0) / 3 = 45%; pixel accuracy 6 of 8 = 75%
    truth = torch.tensor([[[0, 0, 0, 1], [0, 0, 1, 1]]])
    predicted = torch.tensor([[[0, 0, 1, 1], [0, 2, 1, 1]]])
    result = segmentation_scores(one_hot_logits(predicted, 5), truth, num_classes=5)
    assert result == pytest.approx({"miou": 45.0, "pixel_acc": 75.0})


def test_segmentation_scores_perfect_prediction():
    truth = torch.tensor([[[0, 3], [3, 3]], [[1, 1], [0, 3]]])
    result = segmentation_scores(one_hot_logits(truth, 6), truth, num_classes=6)
    assert result == pytest.approx({"miou": 100.0, "pixel_acc": 100.0})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_segmentation_scores_match_brute_force(seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 6, 7, 9, generator=generator)
    logits[:, 5] -= 100.0  # class 5 is never predicted and never true: left out of the mean
    truth = torch.randint(0, 4, (3, 7, 9), generator=generator)  # class 4: predicted only
    result = segmentation_scores(logits, truth, num_classes=6)
    expected = brute_force_scores(logits.argmax(dim=1).numpy(), truth.numpy(), 6)
    assert result == pytest.approx(expected, rel=1e-5)


def test_patch_frequencies_by_hand():
    mask = torch.tensor(
        [
            [0, 0, 1, 1],
            [0, 1, 1, 1],
            [2, 2, 0, 0],
            [2, 2, 0, 1],
        ]
    )
    frequencies = patch_frequencies(mask[None], grid=2, num_classes=3)
    expected = torch.tensor(
        [
            # class 0        class 1        class 2   (patches top left, top right / bottom ...)
            [[0.75, 0.0], [0.0, 0.75]],
            [[0.25, 1.0], [0.0, 0.25]],
            [[0.0, 0.0], [1.0, 0.0]],
        ]
    )
    assert frequencies.shape == (1, 3, 2, 2)
    torch.testing.assert_close(frequencies[0], expected)


@pytest.mark.parametrize("side", [4, 8, 12, 16])  # 1, 2, 3, 4 pixels per patch side
def test_soft_cross_entropy_equals_pixel_cross_entropy_of_nearest_upsampling(side):
    generator = torch.Generator().manual_seed(side)
    grid, num_classes = 4, 5
    logits = torch.randn(3, num_classes, grid, grid, generator=generator)
    masks = torch.randint(0, num_classes, (3, side, side), generator=generator)
    frequencies = patch_frequencies(masks, grid, num_classes)
    pixel_logits = F.interpolate(logits, size=(side, side), mode="nearest")
    expected = F.cross_entropy(pixel_logits, masks)
    torch.testing.assert_close(soft_cross_entropy(logits, frequencies), expected)


def test_token_grid_is_row_major():
    tokens = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)
    with pytest.raises(ValueError, match="square grid"):
        token_grid(tokens)
    tokens = torch.arange(1 * 4 * 2, dtype=torch.float32).reshape(1, 4, 2)
    grid = token_grid(tokens)
    assert grid.shape == (1, 2, 2, 2)
    # patch p = row * 2 + column holds tokens[0, p]
    for p in range(4):
        torch.testing.assert_close(grid[0, :, p // 2, p % 2], tokens[0, p])


def toy_tokens(n: int, seed: int, num_classes: int = 3, grid: int = 4, patch: int = 4):
    """Masks made of 2x2-patch blocks of one class; each token is the one-hot of its patch's
    class plus noise (and two noise-only channels)."""
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, num_classes, (n, grid // 2, grid // 2), generator=generator)
    patches = blocks.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)  # (n, g, g)
    masks = patches.repeat_interleave(patch, dim=1).repeat_interleave(patch, dim=2)
    one_hot = F.one_hot(patches.reshape(n, grid * grid), num_classes).float()
    tokens = torch.cat([one_hot, torch.zeros(n, grid * grid, 2)], dim=2)
    tokens = tokens + 0.1 * torch.randn(tokens.shape, generator=generator)
    return tokens, masks


def test_segment_probe_learns_tokens_that_carry_the_mask():
    train_tokens, train_masks = toy_tokens(64, seed=0)
    val_tokens, val_masks = toy_tokens(32, seed=1)
    settings = DenseSettings(epochs=10, batch_size=16, lr=3e-2)
    result = segment_probe(train_tokens, train_masks, val_tokens, val_masks, 3, settings)
    assert result["miou"] > 90.0
    assert result["pixel_acc"] > 95.0


def test_segment_probe_on_noise_stays_near_chance():
    # the same masks with tokens that say nothing about them: the probe cannot do well
    train_tokens, train_masks = toy_tokens(64, seed=0)
    val_tokens, val_masks = toy_tokens(32, seed=1)
    generator = torch.Generator().manual_seed(2)
    train_tokens = torch.randn(train_tokens.shape, generator=generator)
    val_tokens = torch.randn(val_tokens.shape, generator=generator)
    settings = DenseSettings(epochs=10, batch_size=16, lr=3e-2)
    result = segment_probe(train_tokens, train_masks, val_tokens, val_masks, 3, settings)
    assert result["pixel_acc"] < 60.0
