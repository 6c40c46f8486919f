"""Image A's positions by mix.masking, against the originals' algorithms written out here:
BEiT's MaskingGenerator as SiameseIM runs it (microsoft/unilm beit/masking_generator.py,
OpenGVLab/Siamese-Image-Modeling util/masking_generator.py with fixed_num_masking_patches) and
data2vec 2.0's inverse block mask (fairseq data_utils.compute_block_mask_2d, inverse_mask)."""

import math
import random
from collections import deque

import pytest
import torch

from m3i.data.masking import (
    beit_min_cells,
    block_cells,
    data2vec_block_side,
    exact_count,
    inverse_block_cells,
)
from m3i.data.mixing import count_a, split_positions


def beit_reference(
    rng: random.Random, height: int, width: int, count: int, min_cells: int
) -> list[list[int]]:
    """BEiT's generator, one sample, one rectangle at a time, then SiameseIM's random fill."""
    mask = [[0] * width for _ in range(height)]
    placed = 0
    while placed < count:
        budget = count - placed
        added = 0
        for _attempt in range(10):
            area = rng.uniform(min_cells, budget)
            aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if w < width and h < height:
                top, left = rng.randint(0, height - h), rng.randint(0, width - w)
                free = [
                    (i, j)
                    for i in range(top, top + h)
                    for j in range(left, left + w)
                    if not mask[i][j]
                ]
                if 0 < len(free) <= budget:
                    for i, j in free:
                        mask[i][j] = 1
                    added = len(free)
            if added:
                break
        if not added:
            break
        placed += added
    empty = [(i, j) for i in range(height) for j in range(width) if not mask[i][j]]
    rng.shuffle(empty)
    for i, j in empty[: count - placed]:
        mask[i][j] = 1
    return mask


def components(mask: list[list[int]]) -> list[int]:
    """Sizes of the 4-connected groups of set cells."""
    height, width = len(mask), len(mask[0])
    seen, sizes = set(), []
    for start in ((i, j) for i in range(height) for j in range(width) if mask[i][j]):
        if start in seen:
            continue
        seen.add(start)
        queue, size = deque([start]), 0
        while queue:
            i, j = queue.popleft()
            size += 1
            for a, b in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)):
                if 0 <= a < height and 0 <= b < width and mask[a][b] and (a, b) not in seen:
                    seen.add((a, b))
                    queue.append((a, b))
        sizes.append(size)
    return sizes


def statistics(masks: list[list[list[int]]]) -> dict[str, list[float]]:
    """Per mask: its number of groups, its largest group, its cells in the outer ring, and its
    rows and columns set from edge to edge (one rectangle never spans the grid)."""
    height, width = len(masks[0]), len(masks[0][0])
    ring = [(i, j) for i in range(height) for j in range(width) if i in (0, height - 1)]
    ring += [(i, j) for i in range(1, height - 1) for j in (0, width - 1)]
    out = {"groups": [], "largest": [], "ring": [], "full lines": []}
    for mask in masks:
        sizes = components(mask)
        out["groups"].append(len(sizes))
        out["largest"].append(max(sizes))
        out["ring"].append(sum(mask[i][j] for i, j in ring))
        rows = sum(all(row) for row in mask)
        out["full lines"].append(rows + sum(all(col) for col in zip(*mask, strict=True)))
    return out


