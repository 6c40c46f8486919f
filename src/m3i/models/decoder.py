"""The transformer decoder: <mask> queries with position embeddings relative to the input view.

Coordinates are (y, x) in units of patches of the INPUT view, origin at its top-left corner,
patch centres at (r + 0.5, c + 0.5). A target patch of another view of the same image is
placed where its centre falls in the input view's frame (SiameseIM), so a target view that
is a pure shift of the input view gets the input's embeddings shifted by that many patches.
The relative scale and flip of the target view are added as a learned linear embedding of
(log height ratio, log width ratio, flipped-relative-to-input), zero for the identity.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn


def grid_coords(grid: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """Patch centres of a grid, (P, 2) as (y, x) in patch units, row-major."""
    rows = torch.arange(grid[0], device=device, dtype=torch.float32) + 0.5
    cols = torch.arange(grid[1], device=device, dtype=torch.float32) + 0.5
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)


def sincos_embedding(coords: torch.Tensor, dim: int) -> torch.Tensor:
    """2-D sine-cosine embedding of continuous (y, x) coordinates, (..., 2) -> (..., dim)."""
    if dim % 4:
        raise ValueError(f"decoder.dim must be a multiple of 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (
        torch.arange(quarter, device=coords.device, dtype=torch.float32) / quarter
    )
    y = coords[..., 0:1].float() * omega
    x = coords[..., 1:2].float() * omega
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=-1)


def view_to_view(
    grid: tuple[int, int],
    target_box: torch.Tensor,
    target_flip: torch.Tensor,
    input_box: torch.Tensor,
    input_flip: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres of a target view's patches in the input view's frame, and the relative geometry.

    Boxes are (top, left, height, width) as fractions of the source image, (N, 4); flips (N,).
    Returns coords (N, P, 2) in input-view patch units and geometry (N, 3) =
    (log h_t / h_i, log w_t / w_i, flip_t xor flip_i).
    """
    centres = grid_coords(grid, target_box.device)  # (P, 2) in target patch units
    v = centres[:, 0] / grid[0]
    u = centres[:, 1] / grid[1]
    t_top, t_left, t_h, t_w = (target_box[:, i : i + 1] for i in range(4))
    i_top, i_left, i_h, i_w = (input_box[:, i : i + 1] for i in range(4))
    u_t = torch.where(target_flip[:, None].bool(), 1 - u, u)
    src_x = t_left + u_t * t_w
    src_y = t_top + v * t_h
    u_i = (src_x - i_left) / i_w
    u_i = torch.where(input_flip[:, None].bool(), 1 - u_i, u_i)
    v_i = (src_y - i_top) / i_h
    coords = torch.stack([v_i * grid[0], u_i * grid[1]], dim=-1)
    geometry = torch.stack(
        [
            torch.log(target_box[:, 2] / input_box[:, 2]),
            torch.log(target_box[:, 3] / input_box[:, 3]),
            (target_flip.bool() ^ input_flip.bool()).float(),
        ],
        dim=-1,
    )
    return coords, geometry


class TokenBatchNorm(nn.Module):
    """BatchNorm1d over the channels of tokens (N, L, C), its statistics over all N * L tokens,
    computed in float32 outside autocast (SiameseIM's PermuteBN); the output is float32."""

    def __init__(self, dim: int, device=None, dtype=None) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.bn(x.float().transpose(1, 2)).transpose(1, 2)


NORMS = ("layer", "batch")  # the values of decoder.norm


class Decoder(nn.Module):
    """Encoder tokens + one <mask> query per target patch -> a transformer -> query features.

    norm="layer": timm Blocks (LayerNorm) and a final LayerNorm. norm="batch": SiameseIM's
    decoder blocks, a TokenBatchNorm in place of each block's two LayerNorms, and no final
    norm. `projector_depth` blocks (SiameseIM's projector) run on the embedded encoder tokens
    before positions are added and the queries join; `projection()` is that part (embed +
    projector), of which an EMA copy maps the teacher's tokens to SiameseIM's targets.
    """

    def __init__(
        self,
        encoder_dim: int,
        dim: int,
        depth: int,
        heads: int,
        norm: str = "layer",
        projector_depth: int = 0,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"decoder.norm must be {' or '.join(NORMS)}, got {norm!r}")
        self.dim = dim
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.geometry = nn.Linear(3, dim, bias=False)
        block_args = {"mlp_ratio": 4.0, "qkv_bias": qkv_bias}
        if norm == "batch":
            block_args["norm_layer"] = TokenBatchNorm
        self.projector = nn.Sequential(
            *[Block(dim, heads, **block_args) for _ in range(projector_depth)]
        )
        self.blocks = nn.Sequential(*[Block(dim, heads, **block_args) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim) if norm == "layer" else nn.Identity()
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.zeros_(self.geometry.weight)

    def projection(self) -> nn.Sequential:
        """The embedding and the projector blocks (the same modules, not a copy)."""
        return nn.Sequential(self.embed, self.projector)

    def query_embedding(self, coords: torch.Tensor, geometry: torch.Tensor | None) -> torch.Tensor:
        """The position part of the queries, (N, Q, dim): sin-cos of coords + relative geometry."""
        emb = sincos_embedding(coords, self.dim)
        if geometry is None:  # queries in the input's own view: identity geometry (zeros), kept
            geometry = coords.new_zeros(coords.shape[0], 3)  # in the graph for DDP
        return emb + self.geometry(geometry)[:, None]

    def forward(
        self,
        tokens: torch.Tensor,
        token_coords: torch.Tensor,
        query_coords: torch.Tensor,
        query_geometry: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens (N, L, De) at token_coords (N, L, 2); queries at (N, Q, 2) -> (N, Q, dim)."""
        x = self.projector(self.embed(tokens)) + sincos_embedding(token_coords, self.dim)
        queries = self.mask_token + self.query_embedding(query_coords, query_geometry)
        h = self.blocks(torch.cat([x, queries.to(x.dtype)], dim=1))
        return self.norm(h[:, tokens.shape[1] :])
