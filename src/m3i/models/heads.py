"""Projection heads."""

from __future__ import annotations

from timm.layers import Mlp
from torch import nn

HEADS = ("mlp", "linear")  # the values of targets.category.head and targets.text.head


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Module:
    """A 2-layer MLP (timm's Mlp, GELU) or, with hidden_dim 0, a linear projection."""
    if hidden_dim <= 0:
        return nn.Linear(in_dim, out_dim)
    return Mlp(in_dim, hidden_dim, out_dim)


def batchnorm_mlp(sizes: list[int], last_batchnorm: bool) -> nn.Sequential:
    """The projector / predictor MLP of BYOL and MoCo v3, from sizes[0] to sizes[-1].

    Every hidden layer is Linear (no bias: the BatchNorm after it cancels one) -> BatchNorm1d ->
    ReLU. The output layer is a Linear without bias, followed with `last_batchnorm` by a
    BatchNorm1d without affine parameters (MoCo v3's `_build_mlp`; BYOL: none).
    """
    layers: list[nn.Module] = []
    for index, (in_dim, out_dim) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(in_dim, out_dim, bias=False))
        if index < len(sizes) - 2:
            layers += [nn.BatchNorm1d(out_dim), nn.ReLU()]
        elif last_batchnorm:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)