def mean_and_error(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


@pytest.mark.parametrize(
    ("side", "count", "samples"),
    [(8, 39, 3000), (8, 16, 3000), (14, 118, 1000), (14, 75, 1000)],  # the presets; BEiT's 75
)
def test_block_masks_are_distributed_as_beits_generator(side, count, samples):
    """Same count per sample, and the same mean number of groups, largest group, cells on the
    border and full rows and columns as the one-rectangle-at-a-time reference (within 4.5
    standard errors)."""
    rng = random.Random(0)
    reference = [beit_reference(rng, side, side, count, beit_min_cells((side, side)))]
    reference += [
        beit_reference(rng, side, side, count, beit_min_cells((side, side)))
        for _ in range(samples - 1)
    ]
    torch.manual_seed(0)
    ours = block_cells(samples, (side, side), count)
    assert ours.shape == (samples, side, side)
    assert ours.sum(dim=(1, 2)).tolist() == [count] * samples
    assert all(sum(map(sum, m)) == count for m in reference)
    expected, got = statistics(reference), statistics(ours.int().tolist())
    for name in expected:
        (m1, e1), (m2, e2) = mean_and_error(expected[name]), mean_and_error(got[name])
        assert abs(m1 - m2) < 4.5 * math.hypot(e1, e2), (name, m1, m2)


def test_block_sizes_scale_with_the_grid():
    """The published sizes on ViT-B/16's 14 x 14 grid; the same share of the image elsewhere."""
    assert beit_min_cells((14, 14)) == 16  # BEiT's min_num_patches
    assert beit_min_cells((8, 8)) == 5  # 16 x 64 / 196 = 5.2
    assert beit_min_cells((4, 4)) == 1  # 1.3
    assert data2vec_block_side((14, 14)) == 3  # data2vec 2.0's mask_length
    assert data2vec_block_side((8, 8)) == 2  # 3 x 8 / 14 = 1.7
    assert data2vec_block_side((28, 28)) == 6
    assert data2vec_block_side((4, 4)) == 2  # fairseq asserts mask_length > 1


def fairseq_blocks(batch: int, cells: int, mask_prob: float, side: int) -> torch.Tensor:
    """compute_block_mask_2d's blocks before its exact count, for inverse_mask and
    mask_prob_adjust 0.07: its one draw of centres, each grown to a side x side block clamped
    at the edges; the kept cells (B, d, d)."""
    d = int(cells**0.5)
    keep = 1 - mask_prob  # inverse_mask: the blocks are what is kept
    number = int(cells * ((keep + 0.07) / side**2))
    centres = torch.randint(0, cells, size=(batch, number))
    kept = torch.zeros(batch, d, d)
    for b in range(batch):
        for index in centres[b].tolist():
            row, col = divmod(index, d)
            for i in range(side):
                for j in range(side):
                    r = min(max(row + i - side // 2, 0), d - 1)
                    c = min(max(col + j - side // 2, 0), d - 1)
                    kept[b, r, c] = 1
    return kept.bool()


@pytest.mark.parametrize(("side", "ratio"), [(14, 0.2), (8, 0.2), (8, 0.5)])
def test_inverse_blocks_are_data2vec2s_kept_blocks_made_exact(side, ratio):
    """From the same random state, the kept cells are drawn from fairseq's blocks: a subset
    of them when they cover more than the count, all of them plus others when fewer."""
    cells, count = side * side, count_a(ratio, side * side)
    torch.manual_seed(3)
    blocks = fairseq_blocks(64, cells, round(1 - ratio, 9), data2vec_block_side((side, side)))
    torch.manual_seed(3)
    ours = inverse_block_cells(64, (side, side), count, ratio)
    assert ours.sum(dim=(1, 2)).tolist() == [count] * 64
    covered = blocks.sum(dim=(1, 2))
    for b in range(64):
        if covered[b] >= count:
            assert (ours[b] & ~blocks[b]).sum() == 0, b
        else:
            assert (blocks[b] & ~ours[b]).sum() == 0, b
    assert (covered > count).any() and (covered < count).any()  # both cases were checked


def test_exact_count_keeps_or_adds_cells_uniformly():
    torch.manual_seed(0)
    few = torch.zeros(20000, 1, 10, dtype=torch.bool)
    few[:, 0, :3] = True
    filled = exact_count(few, 5)
    assert filled[:, 0, :3].all() and filled.sum(dim=(1, 2)).eq(5).all()
    share = filled[:, 0, 3:].float().mean(dim=0)  # 2 of the 7 others, uniformly
    torch.testing.assert_close(share, torch.full((7,), 2 / 7), atol=0.015, rtol=0)
    many = torch.zeros(20000, 1, 10, dtype=torch.bool)
    many[:, 0, :8] = True
    trimmed = exact_count(many, 4)
    assert not trimmed[:, 0, 8:].any() and trimmed.sum(dim=(1, 2)).eq(4).all()
    share = trimmed[:, 0, :8].float().mean(dim=0)  # 4 of the 8, uniformly
    torch.testing.assert_close(share, torch.full((8,), 0.5), atol=0.015, rtol=0)


def test_random_split_is_todays_draw_bit_for_bit():
    """mix.masking=random draws what split_positions drew before masking existed: one
    torch.rand per position, argsorted; A the first round(ratio * P), each part sorted."""
    torch.manual_seed(5)
    order = torch.rand(6, 64).argsort(dim=1)
    expected = order[:, :26].sort(dim=1).values, order[:, 26:].sort(dim=1).values
    torch.manual_seed(5)
    got = split_positions(6, 64, 0.4)
    assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))


@pytest.mark.parametrize("masking", ["block", "inverse_block"])
def test_block_split_gives_a_the_drawn_cells_and_b_the_rest(masking):
    torch.manual_seed(1)
    draw = block_cells if masking == "block" else inverse_block_cells
    cells = draw(5, (8, 8), 38, *([0.6] if masking == "inverse_block" else []))
    torch.manual_seed(1)
    pos_a, pos_b = split_positions(5, 64, 0.6, masking=masking, grid=(8, 8))
    assert pos_a.shape == (5, 38) and pos_b.shape == (5, 26)  # round(0.6 x 64) = 38
    for row in range(5):  # A: the drawn cells, B: the others, each in ascending order
        assert pos_a[row].tolist() == [i for i in range(64) if cells[row].flatten()[i]]
        assert pos_b[row].tolist() == [i for i in range(64) if not cells[row].flatten()[i]]
