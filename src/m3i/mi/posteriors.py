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
det is bias-corrected with the Wishart expectation, so the estimate is unbiased for Gaussian
targets at any token count; unless the tokens outnumber D plus the positions, it is not
estimable (NaN).
docs/information.md has the measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Bound:
    """A target's loss (to minimise) and its information figure `mi` in nats.

    Boltzmann posteriors (`boltzmann`, `symmetric_infonce`, `query_key_infonce`): `mi` is a
    lower bound on the mutual information. Gaussian posteriors (`gaussian`, `normalised_l2`):
    `mi` is the Gaussian-channel ESTIMATE (module docstring), not a bound, and NaN when the
    batch holds too few tokens to estimate it or when it was not asked for (`measure=False`)."""

    loss: torch.Tensor
    mi: torch.Tensor


def boltzmann(
    logits: torch.Tensor, labels: torch.Tensor, label_entropy: float | None = None
) -> Bound:
    """Softmax cross-entropy over the candidates in the last dimension of `logits`.

    The bound is H(Y) - CE with H(Y) = `label_entropy` (nats), the entropy of the labels'
    prior; without it log C, the entropy of C equally likely candidates (InfoNCE's case)."""
    loss = F.cross_entropy(logits, labels)
    entropy = math.log(logits.shape[-1]) if label_entropy is None else label_entropy
    return Bound(loss, entropy - loss.detach())


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


def wishart_log_det_offset(dof: torch.Tensor, dim: torch.Tensor, max_dim: int) -> torch.Tensor:
    """E[log det W] - log det Sigma for W ~ Wishart_dim(dof, Sigma): dim * log 2 plus
    sum_{i=1..dim} digamma((dof - i + 1) / 2). `max_dim` >= dim fixes the shapes."""
    i = torch.arange(1, max_dim + 1, dtype=torch.float64, device=dof.device)
    terms = torch.special.digamma((dof - i + 1) / 2)
    return dim * math.log(2) + torch.where(i <= dim, terms, 0.0).sum()


def gaussian_information(
    prediction: torch.Tensor,
    target: torch.Tensor,
    positions: torch.Tensor | None = None,
    num_positions: int | None = None,
) -> torch.Tensor:
    """The Gaussian-channel estimate in nats (module docstring), computed in float64.

    prediction, target: (..., D), one token per row; positions: the leading shape, each token's
    query position in 0..num_positions-1 (default: max + 1); without them only the overall mean
    is removed. Directions in which the targets do not vary beyond the rounding of their dtype
    (e.g. the mean over D of LayerNorm'd or per-patch normalised targets) are left out. NaN
    when there are too few tokens to tell: the residual degrees of freedom (tokens - distinct
    positions) must exceed the targets' rank (D, or D - 1 for LayerNorm'd targets).
    """
    d = target.shape[-1]
    y = target.detach().reshape(-1, d).double()
    error = y - prediction.detach().reshape(-1, d).double()
    # the error's covariance, not its second moment: a constant offset of the predictions
    # carries no information and must not count against it (T - 1 degrees of freedom)
    error = error - error.mean(dim=0)
    tokens = y.shape[0]
    if positions is None:
        groups, num_groups = torch.zeros(tokens, dtype=torch.long, device=y.device), 1
    else:
        groups = positions.reshape(-1)
        num_groups = int(groups.max()) + 1 if num_positions is None else num_positions
    one_hot = (groups[:, None] == torch.arange(num_groups, device=y.device)).double()  # (T, P)
    counts = one_hot.sum(0)
    residual = y - (one_hot @ ((one_hot.t() @ y) / counts.clamp_min(1)[:, None]))
    dof_y = tokens - (counts > 0).sum().double()
    variances, directions = torch.linalg.eigh(residual.t() @ residual)
    # the rounding of D values each off by eps relative: variances below D eps^2 mean(y^2)
    tolerance = tokens * d * torch.finfo(target.dtype).eps ** 2 * y.pow(2).mean()
    kept = variances > tolerance
    rank = kept.sum().double()
    log_det_y = torch.where(kept, variances.clamp_min(tolerance).log(), 0.0).sum()
    error_scatter = directions.t() @ (error.t() @ error) @ directions
    block = kept[:, None] & kept[None, :]
    eye = torch.eye(d, dtype=torch.float64, device=y.device)
    sign, log_det_e = torch.linalg.slogdet(torch.where(block, error_scatter, eye))
    log_det_e = torch.where(sign > 0, log_det_e, -math.inf)  # a noiseless direction: infinite
    dof_e = torch.tensor(float(tokens - 1), dtype=torch.float64, device=y.device)
    estimate = 0.5 * (
        (log_det_y - wishart_log_det_offset(dof_y, rank, d))
        - (log_det_e - wishart_log_det_offset(dof_e, rank, d))
    )
    # rank == dof_y: the sample, not the targets, may be what limits the rank
    return torch.where(rank < dof_y, estimate, math.nan).float()


def gaussian(
    prediction: torch.Tensor,
    target: torch.Tensor,
    positions: torch.Tensor | None = None,
    num_positions: int | None = None,
    measure: bool = True,
) -> Bound:
    """L2 regression onto `target` (rows are tokens, the last dimension is the vector); the
    figure is `gaussian_information` (an estimate, not a bound) over the same tokens, or NaN
    without `measure` (it costs a D x D eigendecomposition: the loop asks only when it logs)."""
    rows = prediction.reshape(-1, prediction.shape[-1])
    loss = F.mse_loss(rows, target.reshape(-1, target.shape[-1]).to(prediction.dtype))
    if not measure:
        return Bound(loss, torch.full((), math.nan, device=loss.device))
    with torch.no_grad():
        mi = gaussian_information(prediction, target, positions, num_positions)
    return Bound(loss, mi)


def normalised_l2(prediction: torch.Tensor, target: torch.Tensor, measure: bool = True) -> Bound:
    """BYOL's regression: 2 - 2 cos(prediction, target), a Gaussian on the unit sphere; the
    figure is the Gaussian-channel estimate on the normalised vectors (no positions)."""
    p, t = F.normalize(prediction, dim=-1), F.normalize(target, dim=-1)
    loss = (2 - 2 * (p * t).sum(-1)).mean()
    bound = gaussian(p, t, measure=measure)
    return Bound(loss, bound.mi)
