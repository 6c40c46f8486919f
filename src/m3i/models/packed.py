"""Packed isolated attention for a timm ViT (`model.attention=packed`): the two images of a mix
in ONE sequence per sample, each image's tokens (with its own prefix tokens) one segment, and
attention restricted to a token's own segment: a block-diagonal ("document") mask.

Two kernels compute the same thing, chosen by device (`packed_kernel`):
- `flex` on CUDA: `torch.nn.attention.flex_attention`, compiled, with a `BlockMask` whose
  fully masked blocks are skipped (no score is computed between the two images);
- `sdpa` elsewhere: `F.scaled_dot_product_attention` with a boolean (L, L) mask, through
  timm's own `Attention`. On the CPU torch 2.14's FlexAttention has no backward, and without
  compilation it materialises the full score matrix anyway.

The blocks stay timm's: a block is called as a module (so hooks such as FSDP's unshard run) with
the mask as its `attn_mask`; for `flex` its `attn.forward` is replaced on the instance by
`flex_capable_forward`, which runs timm's own qkv, q/k norms, output norm, gate and projection
around flex_attention and falls back to timm's forward for any other mask.
"""

from __future__ import annotations

import functools
import types

import torch
from timm.models.vision_transformer import Attention
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

KERNELS = ("flex", "sdpa")
# compiled lazily on the first call (a fused Triton kernel on CUDA; uncompiled it is a reference)
_compiled_flex_attention = torch.compile(flex_attention, dynamic=False)


def packed_kernel(device: torch.device) -> str:
    """The kernel the packed attention uses on a device: `flex` on CUDA, else `sdpa`."""
    return "flex" if device.type == "cuda" else "sdpa"


def segment_ids(lengths: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The segment of each position of a packed sequence, (sum(lengths),); built from Python
    integers, so that a compiled step sees static shapes."""
    return torch.cat(
        [torch.full((length,), index, device=device) for index, length in enumerate(lengths)]
    )


def packed_mask(
    lengths: tuple[int, ...], device: torch.device, kernel: str
) -> torch.Tensor | BlockMask:
    """The block-diagonal mask of segments of `lengths` (True: may attend), for one kernel:
    a boolean (L, L) tensor for `sdpa`, a BlockMask shared by every sample and head for `flex`.
    Cached by its arguments, except under torch.compile, which traces it into the graph."""
    if torch.compiler.is_compiling():
        return _build_mask(lengths, device, kernel)
    return _cached_mask(lengths, device, kernel)


def _build_mask(
    lengths: tuple[int, ...], device: torch.device, kernel: str
) -> torch.Tensor | BlockMask:
    if kernel not in KERNELS:
        raise ValueError(f"packed attention kernel {kernel!r}; use one of {', '.join(KERNELS)}")
    ids = segment_ids(lengths, device)
    if kernel == "sdpa":
        return ids[:, None] == ids[None, :]

    def same_segment(_batch, _head, query, key):
        return ids[query] == ids[key]

    total = sum(lengths)
    return create_block_mask(same_segment, None, None, total, total, device=device)


_cached_mask = functools.lru_cache(maxsize=16)(_build_mask)


def flex_capable_forward(
    self: Attention,
    x: torch.Tensor,
    attn_mask: torch.Tensor | BlockMask | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """timm's `Attention.forward`, except that a BlockMask runs flex_attention (compiled on
    CUDA) in place of SDPA; the same projections, norms and gate."""
    if not isinstance(attn_mask, BlockMask):
        return Attention.forward(self, x, attn_mask, is_causal)
    n, length, _ = x.shape
    gate = self.gate(x).sigmoid() if self.gate is not None else None
    qkv = self.qkv(x).reshape(n, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    attend = _compiled_flex_attention if x.device.type == "cuda" else flex_attention
    x = attend(q, k, v, block_mask=attn_mask, scale=self.scale)
    x = self.norm(x.transpose(1, 2).reshape(n, length, self.attn_dim))
    if gate is not None:
        x = x * gate
    return self.proj_drop(self.proj(x))


def install_flex(blocks: nn.Sequential, name: str) -> None:
    """Let every block's attention take a BlockMask (`flex_capable_forward` on the instance); a
    one-line ValueError when a block's attention is not timm's plain `Attention` without
    attention dropout (flex_attention has none)."""
    for block in blocks:
        attn = getattr(block, "attn", None)
        if type(attn) is not Attention or attn.attn_drop.p != 0:
            raise ValueError(
                f"model.attention=packed needs timm's Attention without attention dropout in "
                f"every block; {name} has {type(attn).__name__}: use model.attention=separate"
            )
        attn.forward = types.MethodType(flex_capable_forward, attn)
