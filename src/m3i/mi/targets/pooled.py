"""The pooled-view targets' shared part (BYOL, MoCo v3): projector, predictor, EMA projector,
both directions, the pooling (token mean or class token), and the checks that their BatchNorm
has a batch to normalise over and that a class token is there to read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from m3i.data.mixing import count_a
from m3i.mi.posteriors import LossAndMI
from m3i.mi.targets.base import StepContext, Stream, Target, TargetConfig, mean_loss_and_mi
from m3i.models.backbone import family_for
from m3i.models.ema import MomentumTeacher
from m3i.ranges import COUNT, one_of, ranged

POOLS = ("mean", "cls")  # the values of targets.<pooled-view target>.pool


@dataclass
class PooledViewConfig(TargetConfig):
    # the published widths of both papers' projector and predictor (MoCo v3 for ViTs, BYOL)
    embed_dim: int = ranged(256, COUNT)  # output of projector and predictor
    hidden_dim: int = ranged(4096, COUNT)  # hidden width of projector and predictor
    # what a view's features are: "mean" of its tokens (BYOL's global average pooling) or the
    # "cls" token after the final norm (MoCo v3 on a ViT), for the student and the EMA network
    pool: str = one_of("mean", POOLS)


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

    def __init__(
        self, weight: float, projector: nn.Module, predictor: nn.Module, pool: str = "mean"
    ):
        super().__init__(weight)
        self.projector, self.predictor = projector, predictor
        self.pool = pool
        self.teacher_projector = MomentumTeacher(projector, batch_statistics=True)

    def momentum_update(self, momentum: float) -> None:
        self.teacher_projector.update(self.projector, momentum)

    def direction(
        self, query: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor, measure: bool
    ) -> LossAndMI:
        """The posterior of one direction: query (N, E) predictions, keys (N, E) the EMA
        projections of the other view in batch order, rows (N,) the key row of each query;
        `measure`: whether to compute a costly information estimate (StepContext.measure)."""
        raise NotImplementedError

    def features(self, stream: Stream) -> torch.Tensor:
        """A stream's pooled features: the mean of each image's tokens, or its class token."""
        return stream.class_token if self.pool == "cls" else stream.pooled

    def forward(self, ctx: StepContext) -> LossAndMI:
        cls = self.pool == "cls"
        teacher = ctx.teacher_class_token if cls else ctx.teacher_pooled
        student = ctx.student_class_token if cls else ctx.student_pooled
        k1, k2 = (self.teacher_projector(teacher[v]) for v in ("view1", "view2"))
        first = mean_loss_and_mi(
            [
                self.direction(
                    self.predictor(self.projector(self.features(s))), k2, s.samples, ctx.measure
                )
                for s in ctx.streams.values()
            ]
        )
        q2 = self.predictor(self.projector(student["view2"]))
        rows = torch.arange(len(q2), device=q2.device)
        second = self.direction(q2, k1, rows, ctx.measure)
        both = mean_loss_and_mi([first, second])  # the figure and its standard error
        return LossAndMI(first.loss + second.loss, both.mi, both.se)


def check_config(section: PooledViewConfig, cfg: Any, name: str) -> str | None:
    """BatchNorm over one image normalises it to zero: at least two images per micro-batch.
    A class token to pool with: a backbone family that has one, and each image of a mix
    isolated (one sequence over both images would give them one class token)."""
    if section.weight == 0:
        return None
    micro_batch = cfg.train.batch_size // cfg.train.accum_steps
    if micro_batch < 2:
        return (
            f"targets.{name} normalises its projector with BatchNorm over the batch: it needs "
            f"at least 2 images per micro-batch (train.batch_size / accum_steps), got "
            f"{micro_batch}"
        )
    if section.pool != "cls":
        return None
    try:
        has_class_token = family_for(cfg.model.name).has_class_token
    except ValueError:  # the model's own check names a bad model.name
        return None
    if not has_class_token:
        return (
            f"targets.{name}.pool=cls reads the class token, and model.name "
            f"{cfg.model.name!r} has none; set targets.{name}.pool=mean"
        )
    grid = (cfg.model.img_size // cfg.model.patch_size) ** 2
    if not cfg.mix.isolate and count_a(cfg.mix.ratio, grid) < grid:
        return (
            f"targets.{name}.pool=cls reads each image's class token, and with mix.isolate=false "
            f"the two images of a mix share one; set mix.isolate=true (or mix.ratio=1, or "
            f"targets.{name}.pool=mean)"
        )
    return None
