"""The patch-level mix of two images: which grid positions each image occupies."""

from __future__ import annotations

import math

import torch

from m3i.data.masking import block_masking_cells


def pair_partners(n: int, device: torch.device | None = None) -> torch.Tensor:
    """Image B of mixed input k is sample n - 1 - k (METHOD.md section 3 default)."""
    return torch.arange(n - 1, -1, -1, device=device)


def count_a(ratio: float, num_patches: int) -> int:
    """How many grid positions image A occupies."""
    return round(ratio * num_patches)


def split_positions(
    n: int,
    num_patches: int,
    ratio: float,
    device: torch.device | None = None,
    masking: str = "random",
    grid: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample split of the grid: A gets round(ratio * P) positions, B the rest.

    `masking` (mix.masking) says how A's positions are drawn: `random` (uniformly), `block`
    (BEiT's blocks, SiameseIM) or `inverse_block` (data2vec 2.0's kept blocks), the block
    algorithms on `grid` (rows, columns; default square), m3i.data.masking.
    Returns sorted position indices (n, La) for image A and (n, P - La) for image B.
    """
    visible = count_a(ratio, num_patches)
    if masking != "random":
        side = math.isqrt(num_patches)
        grid = grid or (side, side)
        cells = block_masking_cells(masking, n, grid, visible, ratio, device)
        order = torch.argsort((~cells.reshape(n, -1)).to(torch.uint8), dim=1, stable=True)
        return order[:, :visible], order[:, visible:]  # each ascending (a stable sort)
    order = torch.rand(n, num_patches, device=device).argsort(dim=1)
    pos_a = order[:, :visible].sort(dim=1).values
    pos_b = order[:, visible:].sort(dim=1).values
    return pos_a, pos_b


def gather_tokens(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """tokens (N, P, D) at positions (N, L) -> (N, L, D)."""
    return tokens.gather(1, positions[..., None].expand(-1, -1, tokens.shape[-1]))
