"""Linear probe on frozen features: standardise, sweep learning rates on a held-out part of
train, retrain the best on all of train, report val accuracy."""

from __future__ import annotations

import torch
from torch import nn

from m3i.eval.knn import topk_accuracy
from m3i.eval.probe import fit_head
from m3i.eval.settings import LinearSettings


def standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Scale every feature to zero mean, unit variance using train statistics."""
    mean, std = train.mean(dim=0), train.std(dim=0).clamp_min(1e-6)
    return [(x - mean) / std for x in (train, *others)]


def fit_linear(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    lr: float,
    settings: LinearSettings,
    seed: int = 0,
) -> nn.Linear:
    """AdamW on cross-entropy with a cosine schedule, mini-batches in a seeded order."""
    torch.manual_seed(seed)
    head = nn.Linear(features.shape[1], num_classes)
    return fit_head(
        head, features, labels, nn.functional.cross_entropy, lr=lr, epochs=settings.epochs,
        batch_size=settings.batch_size, weight_decay=settings.weight_decay, seed=seed,
    )  # fmt: skip


def linear_probe(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    val: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    settings: LinearSettings,
    seed: int = 0,
) -> dict[str, float]:
    """`top1`/`top5` on val and the chosen `lr`; the lr is picked on a held-out part of train."""
    train, val = standardise(train, val)
    order = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))
    held = max(1, int(round(settings.holdout * train.shape[0])))
    fit_index, held_index = order[held:], order[:held]
    best_lr, best = settings.lrs[0], -1.0
    for lr in settings.lrs:
        head = fit_linear(
            train[fit_index], train_labels[fit_index], num_classes, lr, settings, seed
        )
        with torch.no_grad():
            accuracy = topk_accuracy(head(train[held_index]), train_labels[held_index], (1,))
        if accuracy["top1"] > best:
            best_lr, best = lr, accuracy["top1"]
    head = fit_linear(train, train_labels, num_classes, best_lr, settings, seed)
    with torch.no_grad():
        result = topk_accuracy(head(val), val_labels)
    return {**result, "lr": best_lr, "holdout_top1": best}
