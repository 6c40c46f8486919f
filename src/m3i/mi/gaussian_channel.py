"""The Gaussian-channel information estimate of the Gaussian posteriors, and its jackknife.

For T tokens (rows) of D dimensions with predictions, each at a query position:

    estimate = 0.5 * log det Sigma_y - 0.5 * log det Sigma_e

Sigma_e is the covariance of the prediction error, Sigma_y the covariance of the targets after
removing each position's batch mean. Each log det is bias-corrected with the Wishart
expectation, which is exact for INDEPENDENT Gaussian tokens. The tokens of one image are not
independent: they share the image's content (or its error), and then the Wishart correction
counts far too many degrees of freedom in the shared directions. Given which image each token
comes from, `gaussian_information(..., images=)` returns the delete-one-image jackknife of the
estimate (Quenouille's bias correction, whole images left out in turn) and its jackknife
standard error. docs/information.md has what each removes, measured.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch


def wishart_log_det_offset(dof: torch.Tensor, dim: torch.Tensor, max_dim: int) -> torch.Tensor:
    """E[log det W] - log det Sigma for W ~ Wishart_dim(dof, Sigma): dim * log 2 plus
    sum_{i=1..dim} digamma((dof - i + 1) / 2). `max_dim` >= dim fixes the shapes; `dof` may be
    a batch of values (one offset each)."""
    i = torch.arange(1, max_dim + 1, dtype=torch.float64, device=dof.device)
    terms = torch.special.digamma((dof[..., None] - i + 1) / 2)
    return dim * math.log(2) + torch.where(i <= dim, terms, 0.0).sum(-1)


def one_hot(index: torch.Tensor, size: int) -> torch.Tensor:
    """(T,) integers in 0..size-1 -> (T, size) float64 indicators."""
    return (index[:, None] == torch.arange(size, device=index.device)).double()


def gaussian_information(
    prediction: torch.Tensor,
    target: torch.Tensor,
    positions: torch.Tensor | None = None,
    num_positions: int | None = None,
    images: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian-channel estimate in nats and its standard error, in float64, no gradient.

    prediction, target: (..., D), one token per row. positions: the leading shape, each
    token's query position in 0..num_positions-1 (default: max + 1); without them only the
    overall mean is removed. images: the leading shape, the image each token comes from (ids
    need not be contiguous); with them the estimate is the delete-one-image jackknife and the
    error its jackknife standard error, without them the plain estimate and NaN.

    Directions in which the targets do not vary beyond the rounding of their dtype (e.g. the
    mean over D of LayerNorm'd or per-patch normalised targets) are left out. NaN when there
    are too few tokens to tell: the residual degrees of freedom (tokens - distinct positions),
    with every image and with any one left out, must exceed the targets' rank.
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
    by_position = one_hot(groups, num_groups)  # (T, P)
    counts = by_position.sum(0)
    residual = y - by_position @ ((by_position.t() @ y) / counts.clamp_min(1)[:, None])
    variances, directions = torch.linalg.eigh(residual.t() @ residual)
    # the rounding of D values each off by eps relative: variances below D eps^2 mean(y^2)
    tolerance = tokens * d * torch.finfo(target.dtype).eps ** 2 * y.pow(2).mean()
    kept = variances > tolerance
    rank = kept.sum().double()
    # the kept directions first, in a fixed-size basis: the rest are zeroed out
    basis = directions * kept.double()
    residual, error = residual @ basis, error @ basis
    pad = torch.diag((~kept).double())  # the left-out directions count as log 1 = 0
    scatter_y = residual.t() @ residual + pad
    scatter_e = error.t() @ error + pad
    dof_y = tokens - (counts > 0).sum().double()
    dof_e = torch.tensor(float(tokens - 1), dtype=torch.float64, device=y.device)
    estimate = _estimate(scatter_y, scatter_e, dof_y, dof_e, rank, d)
    if images is None:
        return estimate.float(), torch.full_like(estimate, math.nan).float()
    leave_out = torch.cat(
        [
            _estimate(loo_y + pad, loo_e + pad, loo_dof_y, loo_dof_e, rank, d)
            for loo_y, loo_e, loo_dof_y, loo_dof_e in _leave_one_image_out(
                residual, error, groups, counts, images.reshape(-1), num_groups
            )
        ]
    )
    n = len(leave_out)
    mean = leave_out.mean()
    jackknife = n * estimate - (n - 1) * mean
    se = ((n - 1) / n * (leave_out - mean).pow(2).sum()).sqrt()
    estimable = torch.isfinite(leave_out).all() & torch.isfinite(estimate) & (n > 1)
    return (
        torch.where(estimable, jackknife, math.nan).float(),
        torch.where(estimable, se, math.nan).float(),
    )


def _estimate(
    scatter_y: torch.Tensor,
    scatter_e: torch.Tensor,
    dof_y: torch.Tensor,
    dof_e: torch.Tensor,
    rank: torch.Tensor,
    d: int,
) -> torch.Tensor:
    """The Wishart-corrected estimate from (..., D, D) scatters (left-out directions padded
    with 1 on the diagonal); NaN where rank >= dof_y: the sample, not the targets, may be what
    limits the rank; +inf where the error has a noiseless direction."""
    log_det_y = log_det_positive(scatter_y)
    log_det_e = log_det_positive(scatter_e)  # a noiseless direction: -inf, infinite information
    estimate = 0.5 * (
        (log_det_y - wishart_log_det_offset(dof_y, rank, d))
        - (log_det_e - wishart_log_det_offset(dof_e, rank, d))
    )
    return torch.where(rank < dof_y, estimate, math.nan)


def log_det_positive(matrices: torch.Tensor) -> torch.Tensor:
    """log det of (..., K, K) symmetric positive definite matrices by Cholesky; -inf where one
    is not positive definite. (Not LU: MKL's batched float64 LU failed on 2 threads, "Parameter
    6 was incorrect on entry to DLASWP", and gave NaN.)"""
    factor, info = torch.linalg.cholesky_ex(matrices)
    log_det = 2 * factor.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return torch.where(info == 0, log_det, -math.inf)


def by_image(rows: torch.Tensor, image: torch.Tensor, n: int) -> torch.Tensor:
    """(T, K) rows, (T,) image index in 0..n-1 -> (n, longest, K): each image's rows, padded
    with zero rows (which add nothing to a scatter)."""
    order = image.argsort(stable=True)
    sizes = torch.bincount(image, minlength=n)
    starts = sizes.cumsum(0) - sizes
    slot = torch.arange(len(image), device=image.device) - starts[image[order]]
    padded = rows.new_zeros(n, int(sizes.max()), rows.shape[1])
    padded[image[order], slot] = rows[order]
    return padded


CHUNK_BYTES = 2**26  # at most this much per (images, K, K) float64 tensor of the jackknife


def _leave_one_image_out(
    residual: torch.Tensor,
    error: torch.Tensor,
    groups: torch.Tensor,
    counts: torch.Tensor,
    images: torch.Tensor,
    num_groups: int,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """The scatters and degrees of freedom of the estimate with each image left out in turn,
    (c, K, K) and (c,) for chunks of c images (CHUNK_BYTES bounds each tensor), by downdating
    the full ones rather than recomputing them.

    Removing a set of k rows from a group of c rows whose residuals about the group mean are
    r takes sum(r r^T) + (sum r)(sum r)^T / (c - k) from the group's scatter (the rest's mean
    moves by -sum r / (c - k)); a group that the image fills entirely leaves with its whole
    scatter (its residuals sum to zero)."""
    _, image = images.unique(return_inverse=True)
    n, tokens, width = int(image.max()) + 1, len(image), residual.shape[1]
    cell = image * num_groups + groups  # each (image, position) cell
    in_cell = torch.bincount(cell, minlength=n * num_groups).reshape(n, num_groups).double()
    sums = residual.new_zeros(n * num_groups, width).index_add_(0, cell, residual)
    sums = sums.reshape(n, num_groups, width)  # sum of r over each cell
    rest = counts - in_cell  # c - k
    weight = torch.where(rest > 0, 1 / rest.clamp_min(1), 0.0)
    sizes = torch.bincount(image, minlength=n).double()
    positions_left = ((counts > 0) & (rest > 0)).sum(1).double()
    error_sums = error.new_zeros(n, width).index_add_(0, image, error)
    rows_y, rows_e = by_image(residual, image, n), by_image(error, image, n)
    full_y, full_e = residual.t() @ residual, error.t() @ error
    chunk = max(1, CHUNK_BYTES // (8 * width * width))
    for start in range(0, n, chunk):
        part = slice(start, start + chunk)
        own_y = rows_y[part].transpose(1, 2) @ rows_y[part]
        shift_y = (sums[part] * weight[part, :, None]).transpose(1, 2) @ sums[part]
        own_e = rows_e[part].transpose(1, 2) @ rows_e[part]
        outer_e = error_sums[part, :, None] * error_sums[part, None, :]
        shift_e = outer_e / (tokens - sizes[part])[:, None, None]
        yield (
            full_y - own_y - shift_y,
            full_e - own_e - shift_e,
            tokens - sizes[part] - positions_left[part],
            tokens - sizes[part] - 1,
        )
