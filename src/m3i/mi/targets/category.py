"""The supervised target: a Boltzmann posterior over learned class embeddings."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from m3i.mi.posteriors import Bound, boltzmann
from m3i.mi.targets.base import RunContext, StepContext, Target, TargetConfig, zero_bound
from m3i.mi.targets.registry import DataInfo, TargetSpec, register
from m3i.models.heads import mlp_head
from m3i.ranges import COUNT, Range, ranged

log = logging.getLogger("m3i.train")


@dataclass
class CategoryTargetConfig(TargetConfig):
    hidden_dim: int = ranged(256, Range(0, note="0: a linear head"))  # MLP head hidden width
    embed_dim: int = ranged(128, COUNT)  # dimension of the learned class embeddings


class CategoryTarget(Target):
    """Supervised: Boltzmann over learned class embeddings, for every labelled image.

    Its figure is H(Y) - CE, a lower bound, with H(Y) the entropy of `run.label_prior` (the
    training set's class frequencies; uniform when not given, H(Y) = log C)."""

    def __init__(self, cfg: CategoryTargetConfig, run: RunContext) -> None:
        super().__init__(cfg.weight)
        num_classes = run.num_classes
        self.head = mlp_head(run.encoder_dim, cfg.hidden_dim, cfg.embed_dim)
        self.class_embedding = nn.Parameter(torch.randn(num_classes, cfg.embed_dim) * 0.02)
        prior = run.label_prior
        prior = torch.ones(num_classes) / num_classes if prior is None else prior
        if prior.shape != (num_classes,) or (prior < 0).any() or abs(prior.sum() - 1) > 1e-4:
            raise ValueError(
                f"label_prior must hold {num_classes} non-negative class frequencies summing "
                f"to 1; got shape {tuple(prior.shape)}, sum {prior.sum().item():.4g}"
            )
        self.label_entropy = float(-torch.special.xlogy(prior, prior).sum())  # H(Y), nats

    def logits(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.head(pooled) @ self.class_embedding.t()

    def forward(self, ctx: StepContext) -> Bound:
        """Cross-entropy and H(Y) - CE over the labelled images of the batch only (no labelled
        image: no gradient and a NaN figure, which the log writes as null)."""
        logits = torch.cat([self.logits(s.pooled) for s in ctx.streams.values()])
        labels = torch.cat([ctx.batch.labels[s.samples] for s in ctx.streams.values()])
        labelled = labels >= 0
        if not labelled.any():
            return zero_bound(logits)
        return boltzmann(logits[labelled], labels[labelled], self.label_entropy)


def check_data(cfg: Any, data: DataInfo) -> str | None:
    """Refuse data without labels."""
    if not data.classes or data.label_prior is None:
        return (
            f"targets.category needs labels, and no sample of data {data.spec!r} has one; "
            "set targets.category.weight=0 or add labelled data (e.g. --data folder:PATH)"
        )
    return None


def prepare(cfg: Any, data: DataInfo) -> dict[str, Any]:
    """The label prior: the class frequencies of the labelled samples as the run draws them."""
    if len(data.classes) == 1:
        log.warning(
            "data %r has one class: targets.category can learn nothing (its loss is always "
            "0); set targets.category.weight=0 or use data with two classes or more",
            data.spec,
        )
    return {"label_prior": data.label_prior}


SPEC = register(
    TargetSpec(
        "category",
        CategoryTargetConfig,
        CategoryTarget,
        "lower bound",
        check_data=check_data,
        prepare=prepare,
    )
)
