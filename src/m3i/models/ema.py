"""The momentum (EMA) teacher and its cosine momentum schedule."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def momentum_at(step: int, total_steps: int, base: float, final: float) -> float:
    """Cosine schedule from `base` at step 0 to `final` at `total_steps` (BYOL, DINO)."""
    if total_steps <= 0:
        return final
    progress = min(max(step / total_steps, 0.0), 1.0)
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2


class MomentumTeacher(nn.Module):
    """A frozen copy of a module, updated as ema <- m * ema + (1 - m) * student, no gradient.

    With `batch_statistics`, the copy's BatchNorm layers normalise with the statistics of the
    batch they are given, as BYOL's and MoCo v3's target networks do (those run in training
    mode); their running statistics are never read and are overwritten by the student's at
    each update. Every other layer runs in eval mode.
    """

    def __init__(self, student: nn.Module, batch_statistics: bool = False) -> None:
        super().__init__()
        self.batch_statistics = batch_statistics
        self.module = copy.deepcopy(student)
        self.module.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> MomentumTeacher:
        """The teacher always runs in eval mode (no drop path, no dropout), but for its
        BatchNorm layers when `batch_statistics` is set."""
        super().train(False)
        if self.batch_statistics:
            for module in self.module.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.train(True)
        return self

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float) -> None:
        """One multi-tensor lerp over all parameters (one fused kernel per device and dtype on
        CUDA) and one multi-tensor copy of the buffers: no per-tensor Python loop."""
        ema_params, params = list(self.module.parameters()), list(student.parameters())
        ema_buffers, buffers = list(self.module.buffers()), list(student.buffers())
        if (len(ema_params), len(ema_buffers)) != (len(params), len(buffers)):
            raise ValueError(
                f"the teacher holds {len(ema_params)} parameters and {len(ema_buffers)} buffers, "
                f"the student {len(params)} and {len(buffers)}; the teacher must be its copy"
            )
        if momentum < 1.0:
            torch._foreach_lerp_(ema_params, params, 1.0 - momentum)
        if buffers:
            torch._foreach_copy_(ema_buffers, buffers)

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)
