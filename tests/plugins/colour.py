"""A new target in one file: each encoded image's pooled features predict the mean colour of
its view, a Gaussian target on 3 numbers (the worked example of docs/architecture.md)."""

from __future__ import annotations

from dataclasses import dataclass

from m3i.mi.posteriors import LossAndMI, gaussian
from m3i.mi.targets.base import RunContext, StepContext, Target, TargetConfig, mean_loss_and_mi
from m3i.mi.targets.registry import TargetSpec, register
from m3i.models.heads import mlp_head
from m3i.ranges import Range, ranged


@dataclass
class ColourTargetConfig(TargetConfig):
    hidden_dim: int = ranged(32, Range(0, note="0: a linear head"))


class ColourTarget(Target):
    """Mean RGB of the whole view 1 of each image, regressed from its pooled tokens."""

    stream = "pooled"  # the pooled tokens of every encoded image (base.py lists what to read)

    def __init__(self, cfg: ColourTargetConfig, run: RunContext) -> None:
        super().__init__(cfg.weight)
        self.head = mlp_head(run.encoder_dim, cfg.hidden_dim, 3)

    def forward(self, ctx: StepContext) -> LossAndMI:
        colours = ctx.batch.views[0].image.mean(dim=(2, 3))  # (N, 3)
        return mean_loss_and_mi(
            [
                gaussian(self.head(s.pooled), colours[s.samples], measure=ctx.measure)
                for s in ctx.streams.values()
            ]
        )


SPEC = register(TargetSpec("colour", ColourTargetConfig, ColourTarget, "estimate"))
