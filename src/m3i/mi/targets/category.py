"""The supervised target: a Boltzmann posterior over learned class embeddings."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from m3i.mi.posteriors import LossAndMI, boltzmann
from m3i.mi.targets.base import RunContext, StepContext, Target, TargetConfig, no_samples
from m3i.mi.targets.registry import DataInfo, TargetSpec, register
from m3i.models.heads import HEADS, mlp_head
from m3i.ranges import COUNT, Range, one_of, ranged

log = logging.getLogger("m3i.train")


@dataclass
class CategoryTargetConfig(TargetConfig):
    # "mlp": an MLP head maps the pooled features to the class embeddings' space (M3I's GAP/MLP
    # head); "linear": timm's classifier on the pooled features, logits = W p + b, the rows of
    # W the learned class embeddings (in the encoder's width), b a learned bias per class
    head: str = one_of("mlp", HEADS)
    hidden_dim: int = ranged(256, Range(1, note="no hidden layer: head=linear"))  # head=mlp
    embed_dim: int = ranged(128, COUNT)  # dimension of the learned class embeddings (head=mlp)


class CategoryTarget(Target):
    """Supervised: Boltzmann over learned class embeddings, for every labelled image.

    Its figure is H(Y) - CE, a lower bound, with H(Y) the entropy of `run.label_prior` (the
    training set's class frequencies; uniform when not given, H(Y) = log C). The logits are
    head(pooled) @ class_embedding.T (+ class_bias with head=linear, whose head is the
    identity: timm's `nn.Linear` classifier, weight = the class embeddings)."""

    def __init__(self, cfg: CategoryTargetConfig, run: RunContext) -> None:
        super().__init__(cfg.weight)
        num_classes = run.num_classes
        self.class_bias: nn.Parameter | None = None
        if cfg.head == "linear":
            self.head, dim = nn.Identity(), run.encoder_dim
            self.class_bias = nn.Parameter(torch.zeros(num_classes))
        else:
            self.head, dim = mlp_head(run.encoder_dim, cfg.hidden_dim, cfg.embed_dim), cfg.embed_dim
        self.class_embedding = nn.Parameter(torch.randn(num_classes, dim) * 0.02)
        prior = run.label_prior
        prior = torch.ones(num_classes) / num_classes if prior is None else prior
        if prior.shape != (num_classes,) or (prior < 0).any() or abs(prior.sum() - 1) > 1e-4:
            raise ValueError(
                f"label_prior must hold {num_classes} non-negative class frequencies summing "
                f"to 1; got shape {tuple(prior.shape)}, sum {prior.sum().item():.4g}"
            )
        self.label_entropy = float(-torch.special.xlogy(prior, prior).sum())  # H(Y), nats

    def logits(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.linear(self.head(pooled), self.class_embedding, self.class_bias)

    def forward(self, ctx: StepContext) -> LossAndMI:
        """Cross-entropy and H(Y) - CE over the labelled images of the batch only (no labelled
        image: no gradient and a NaN figure, which the log writes as null)."""
        logits = torch.cat([self.logits(s.pooled) for s in ctx.streams.values()])
        labels = torch.cat([ctx.batch.labels[s.samples] for s in ctx.streams.values()])
        labelled = labels >= 0
        if not labelled.any():
            return no_samples(logits)
        return boltzmann(logits[labelled], labels[labelled], self.label_entropy)


def check_config(section: CategoryTargetConfig, cfg: Any) -> str | None:
    if section.head not in HEADS:
        return f"targets.category.head must be {' or '.join(HEADS)}, got {section.head!r}"
    return None


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
        check_config=check_config,
        check_data=check_data,
        prepare=prepare,
    )
)
