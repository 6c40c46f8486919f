"""torch.distributed helpers: rank, world size and all-gather with gradient."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_functional


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (same shape on every rank) from all ranks along dim 0, keeping gradients.

    Gradients flow back to each rank's own slice, so a contrastive loss over the global batch
    backpropagates as if it had been computed on one process.
    """
    if world_size() == 1:
        return x
    return torch.cat(dist_functional.all_gather(x.contiguous()), dim=0)
