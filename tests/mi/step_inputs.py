"""A hand-built step's inputs for the target tests: encoder streams as the step lays them out,
a one-view batch, position-only tokens and an identity head. Light: the 2-rank dense test's
spawned processes import it."""

import torch

from m3i.data.batch import Batch, View
from m3i.mi.targets import Stream

ENC_DIM, DEC_DIM = 12, 10


def image_batch(view1: torch.Tensor) -> Batch:
    """A batch of one view (its boxes and flips unread by the targets here)."""
    n = len(view1)
    return Batch([View(view1, torch.zeros(n, 4), torch.zeros(n, dtype=torch.bool))])


def make_streams(n: int, grid: int, seed: int, both: bool = True) -> dict[str, Stream]:
    """Stream a holds sample i in row i, stream b the partner n - 1 - i (as the step does)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.rand(n, grid, generator=g).argsort(dim=1)
    half = grid // 2
    streams = {
        "a": Stream(
            torch.randn(n, half, ENC_DIM, generator=g),
            order[:, :half].sort(dim=1).values,
            torch.arange(n),
        )
    }
    if both:
        streams["b"] = Stream(
            torch.randn(n, grid - half, ENC_DIM, generator=g),
            order[:, half:].sort(dim=1).values,
            torch.arange(n - 1, -1, -1),
        )
    return streams


def position_only_tokens(n: int, grid: int, d: int, seed: int):
    """Per-position means (grid, d) and tokens = mean + unit noise for n images."""
    g = torch.Generator().manual_seed(seed)
    means = 3 * torch.randn(grid, d, generator=g)
    return means, means + torch.randn(n, grid, d, generator=g)


def identity_head(target) -> None:
    with torch.no_grad():
        target.head.weight.copy_(torch.eye(*target.head.weight.shape))
        target.head.bias.zero_()
