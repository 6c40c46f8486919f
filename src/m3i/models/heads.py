"""Projection heads."""

from __future__ import annotations

from timm.layers import Mlp
from torch import nn


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Module:
    """A 2-layer MLP (timm's Mlp, GELU) or, with hidden_dim 0, a linear projection."""
    if hidden_dim <= 0:
        return nn.Linear(in_dim, out_dim)
    return Mlp(in_dim, hidden_dim, out_dim)
