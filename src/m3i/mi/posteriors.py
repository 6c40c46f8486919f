"""The two posterior families of the MI lower bound: each returns the loss and the bound in nats.

    I(z_x; z_y) >= H(z_y) + E[log p(z_y | z_x)]

Boltzmann: p is a softmax over a candidate set C; the loss is the cross-entropy and
log|C| - loss is a lower bound on the mutual information (the InfoNCE bound).
Gaussian: p = N(z_y; zhat_y, sigma^2 I); the loss is the mean squared error. With the
error variance fitted per dimension, the bound is sum_d 0.5 * log(Var[z_y,d] / MSE_d),
exact when z_y is Gaussian and an estimate otherwise (H(z_y) is taken as the entropy of a
Gaussian with the targets' variance).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Bound:
    """A target's loss (to minimise) and its mutual-information bound in nats.

    Boltzmann: a true lower bound. Gaussian: an estimate of one (see the module docstring)."""

    loss: torch.Tensor
    mi: torch.Tensor


def boltzmann(logits: torch.Tensor, labels: torch.Tensor) -> Bound:
    """Softmax cross-entropy over the candidates in the last dimension of `logits`."""
    loss = F.cross_entropy(logits, labels)
    return Bound(loss, math.log(logits.shape[-1]) - loss.detach())


def symmetric_infonce(logits: torch.Tensor) -> Bound:
    """CLIP's loss: row i's positive is column i, averaged over both directions."""
    labels = torch.arange(logits.shape[0], device=logits.device)
    rows, cols = boltzmann(logits, labels), boltzmann(logits.t(), labels)
    return Bound((rows.loss + cols.loss) / 2, (rows.mi + cols.mi) / 2)


def query_key_infonce(
    queries: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor, temperature: float
) -> Bound:
    """MoCo v3's contrastive loss: each query against all K keys, its own key at `positives`.

    Both sets are L2-normalised here; logits q.k / temperature. The loss is MoCo v3's
    2 * temperature * cross-entropy; the bound is log K - cross-entropy (InfoNCE).
    """
    q, k = F.normalize(queries, dim=-1), F.normalize(keys, dim=-1)
    cross_entropy = F.cross_entropy(q @ k.t() / temperature, positives)
    mi = math.log(keys.shape[0]) - cross_entropy.detach()
    return Bound(2 * temperature * cross_entropy, mi)


def gaussian(prediction: torch.Tensor, target: torch.Tensor) -> Bound:
    """L2 regression onto `target` (rows are samples, the last dimension is the vector)."""
    prediction = prediction.reshape(-1, prediction.shape[-1])
    target = target.reshape(-1, target.shape[-1]).to(prediction.dtype)
    loss = F.mse_loss(prediction, target)
    with torch.no_grad():
        if target.shape[0] < 2:
            mi = torch.zeros((), device=target.device)
        else:
            error = (prediction - target).pow(2).mean(0).clamp_min(1e-8)
            variance = target.var(0, unbiased=False).clamp_min(1e-8)
            mi = 0.5 * torch.log(variance / error).sum()
    return Bound(loss, mi)


def normalised_l2(prediction: torch.Tensor, target: torch.Tensor) -> Bound:
    """BYOL's regression: 2 - 2 cos(prediction, target), a Gaussian on the unit sphere."""
    p, t = F.normalize(prediction, dim=-1), F.normalize(target, dim=-1)
    loss = (2 - 2 * (p * t).sum(-1)).mean()
    bound = gaussian(p, t)
    return Bound(loss, bound.mi)
