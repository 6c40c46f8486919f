"""BYOL's target: each view's prediction regresses the EMA projection of the other."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from m3i.mi.posteriors import LossAndMI, normalised_l2
from m3i.mi.targets.base import RunContext
from m3i.mi.targets.pooled import PooledViewConfig, PooledViewTarget, check_config
from m3i.mi.targets.registry import TargetSpec, register
from m3i.models.heads import batchnorm_mlp


@dataclass
class ViewRegressTargetConfig(PooledViewConfig):
    """BYOL's projector and predictor sizes (its loss has no temperature)."""


class ViewRegressTarget(PooledViewTarget):
    """BYOL: 2 - 2 cos(prediction, EMA projection of the other view), the normalised L2.

    Projector and predictor: Linear -> BatchNorm -> ReLU -> Linear (BYOL's MLP). Information:
    the Gaussian posterior's figure on the normalised vectors (`gaussian`).
    """

    def __init__(self, cfg: ViewRegressTargetConfig, run: RunContext) -> None:
        hidden, out = cfg.hidden_dim, cfg.embed_dim
        projector = batchnorm_mlp([run.encoder_dim, hidden, out], last_batchnorm=False)
        predictor = batchnorm_mlp([out, hidden, out], last_batchnorm=False)
        super().__init__(cfg.weight, projector, predictor, cfg.pool)

    def direction(
        self, query: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor, measure: bool
    ) -> LossAndMI:
        return normalised_l2(query, keys[rows], measure)


SPEC = register(
    TargetSpec(
        "view_regress",
        ViewRegressTargetConfig,
        ViewRegressTarget,
        "estimate",
        check_config=partial(check_config, name="view_regress"),
    )
)
