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
    """A frozen copy of a module, updated as ema <- m * ema + (1 - m) * student, no gradient."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.module = copy.deepcopy(student)
        self.module.requires_grad_(False)
        self.module.eval()

    def train(self, mode: bool = True) -> MomentumTeacher:
        """The teacher always runs in eval mode (no drop path, no dropout)."""
        return super().train(False)

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float) -> None:
        ema_params = list(self.module.parameters())
        student_params = [p.detach() for p in student.parameters()]
        if momentum < 1.0:
            torch._foreach_lerp_(ema_params, student_params, 1.0 - momentum)
        for ema_buf, buf in zip(self.module.buffers(), student.buffers(), strict=True):
            ema_buf.copy_(buf)

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)
