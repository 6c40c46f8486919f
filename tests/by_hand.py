"""References computed by hand for the tests: timm's ViT blocks run one operation at a time."""

import torch


def vit_blocks_by_hand(vit, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(final normed patch tokens, each block's MLP output on the patch tokens before its
    residual add), timm's blocks run by hand."""
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
    outputs = []
    for block in vit.blocks:
        x = x + block.ls1(block.attn(block.norm1(x)))
        mlp = block.mlp(block.norm2(x))
        x = x + block.ls2(mlp)
        outputs.append(mlp[:, vit.num_prefix_tokens :])
    return vit.norm(x)[:, vit.num_prefix_tokens :], outputs
