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


def nt_xent(z0: torch.Tensor, z1: torch.Tensor, temperature: float) -> Bound:
    """SimCLR's NT-Xent: each of the 2N embeddings against the other 2N - 1.

    z0[i] and z1[i] are the two views of sample i; both sets are L2-normalised here.
    """
    n = z0.shape[0]
    z = F.normalize(torch.cat([z0, z1]), dim=-1)
    logits = z @ z.t() / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), -torch.inf)
    labels = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    loss = F.cross_entropy(logits, labels)
    return Bound(loss, math.log(max(2 * n - 1, 1)) - loss.detach())


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
