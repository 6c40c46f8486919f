"""Training a small head on frozen inputs: the one loop every probe shares."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def fit_head(
    head: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable,
    *,
    lr: float,
    epochs: int,
    batch_size: int,
    weight_decay: float,
    seed: int = 0,
    prepare: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
) -> nn.Module:
    """AdamW with a cosine schedule over `epochs` of seeded mini-batches; the loss of a batch is
    `loss_fn(head(prepare(inputs[index])), targets[index])`. Returns the head in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    per_epoch = -(-inputs.shape[0] // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * per_epoch)
    head.train()
    for _ in range(epochs):
        order = torch.randperm(inputs.shape[0], generator=generator)
        for start in range(0, inputs.shape[0], batch_size):
            index = order[start : start + batch_size]
            loss = loss_fn(head(prepare(inputs[index])), targets[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return head.eval()
