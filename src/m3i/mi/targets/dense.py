"""The dense teacher targets: the decoder's queries regress EMA-teacher tokens, of image A's own
view where image B sat (intra_view, data2vec) or of a different view (inter_view, SiameseIM)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from m3i.data.mixing import gather_tokens
from m3i.mi.posteriors import LossAndMI, gaussian
from m3i.mi.targets.base import RunContext, StepContext, Target, TargetConfig, row_images
from m3i.mi.targets.registry import TargetSpec, register
from m3i.ranges import COUNT, Range, one_of, ranged
from m3i.runtime import sum_over_ranks

NORMS = ("layer", "instance")  # the values of targets.<dense target>.norm


@dataclass
class DenseTargetConfig(TargetConfig):
    # "layer": the teacher's last-layer tokens, LayerNorm'd without affine (M3I, SiameseIM);
    # "instance": data2vec 2.0's target, the average of the MLP outputs of the teacher's top
    # `layers` blocks, each instance-normalised over the view's tokens, then LayerNorm'd
    norm: str = one_of("layer", NORMS)
    # top blocks averaged by norm=instance (all of them when the model has fewer)
    layers: int = ranged(1, COUNT)
    # weight of SiameseIM's decorrelation term (its neg_weight)
    decorrelation: float = ranged(0.0, Range(0, note="0: off"))


def data2vec_target(layers: list[torch.Tensor]) -> torch.Tensor:
    """data2vec 2.0's image target from block outputs (N, P, D): each instance-normalised (per
    sample and channel, over the P tokens), averaged, then LayerNorm'd without affine."""
    normed = [F.instance_norm(x.float().transpose(1, 2)).transpose(1, 2) for x in layers]
    average = torch.stack(normed).mean(dim=0)
    return F.layer_norm(average, average.shape[-1:])


def decorrelation_term(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SiameseIM's decorrelation (negative) term: the mean over tokens of p^T C p, where
    C = sum_t t t^T / n is the correlation of the targets over the n tokens of the global batch
    (summed over ranks, then divided by the total count), a constant of this batch.

    prediction, target: (..., D); the last dimension is the token vector.
    """
    dim = prediction.shape[-1]
    with torch.autocast(prediction.device.type, enabled=False):
        p = prediction.reshape(-1, dim).float()
        with torch.no_grad():
            t = target.reshape(-1, dim).float()
            sums = sum_over_ranks(torch.cat([(t.t() @ t).flatten(), t.new_tensor([len(t)])]))
            correlation = sums[:-1].reshape(dim, dim) / sums[-1]
        return ((p @ correlation) * p).sum(dim=-1).mean()


class DenseTeacherTarget(Target):
    """Gaussian regression of the decoder's query outputs onto EMA-teacher tokens: LayerNorm'd
    last-layer tokens (norm=layer) or data2vec 2.0's target (norm=instance); with
    `decorrelation` > 0, SiameseIM's loss (pos + w * neg) / D, pos/D being the Gaussian's MSE.
    The figure is the Gaussian-channel estimate given each query's grid position."""

    def __init__(self, cfg: DenseTargetConfig, run: RunContext) -> None:
        super().__init__(cfg.weight)
        self.teacher_layers = cfg.layers if cfg.norm == "instance" else 0
        out = run.encoder_dim if self.teacher_layers else run.dense_dim or run.encoder_dim
        self.head = nn.Linear(run.decoder_dim, out)
        self.decorrelation = cfg.decorrelation

    def teacher_tokens(self, ctx: StepContext) -> torch.Tensor:
        """The target tokens of the whole teacher view, (N, P, D) in batch order."""
        if self.teacher_layers:
            return data2vec_target(ctx.teacher_layers[self.teacher][-self.teacher_layers :])
        return ctx.teacher_dense[self.teacher]

    def num_positions(self, ctx: StepContext) -> int:
        """P, the grid positions of the teacher's view."""
        tokens = ctx.teacher_layers.get(self.teacher) or [ctx.teacher_dense[self.teacher]]
        return tokens[-1].shape[1]

    def target_tokens(self, ctx: StepContext) -> torch.Tensor:
        raise NotImplementedError

    def query_positions(self, ctx: StepContext) -> torch.Tensor:
        """(N, Q) grid position of each query in its target view."""
        raise NotImplementedError

    def forward(self, ctx: StepContext) -> LossAndMI:
        prediction = self.head(ctx.decoded[self.queries])
        target = self.target_tokens(ctx)
        positions = self.query_positions(ctx)
        bound = gaussian(
            prediction,
            target,
            positions,
            self.num_positions(ctx),
            ctx.measure,
            images=row_images(positions),
        )
        if not self.decorrelation:
            return bound
        negative = decorrelation_term(prediction, target) / prediction.shape[-1]
        return LossAndMI(bound.loss + self.decorrelation * negative, bound.mi, bound.se)


class IntraViewTarget(DenseTeacherTarget):
    """Image A predicts the teacher's features of its own view where image B sat (data2vec)."""

    stream, queries, teacher = "a", "masked", "view1"

    def target_tokens(self, ctx: StepContext) -> torch.Tensor:
        tokens = self.teacher_tokens(ctx)[ctx.streams["a"].samples]
        return gather_tokens(tokens, ctx.masked_positions)

    def query_positions(self, ctx: StepContext) -> torch.Tensor:
        return ctx.masked_positions


class InterViewTarget(DenseTeacherTarget):
    """Image B predicts the teacher's features of a different view, densely (SiameseIM)."""

    stream, queries, teacher = "b", "other_view", "view2"

    def target_tokens(self, ctx: StepContext) -> torch.Tensor:
        return self.teacher_tokens(ctx)[ctx.streams["b"].samples]

    def query_positions(self, ctx: StepContext) -> torch.Tensor:
        n, grid = len(ctx.streams["b"].samples), self.num_positions(ctx)
        return torch.arange(grid, device=ctx.streams["b"].samples.device).expand(n, grid)


def check_config(dense: DenseTargetConfig, cfg: Any, name: str) -> str | None:
    """The teacher target's normalisation and the blocks it averages."""
    if dense.norm != "instance" and dense.layers != 1:
        return (
            f"targets.{name}.layers={dense.layers} needs norm=instance (norm=layer "
            "regresses the last layer only)"
        )
    return None


INTRA_VIEW = register(
    TargetSpec(
        "intra_view",
        DenseTargetConfig,
        IntraViewTarget,
        "estimate",
        check_config=partial(check_config, name="intra_view"),
    )
)
INTER_VIEW = register(
    TargetSpec(
        "inter_view",
        DenseTargetConfig,
        InterViewTarget,
        "estimate",
        check_config=partial(check_config, name="inter_view"),
    )
)
