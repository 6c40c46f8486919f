"""The pixel target: MAE's regression onto normalised pixels at image A's hidden patches."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from m3i.data.mixing import gather_tokens
from m3i.mi.posteriors import LossAndMI, gaussian
from m3i.mi.targets.base import RunContext, StepContext, Target, TargetConfig, row_images
from m3i.mi.targets.registry import TargetSpec, register


@dataclass
class PixelTargetConfig(TargetConfig):
    norm_pix: bool = True  # per-patch normalised pixels, as MAE


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, P, patch_size**2 * C), row-major patches, (p, q, c) inside each."""
    n, c, h, w = images.shape
    x = images.reshape(n, c, h // patch_size, patch_size, w // patch_size, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // patch_size) * (w // patch_size), -1)


class PixelTarget(Target):
    """MAE: Gaussian regression onto per-patch normalised pixels at A's hidden positions; the
    figure is the Gaussian-channel estimate given each hidden patch's grid position."""

    stream, queries = "a", "masked"

    def __init__(self, cfg: PixelTargetConfig, run: RunContext) -> None:
        super().__init__(cfg.weight)
        self.norm_pix = cfg.norm_pix
        self.head = nn.Linear(run.decoder_dim, run.patch_size * run.patch_size * 3)

    def forward(self, ctx: StepContext) -> LossAndMI:
        images = ctx.batch.views[0].image[ctx.streams["a"].samples]
        patches = patchify(images, ctx.patch_size)
        target = gather_tokens(patches, ctx.masked_positions)
        if self.norm_pix:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        prediction = self.head(ctx.decoded["masked"])
        positions = ctx.masked_positions
        images = row_images(positions)
        return gaussian(prediction, target, positions, patches.shape[1], ctx.measure, images)


SPEC = register(TargetSpec("pixels", PixelTargetConfig, PixelTarget, "estimate"))
