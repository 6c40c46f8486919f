"""The momentum (EMA) teacher and its momentum schedule (`teacher.*`)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from m3i.ranges import PROBABILITY, Range, one_of, ranged

SCHEDULES = ("cosine", "linear")  # the values of teacher.schedule


def momentum_at(step: int, total_steps: int, base: float, final: float) -> float:
    """Cosine schedule from `base` at step 0 to `final` at `total_steps` (BYOL, DINO)."""
    if total_steps <= 0:
        return final
    progress = min(max(step / total_steps, 0.0), 1.0)
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2


def linear_momentum_at(step: int, total_steps: int, base: float, final: float) -> float:
    """Linear schedule from `base` at step 0 to `final` at `total_steps`, then `final`
    (data2vec 2.0's ema_decay -> ema_end_decay until ema_anneal_end_step)."""
    if total_steps <= 0 or step >= total_steps:
        return final
    return final - (final - base) * (1 - max(step, 0) / total_steps)


def scaled_to_run(momentum: float, reference_steps: int, steps: int) -> float:
    """A momentum published for a run of `reference_steps`, for a run of `steps`: the same
    averaging horizon 1 / (1 - m) as a share of the run, 1 - m' = (1 - m) * reference / steps
    (at most 1: m' >= 0)."""
    if not reference_steps or steps <= 0:
        return momentum
    return 1.0 - min(1.0, (1.0 - momentum) * reference_steps / steps)


@dataclass
class TeacherConfig:
    """The `teacher` section: the EMA momentum from `momentum` at step 0 to `momentum_final` at
    `anneal_steps` (0: the last step), on a cosine or linear `schedule`, then constant.
    With `reference_steps`, the momenta and anneal_steps are a published run's of that many
    steps and are scaled to this run's length (`scaled_to_run`, anneal_steps in proportion)."""

    momentum: float = ranged(0.995, PROBABILITY)  # EMA momentum at step 0
    momentum_final: float = ranged(1.0, PROBABILITY)  # reached at anneal_steps
    schedule: str = one_of("cosine", SCHEDULES)  # cosine (BYOL, SiameseIM) | linear (data2vec 2.0)
    anneal_steps: int = ranged(0, Range(0, note="0: the whole run"))
    reference_steps: int = ranged(0, Range(0, note="0: the momenta are for this run"))

    def momentum_at(self, step: int, total_steps: int) -> float:
        """The momentum of the EMA update after optimizer step `step` of `total_steps`."""
        base, final, span = self.momentum, self.momentum_final, self.anneal_steps or total_steps
        if self.reference_steps:
            base = scaled_to_run(base, self.reference_steps, total_steps)
            final = scaled_to_run(final, self.reference_steps, total_steps)
            if self.anneal_steps:
                span = max(1, round(self.anneal_steps * total_steps / self.reference_steps))
        schedule = linear_momentum_at if self.schedule == "linear" else momentum_at
        return schedule(step, span, base, final)


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
