"""The patch-level mix of two images: which grid positions each image occupies."""

from __future__ import annotations

import torch


def pair_partners(n: int, device: torch.device | None = None) -> torch.Tensor:
    """Image B of mixed input k is sample n - 1 - k (METHOD.md section 3 default)."""
    return torch.arange(n - 1, -1, -1, device=device)


def count_a(ratio: float, num_patches: int) -> int:
    """How many grid positions image A occupies."""
    return round(ratio * num_patches)


def split_positions(
    n: int, num_patches: int, ratio: float, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random per-sample split of the grid: A gets round(ratio * P) positions, B the rest.

    Returns sorted position indices (n, La) for image A and (n, P - La) for image B.
    """
    visible = count_a(ratio, num_patches)
    order = torch.rand(n, num_patches, device=device).argsort(dim=1)
    pos_a = order[:, :visible].sort(dim=1).values
    pos_b = order[:, visible:].sort(dim=1).values
    return pos_a, pos_b


def gather_tokens(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """tokens (N, P, D) at positions (N, L) -> (N, L, D)."""
    return tokens.gather(1, positions[..., None].expand(-1, -1, tokens.shape[-1]))
