"""The two posterior families: each returns a target's loss and its information figure in nats.

    I(z_x; z_y) >= H(z_y) + E[log p(z_y | z_x)]

Boltzmann: p is a softmax over a candidate set C; the loss is the cross-entropy, and
H(Y) - loss is a lower bound on the mutual information: log|C| for a batch of candidates
(InfoNCE), the entropy of the class prior for classes (`boltzmann(..., label_entropy=)`).

Gaussian: p = N(z_y; zhat_y, sigma^2 I); the loss is the mean squared error. H(z_y) is not
known, so its figure is an ESTIMATE, not a bound: the Gaussian-channel information of one
token's D dimensions,

    0.5 * log det Sigma_y - 0.5 * log det Sigma_e

with Sigma_e the covariance of the prediction error and Sigma_y the covariance of the
targets after removing what the query position alone predicts (the per-position mean over the
batch). It is exact for jointly Gaussian targets and the optimal predictor, invariant to
rotations of the target space, and zero for a predictor that knows only positions. Each log
det is bias-corrected with the Wishart expectation (unbiased for independent Gaussian
tokens); the tokens of one image are not independent, so with `images=` the figure is the
jackknife over images, with its standard error (`m3i.mi.gaussian_channel`). Unless the tokens
outnumber D plus the positions, it is not estimable (NaN).
docs/information.md has the measurements.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from m3i.mi.gaussian_channel import gaussian_information


@dataclass
class LossAndMI:
    """A target's loss (to minimise) and its information figure `mi` in nats.

    Boltzmann posteriors (`boltzmann`, `symmetric_infonce`, `query_key_infonce`): `mi` is a
    lower bound on the mutual information. Gaussian posteriors (`gaussian`, `normalised_l2`):
    `mi` is the Gaussian-channel ESTIMATE (module docstring), not a bound, and NaN when the
    batch holds too few tokens to estimate it or when it was not asked for (`measure=False`).
    `se`: the figure's standard error where one is computed (the Gaussian estimates' jackknife
    over images), else None."""

    loss: torch.Tensor
    mi: torch.Tensor
    se: torch.Tensor | None = None


def boltzmann(
    logits: torch.Tensor, labels: torch.Tensor, label_entropy: float | None = None
) -> LossAndMI:
    """Softmax cross-entropy over the candidates in the last dimension of `logits`.

    The bound is H(Y) - CE with H(Y) = `label_entropy` (nats), the entropy of the labels'
    prior; without it log C, the entropy of C equally likely candidates (InfoNCE's case)."""
    loss = F.cross_entropy(logits, labels)
    entropy = math.log(logits.shape[-1]) if label_entropy is None else label_entropy
    return LossAndMI(loss, entropy - loss.detach())


def symmetric_infonce(logits: torch.Tensor) -> LossAndMI:
    """CLIP's loss: row i's positive is column i, averaged over both directions."""
    labels = torch.arange(logits.shape[0], device=logits.device)
    rows, cols = boltzmann(logits, labels), boltzmann(logits.t(), labels)
    return LossAndMI((rows.loss + cols.loss) / 2, (rows.mi + cols.mi) / 2)


def query_key_infonce(
    queries: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor, temperature: float
) -> LossAndMI:
    """MoCo v3's contrastive loss: each query against all K keys, its own key at `positives`.

    Both sets are L2-normalised here; logits q.k / temperature. The loss is MoCo v3's
    2 * temperature * cross-entropy; the bound is log K - cross-entropy (InfoNCE).
    """
    q, k = F.normalize(queries, dim=-1), F.normalize(keys, dim=-1)
    cross_entropy = F.cross_entropy(q @ k.t() / temperature, positives)
    mi = math.log(keys.shape[0]) - cross_entropy.detach()
    return LossAndMI(2 * temperature * cross_entropy, mi)


def gaussian(
    prediction: torch.Tensor,
    target: torch.Tensor,
    positions: torch.Tensor | None = None,
    num_positions: int | None = None,
    measure: bool = True,
    images: torch.Tensor | None = None,
) -> LossAndMI:
    """L2 regression onto `target` (rows are tokens, the last dimension is the vector); the
    figure is `gaussian_information` (an estimate, not a bound) over the same tokens: with
    `images` (the leading shape, which image each token comes from) the jackknife over images
    and its standard error. NaN without `measure` (it costs D x D decompositions: the loop asks
    only when it logs)."""
    rows = prediction.reshape(-1, prediction.shape[-1])
    loss = F.mse_loss(rows, target.reshape(-1, target.shape[-1]).to(prediction.dtype))
    if not measure:
        nan = torch.full((), math.nan, device=loss.device)
        return LossAndMI(loss, nan, nan if images is not None else None)
    with torch.no_grad():
        mi, se = gaussian_information(prediction, target, positions, num_positions, images)
    return LossAndMI(loss, mi, se if images is not None else None)


def normalised_l2(
    prediction: torch.Tensor, target: torch.Tensor, measure: bool = True
) -> LossAndMI:
    """BYOL's regression: 2 - 2 cos(prediction, target), a Gaussian on the unit sphere; the
    figure is the Gaussian-channel estimate on the normalised vectors (no positions; one
    token per image, so its jackknife leaves out one row at a time)."""
    p, t = F.normalize(prediction, dim=-1), F.normalize(target, dim=-1)
    loss = (2 - 2 * (p * t).sum(-1)).mean()
    images = torch.arange(len(p), device=p.device)
    bound = gaussian(p, t, measure=measure, images=images)
    return LossAndMI(loss, bound.mi, bound.se)


def __getattr__(name: str) -> Any:
    """`Bound`, the old name of LossAndMI (it also carries estimates, which are not bounds),
    with a DeprecationWarning (docs/migration.md)."""
    if name == "Bound":
        warnings.warn("m3i.mi.posteriors.Bound is now LossAndMI", DeprecationWarning, stacklevel=2)
        return LossAndMI
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
