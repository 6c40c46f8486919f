"""The pixel target (`targets.pixels`, MAE's) against patches cut out by brute force, and its
figure for a predictor that knows only positions."""

import math

import pytest
import torch

from m3i.mi.targets import RunContext, StepContext
from m3i.mi.targets.pixels import PixelTarget, PixelTargetConfig
from tests.mi.step_inputs import (
    DEC_DIM,
    identity_head,
    image_batch,
    make_streams,
)


def brute_force_patches(image: torch.Tensor, p: int) -> list[list[float]]:
    """Row-major patches of a (C, H, W) image, each flattened as (p, q, channel)."""
    c, h, w = image.shape
    patches = []
    for row in range(h // p):
        for col in range(w // p):
            values = []
            for y in range(p):
                for x in range(p):
                    for ch in range(c):
                        values.append(image[ch, row * p + y, col * p + x].item())
            patches.append(values)
    return patches


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_pixel_target_equals_brute_force(n, norm_pix):
    p, size = 4, 12  # a 3x3 grid of 4x4 patches
    grid = (size // p) ** 2
    torch.manual_seed(0)
    run = RunContext(decoder_dim=DEC_DIM, patch_size=p)
    target = PixelTarget(PixelTargetConfig(weight=1.0, norm_pix=norm_pix), run)
    g = torch.Generator().manual_seed(n)
    view1 = torch.rand(n, 3, size, size, generator=g) * 2 + torch.arange(n)[:, None, None, None]
    streams = make_streams(n, grid, seed=n)
    streams["a"].samples = torch.arange(n - 1, -1, -1)  # row r of stream a holds sample n-1-r
    masked = torch.stack([torch.randperm(grid, generator=g)[:4] for _ in range(n)])
    decoded = torch.randn(n, 4, DEC_DIM, generator=g)
    ctx = StepContext(
        image_batch(view1),
        streams,
        masked_positions=masked,
        decoded={"masked": decoded},
        patch_size=p,
    )
    bound = target(ctx)

    rows = []
    for r in range(n):
        patches = brute_force_patches(view1[int(streams["a"].samples[r])], p)
        for q in range(masked.shape[1]):
            values = patches[int(masked[r, q])]
            if norm_pix:
                mean = sum(values) / len(values)
                var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
                values = [(v - mean) / math.sqrt(var + 1e-6) for v in values]
            rows.append(values)
    reference = torch.tensor(rows, dtype=torch.float32).reshape(n, masked.shape[1], -1)
    prediction = target.head(decoded)
    expected = ((prediction - reference) ** 2).mean()
    torch.testing.assert_close(bound.loss, expected, atol=1e-5, rtol=1e-5)


def test_pixel_figure_is_zero_for_a_position_only_predictor():
    n, p, size, q = 64, 4, 16, 8
    grid = (size // p) ** 2
    run = RunContext(decoder_dim=3 * p * p, patch_size=p)
    target = PixelTarget(PixelTargetConfig(weight=1.0, norm_pix=False), run)
    identity_head(target)
    g = torch.Generator().manual_seed(3)
    mean_image = 3 * torch.randn(3, size, size, generator=g)
    images = mean_image + torch.randn(n, 3, size, size, generator=g)
    patch_means = torch.tensor(brute_force_patches(mean_image, p))  # (grid, 48)
    masked = torch.stack([torch.randperm(grid, generator=g)[:q] for _ in range(n)])
    decoded = {"masked": patch_means[masked]}
    ctx = StepContext(image_batch(images), make_streams(n, grid, seed=3), p, masked, decoded)
    assert abs(target(ctx).mi.item()) < 0.1
