"""Where image A's grid positions lie: at random, in blocks (BEiT / SiameseIM) or as the kept
blocks of data2vec 2.0's inverse block mask.

`random` is drawn in m3i.data.mixing; the block algorithms here return a boolean (N, H, W)
map with exactly `count` True cells per sample: the positions image A occupies in the mix
(B's masked positions). When an algorithm's blocks miss the count, the rest is filled (or
trimmed) with cells drawn uniformly at random, as SiameseIM's `fixed_num_masking_patches` and
data2vec 2.0's `require_same_masks` do.

Block sizes are the published ones on a ViT-B/16 grid at 224 px (14 x 14 = 196 cells) and
scale with the grid so that a block covers the same share of the image (`beit_min_cells`,
`data2vec_block_side`): the published sizes on a 14 x 14 grid, smaller ones on the tiny
default's 8 x 8. All draws use torch's generator of the device (seeded by the training loop).
"""

from __future__ import annotations

import math

import torch

MASKINGS = ("random", "block", "inverse_block")  # the values of mix.masking
PUBLISHED_CELLS = 196  # the 14 x 14 grid of a ViT-B/16 at 224 px, where the sizes below hold
BEIT_MIN_CELLS = 16  # BEiT's min_num_patches, kept by SiameseIM
BEIT_MIN_ASPECT = 0.3  # BEiT's min_aspect (max_aspect = 1 / min_aspect)
BEIT_ATTEMPTS = 10  # BEiT gives up after this many rejected blocks in a row
DATA2VEC_BLOCK_SIDE = 3  # data2vec 2.0's mask_length for images
DATA2VEC_ADJUST = 0.07  # data2vec 2.0's mask_prob_adjust for images
ROUNDS_PER_CHECK = 8  # block rounds between two checks of "all done" (a device sync each)


def beit_min_cells(grid: tuple[int, int]) -> int:
    """BEiT's smallest block, 16 cells of 196, scaled with the grid's area (>= 1)."""
    return max(1, round(BEIT_MIN_CELLS * grid[0] * grid[1] / PUBLISHED_CELLS))


def data2vec_block_side(grid: tuple[int, int]) -> int:
    """data2vec 2.0's block side, 3 cells of 14, scaled with the grid's side (>= 2, as fairseq
    asserts mask_length > 1)."""
    side = math.sqrt(grid[0] * grid[1])
    return max(2, round(DATA2VEC_BLOCK_SIDE * side / math.sqrt(PUBLISHED_CELLS)))


def exact_count(cells: torch.Tensor, count: int) -> torch.Tensor:
    """Keep `count` cells per sample: all of `cells` (N, H, W) when it has at most `count`,
    plus cells drawn uniformly among the others; a uniform `count`-subset of it when it has
    more."""
    n = cells.shape[0]
    flat = cells.reshape(n, -1)
    score = flat.float() + torch.rand(flat.shape, device=cells.device)  # cells first, at random
    chosen = score.topk(count, dim=1).indices
    out = torch.zeros_like(flat).scatter_(1, chosen, True)
    return out.reshape(cells.shape)


def block_cells(n: int, grid: tuple[int, int], count: int, device=None) -> torch.Tensor:
    """BEiT's block-wise masking (its MaskingGenerator, as SiameseIM uses it with
    fixed_num_masking_patches), run for all samples at once.

    Each round every unfinished sample draws one rectangle: area uniform in [min cells, cells
    still to place], log aspect ratio uniform in [log 0.3, log 1/0.3], side lengths rounded,
    strictly inside the grid, its corner uniform. It is taken when it adds at least one new cell
    and no more than are still to place. A sample stops at `count` cells or after 10 rejected
    rectangles in a row; then the remaining cells are drawn at random.
    """
    height, width = grid
    low = beit_min_cells(grid)
    log_aspect = (math.log(BEIT_MIN_ASPECT), -math.log(BEIT_MIN_ASPECT))
    rows = torch.arange(height, device=device)[None, :, None]
    cols = torch.arange(width, device=device)[None, None, :]
    cells = torch.zeros(n, height, width, dtype=torch.bool, device=device)
    placed = torch.zeros(n, dtype=torch.long, device=device)
    rejected = torch.zeros(n, dtype=torch.long, device=device)
    active = torch.full((n,), count > 0, dtype=torch.bool, device=device)
    while bool(active.any()):
        for _ in range(ROUNDS_PER_CHECK):
            left_to_place = (count - placed).float()
            area = low + torch.rand(n, device=device) * (left_to_place - low)
            aspect = torch.exp(
                log_aspect[0] + torch.rand(n, device=device) * (log_aspect[1] - log_aspect[0])
            )
            h = torch.round(torch.sqrt(area * aspect)).long()
            w = torch.round(torch.sqrt(area / aspect)).long()
            inside = (h < height) & (w < width)
            top = (torch.rand(n, device=device) * (height - h + 1).clamp(min=1)).long()
            left = (torch.rand(n, device=device) * (width - w + 1).clamp(min=1)).long()
            rect = (
                (rows >= top[:, None, None])
                & (rows < (top + h)[:, None, None])
                & (cols >= left[:, None, None])
                & (cols < (left + w)[:, None, None])
            )
            new = (rect & ~cells).sum(dim=(1, 2))
            take = active & inside & (new > 0) & (new <= count - placed)
            cells |= rect & take[:, None, None]
            placed += new * take
            rejected = torch.where(take, 0, rejected + active.long())
            active &= (placed < count) & (rejected < BEIT_ATTEMPTS)
    return exact_count(cells, count)


def inverse_block_cells(
    n: int, grid: tuple[int, int], count: int, share: float, device=None
) -> torch.Tensor:
    """data2vec 2.0's inverse block mask for images (fairseq `compute_block_mask_2d` with
    inverse_mask=True), whose kept cells are image A's: int(P * (share + 0.07) / side²) block
    centres drawn uniformly with replacement, a side x side block around each (offsets
    -side//2 .. side - 1 - side//2, clamped at the grid's edges), then exactly `count` cells
    (a random subset of the blocks when they cover more, random cells added when fewer).
    `share` is the kept share (data2vec 2.0: 1 - mask_prob = 0.2)."""
    height, width = grid
    cells_total = height * width
    side = data2vec_block_side(grid)
    centres = torch.randint(
        0, cells_total, (n, int(cells_total * (share + DATA2VEC_ADJUST) / side**2)), device=device
    )
    offsets = torch.arange(side, device=device) - side // 2
    r = (centres // width)[..., None, None] + offsets[:, None]  # (n, centres, side, 1)
    c = (centres % width)[..., None, None] + offsets[None, :]  # (n, centres, 1, side)
    r, c = torch.broadcast_tensors(r.clamp(0, height - 1), c.clamp(0, width - 1))
    index = (r * width + c).reshape(n, -1)
    cells = torch.zeros(n, cells_total, dtype=torch.bool, device=device)
    cells.scatter_(1, index, True)
    return exact_count(cells.reshape(n, height, width), count)


def block_masking_cells(
    masking: str, n: int, grid: tuple[int, int], count: int, share: float, device=None
) -> torch.Tensor:
    """Image A's `count` cells per sample, (N, H, W) bool, by a block `mix.masking` algorithm
    (`share`: A's share of the grid, mix.ratio)."""
    if masking == "block":
        return block_cells(n, grid, count, device)
    if masking == "inverse_block":
        return inverse_block_cells(n, grid, count, share, device)
    raise ValueError(f"mix.masking must be one of {', '.join(MASKINGS)}, got {masking!r}")
