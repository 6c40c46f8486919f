"""The pooled-view targets' shared part (BYOL, MoCo v3): projector, predictor, EMA projector,
both directions, and the check that their BatchNorm has a batch to normalise over."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from m3i.mi.posteriors import Bound
from m3i.mi.targets.base import StepContext, Target, TargetConfig, mean_bound
from m3i.models.ema import MomentumTeacher
from m3i.ranges import COUNT, ranged


@dataclass
class PooledViewConfig(TargetConfig):
    embed_dim: int = ranged(128, COUNT)  # output of projector and predictor (both papers: 256)
    hidden_dim: int = ranged(256, COUNT)  # hidden width of projector and predictor (4096)


class PooledViewTarget(Target):
    """BYOL / MoCo v3: a view's pooled student features, through a projector and a predictor,
    predict the EMA network's projection of the other view, in both directions.

    Direction 1: every image of the mixed input (view 1) against the EMA projection of its
    view 2; direction 2: the student's encoding of the whole view 2 against the EMA projection of
    view 1. With mix.ratio 1 (the byol and moco presets) that is the methods' L(q1, k2) +
    L(q2, k1); with a mix of two images, direction 1 averages over them. The loss is the sum
    of the two directions (as both papers), the information the mean of their figures.
    Projector and predictor take each view's batch on its own, so their BatchNorm statistics
    are per view, as in both methods; the EMA projector normalises with batch statistics too.
    """

    pooled_teacher = ("view1", "view2")
    pooled_student = "view2"

    def __init__(self, weight: float, projector: nn.Module, predictor: nn.Module):
        super().__init__(weight)
        self.projector, self.predictor = projector, predictor
        self.teacher_projector = MomentumTeacher(projector, batch_statistics=True)

    def momentum_update(self, momentum: float) -> None:
        self.teacher_projector.update(self.projector, momentum)

    def direction(
        self, query: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor, measure: bool
    ) -> Bound:
        """The posterior of one direction: query (N, E) predictions, keys (N, E) the EMA
        projections of the other view in batch order, rows (N,) the key row of each query;
        `measure`: whether to compute a costly information estimate (StepContext.measure)."""
        raise NotImplementedError

    def forward(self, ctx: StepContext) -> Bound:
        k1, k2 = (self.teacher_projector(ctx.teacher_pooled[v]) for v in ("view1", "view2"))
        first = mean_bound(
            [
                self.direction(self.predictor(self.projector(s.pooled)), k2, s.samples, ctx.measure)
                for s in ctx.streams.values()
            ]
        )
        q2 = self.predictor(self.projector(ctx.student_pooled["view2"]))
        rows = torch.arange(len(q2), device=q2.device)
        second = self.direction(q2, k1, rows, ctx.measure)
        # the directions read the same images: the mean's error is at most the mean error
        se = None if first.se is None else (first.se + second.se) / 2
        return Bound(first.loss + second.loss, (first.mi + second.mi) / 2, se)


def check_batch_norm(section: PooledViewConfig, cfg: Any, name: str) -> str | None:
    """BatchNorm over one image normalises it to zero: at least two images per micro-batch."""
    micro_batch = cfg.train.batch_size // cfg.train.accum_steps
    if section.weight != 0 and micro_batch < 2:
        return (
            f"targets.{name} normalises its projector with BatchNorm over the batch: it needs "
            f"at least 2 images per micro-batch (train.batch_size / accum_steps), got "
            f"{micro_batch}"
        )
    return None
