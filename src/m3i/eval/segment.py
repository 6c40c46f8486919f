"""Semantic segmentation from frozen patch tokens: a linear (1x1) head upsampled to pixels."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from m3i.eval.probe import fit_head
from m3i.eval.settings import DenseSettings


def token_grid(tokens: torch.Tensor) -> torch.Tensor:
    """(N, P, D) patch tokens -> (N, D, g, g) feature map."""
    n, p, d = tokens.shape
    side = int(round(p**0.5))
    if side * side != p:
        raise ValueError(f"{p} patch tokens do not form a square grid")
    return tokens.transpose(1, 2).reshape(n, d, side, side)


class FrozenStandardise(nn.Module):
    """Per-channel standardisation with fixed train statistics (a frozen BatchNorm)."""

    def __init__(self, tokens: torch.Tensor) -> None:
        super().__init__()
        flat = tokens.reshape(-1, tokens.shape[-1])
        self.register_buffer("mean", flat.mean(dim=0)[None, :, None, None])
        self.register_buffer("std", flat.std(dim=0).clamp_min(1e-6)[None, :, None, None])

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return (grid - self.mean) / self.std


def segmentation_scores(
    logits: torch.Tensor, masks: torch.Tensor, num_classes: int
) -> dict[str, float]:
    """`miou` (mean over classes present in prediction or truth) and `pixel_acc`, in percent,
    from logits (N, K, H, W) and masks (N, H, W), with torchmetrics."""
    predicted = logits.argmax(dim=1)
    miou = MulticlassJaccardIndex(num_classes, average="macro")(predicted, masks)
    accuracy = MulticlassAccuracy(num_classes, average="micro")(predicted, masks)
    return {"miou": 100.0 * miou.item(), "pixel_acc": 100.0 * accuracy.item()}


def patch_frequencies(masks: torch.Tensor, grid: int, num_classes: int) -> torch.Tensor:
    """(N, K, grid, grid): the share of each class among the pixels of each patch."""
    chunks = []
    for start in range(0, masks.shape[0], 512):
        one_hot = F.one_hot(masks[start : start + 512], num_classes).permute(0, 3, 1, 2).float()
        chunks.append(F.adaptive_avg_pool2d(one_hot, grid))
    return torch.cat(chunks)


def soft_cross_entropy(logits: torch.Tensor, frequencies: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of patch logits (N, K, g, g) against per-patch class shares.

    Equal (per pixel) to the pixel cross-entropy of the logits upsampled by nearest neighbour,
    at 1/(pixels per patch) of the cost.
    """
    return -(frequencies * logits.log_softmax(dim=1)).sum(dim=1).mean()


def linear_segmentation_head(tokens: torch.Tensor, num_classes: int) -> nn.Module:
    """Frozen standardisation and a 1x1 convolution: patch logits (N, K, g, g) from a grid."""
    return nn.Sequential(FrozenStandardise(tokens), nn.Conv2d(tokens.shape[-1], num_classes, 1))


def predict_pixels(head: nn.Module, tokens: torch.Tensor, size: int, chunk: int = 512):
    """Pixel logits (N, K, size, size): the head's patch logits upsampled bilinearly."""
    with torch.no_grad():
        return torch.cat(
            [
                F.interpolate(
                    head(token_grid(tokens[i : i + chunk])),
                    size=(size, size),
                    mode="bilinear",
                    align_corners=False,
                )
                for i in range(0, tokens.shape[0], chunk)
            ]
        )


def fit_dense_head(
    head: nn.Module,
    tokens: torch.Tensor,
    targets: torch.Tensor,
    loss_fn,
    settings: DenseSettings,
    seed: int,
) -> nn.Module:
    """`fit_head` on patch tokens laid out as (N, D, g, g) grids."""
    return fit_head(
        head, tokens, targets, loss_fn, lr=settings.lr, epochs=settings.epochs,
        batch_size=settings.batch_size, weight_decay=settings.weight_decay, seed=seed,
        prepare=token_grid,
    )  # fmt: skip


def segment_probe(
    train_tokens: torch.Tensor,
    train_masks: torch.Tensor,
    val_tokens: torch.Tensor,
    val_masks: torch.Tensor,
    num_classes: int,
    settings: DenseSettings,
    seed: int = 0,
) -> dict[str, float]:
    """Train a linear head on frozen tokens (cross-entropy against each patch's pixel class
    shares); score its bilinearly upsampled logits against the val masks, pixel by pixel."""
    torch.manual_seed(seed)
    grid = token_grid(train_tokens[:1]).shape[-1]
    head = linear_segmentation_head(train_tokens, num_classes)
    frequencies = patch_frequencies(train_masks, grid, num_classes)
    fit_dense_head(head, train_tokens, frequencies, soft_cross_entropy, settings, seed)
    pixels = predict_pixels(head, val_tokens, val_masks.shape[-1])
    return segmentation_scores(pixels, val_masks, num_classes)
