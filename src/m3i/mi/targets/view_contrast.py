"""MoCo v3's target: InfoNCE of each view's prediction against the EMA keys of the other."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from m3i import runtime
from m3i.mi.posteriors import LossAndMI, query_key_infonce
from m3i.mi.targets.base import RunContext
from m3i.mi.targets.pooled import PooledViewConfig, PooledViewTarget, check_config
from m3i.mi.targets.registry import TargetSpec, register
from m3i.models.heads import batchnorm_mlp
from m3i.ranges import POSITIVE, ranged


@dataclass
class ViewContrastTargetConfig(PooledViewConfig):
    # MoCo v3's for ViTs; the loss is 2 * temperature * cross-entropy
    temperature: float = ranged(0.2, POSITIVE)


class ViewContrastTarget(PooledViewTarget):
    """MoCo v3: InfoNCE of each query against the EMA keys of the global batch, 2*tau scaled.

    Projector: 3-layer MLP with BatchNorm, the last without affine (MoCo v3 for ViTs);
    predictor: 2-layer MLP, the same. Keys are gathered from all ranks without gradient; the
    positive of this rank's query i is key rank * N + i. Information: log K - cross-entropy.
    """

    def __init__(self, cfg: ViewContrastTargetConfig, run: RunContext) -> None:
        hidden, out = cfg.hidden_dim, cfg.embed_dim
        projector = batchnorm_mlp([run.encoder_dim, hidden, hidden, out], last_batchnorm=True)
        predictor = batchnorm_mlp([out, hidden, out], last_batchnorm=True)
        super().__init__(cfg.weight, projector, predictor, cfg.pool)
        self.temperature = cfg.temperature

    def direction(
        self, query: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor, measure: bool
    ) -> LossAndMI:
        positives = runtime.rank() * len(keys) + rows
        return query_key_infonce(query, runtime.gather(keys), positives, self.temperature)


SPEC = register(
    TargetSpec(
        "view_contrast",
        ViewContrastTargetConfig,
        ViewContrastTarget,
        "lower bound",
        check_config=partial(check_config, name="view_contrast"),
    )
)
