"""The logged loss and figures: means over micro-batches and over ranks of the finite values (a
micro-batch or rank without a target's samples has a NaN figure for it)."""

from __future__ import annotations

import torch

from m3i import runtime


def finite_mean(values: list[torch.Tensor]) -> torch.Tensor:
    """The mean of the finite values (a micro-batch without a target's samples has a NaN
    figure for it); NaN when none is finite."""
    stacked = torch.stack([value.float() for value in values])
    finite = torch.isfinite(stacked)
    return torch.where(finite, stacked, 0.0).sum() / finite.sum()


def mean_over_ranks(
    loss: torch.Tensor, monitors: dict[str, torch.Tensor]
) -> tuple[float, dict[str, float]]:
    """The logged loss and monitors: means over ranks (each rank's are over its own batch) of
    the ranks where they are finite (a target with no sample on a rank has a NaN figure there;
    NaN where no rank has one)."""
    values = torch.stack([loss.detach().float(), *(v.detach().float() for v in monitors.values())])
    finite = torch.isfinite(values)
    sums = torch.stack([torch.where(finite, values, 0.0), finite.float()])
    if runtime.is_distributed():
        torch.distributed.all_reduce(sums)
    loss_value, *rest = (sums[0] / sums[1]).tolist()
    return loss_value, dict(zip(monitors, rest, strict=True))
