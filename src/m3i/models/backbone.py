"""A timm VisionTransformer that encodes the patch mix of two images, each isolated from the other.

Image A of a mixed input occupies some grid positions and image B the others. With
`isolate=True` (the default) attention is restricted to tokens of the same image, which is
exactly running each image's tokens as its own sequence (with its own prefix tokens): that is
how it is computed, with no masked dense attention. With `isolate=False` the mixed sequence is
one sequence and the two images see each other.
"""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, safe_open
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from m3i.config import ModelConfig
from m3i.io import atomic_save_safetensors


class Backbone(nn.Module):
    """The image backbone f_theta: dense patch tokens of visible positions, plus export."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.timm_name = cfg.name
        self.timm_kwargs: dict = {
            "img_size": cfg.img_size,
            "patch_size": cfg.patch_size,
            "num_classes": 0,
            "global_pool": "avg",
            "fc_norm": False,  # keep the final LayerNorm on every token (plain timm keys)
            "drop_path_rate": cfg.drop_path,
        }
        if cfg.depth is not None:
            self.timm_kwargs["depth"] = cfg.depth
        try:
            vit = timm.create_model(cfg.name, pretrained=False, **self.timm_kwargs)
        except (RuntimeError, TypeError, AssertionError) as err:
            raise ValueError(f"model.name {cfg.name!r}: {err}") from None
        if not isinstance(vit, VisionTransformer) or vit.pos_embed is None:
            raise ValueError(
                f"model.name {cfg.name!r} is not a timm VisionTransformer with absolute position "
                "embeddings; use e.g. vit_tiny_patch16_224 or vit_base_patch16_224"
            )
        self.vit = vit
        self.embed_dim: int = vit.embed_dim
        self.patch_size: int = cfg.patch_size
        self.grid: tuple[int, int] = tuple(vit.patch_embed.grid_size)
        self.num_patches: int = self.grid[0] * self.grid[1]
        self.grad_checkpointing = False  # recompute each block in backward (saves memory)

    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embeddings plus their position embeddings, (N, P, D), before any block."""
        x = self.vit.patch_embed(images)
        pos = self.vit.pos_embed
        if not self.vit.no_embed_class:
            pos = pos[:, self.vit.num_prefix_tokens :]
        return x + pos

    def _prefix(self, n: int) -> torch.Tensor | None:
        vit, parts = self.vit, []
        if vit.cls_token is not None:
            parts.append(vit.cls_token.expand(n, -1, -1))
        if vit.reg_token is not None:
            parts.append(vit.reg_token.expand(n, -1, -1))
        if not parts:
            return None
        prefix = torch.cat(parts, dim=1)
        if not vit.no_embed_class:
            prefix = prefix + vit.pos_embed[:, : vit.num_prefix_tokens]
        return prefix

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run the blocks on embedded patch tokens (N, L, D) with this model's prefix tokens."""
        n_prefix = self.vit.num_prefix_tokens
        prefix = self._prefix(tokens.shape[0])
        x = tokens if prefix is None else torch.cat([prefix, tokens], dim=1)
        x = self.vit.norm_pre(self.vit.pos_drop(x))
        if self.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint_seq(self.vit.blocks, x, use_reentrant=False)  # DDP-safe
        else:
            x = self.vit.blocks(x)
        return self.vit.norm(x)[:, n_prefix:]

    def encode_mix(
        self,
        tokens_a: torch.Tensor,
        tokens_b: torch.Tensor,
        isolate: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode the mixed input of image A's tokens and image B's tokens, (N, La|Lb, D)."""
        la, lb = tokens_a.shape[1], tokens_b.shape[1]
        if lb == 0:
            return self.encode(tokens_a), tokens_b
        if la == 0:
            return tokens_a, self.encode(tokens_b)
        if not isolate:
            out = self.encode(torch.cat([tokens_a, tokens_b], dim=1))
            return out[:, :la], out[:, la:]
        if la == lb:
            out = self.encode(torch.cat([tokens_a, tokens_b], dim=0))
            return out[: tokens_a.shape[0]], out[tokens_a.shape[0] :]
        return self.encode(tokens_a), self.encode(tokens_b)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Dense patch tokens of full views, (N, P, D)."""
        return self.encode(self.embed_patches(images))

    def forward_with_mlp_outputs(
        self, images: torch.Tensor, last: int
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`forward`, plus the MLP outputs of the last `last` blocks (all of them when there are
        fewer), each (N, P, D) over patch tokens, in block order.

        A block's MLP output is its feed-forward branch before the residual add (and before any
        layer scale): data2vec 2.0's per-block target (its `end_of_block_targets: false`).
        """
        if last < 1:
            raise ValueError(f"last must be >= 1 block, got {last}")
        outputs: list[torch.Tensor] = []
        hooks = [
            block.mlp.register_forward_hook(lambda _module, _args, out: outputs.append(out))
            for block in list(self.vit.blocks)[-last:]
        ]
        try:
            tokens = self(images)
        finally:
            for hook in hooks:
                hook.remove()
        n_prefix = self.vit.num_prefix_tokens
        return tokens, [out[:, n_prefix:] for out in outputs]

    def save(self, path: str | Path, state: dict[str, torch.Tensor] | None = None) -> None:
        """Write the weights (or `state`, e.g. gathered from shards) as a plain timm state dict,
        with the timm arguments as metadata."""
        state = self.vit.state_dict() if state is None else state
        state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        metadata = {"timm_name": self.timm_name, "timm_kwargs": json.dumps(self.timm_kwargs)}
        atomic_save_safetensors(state, path, metadata)


def read_backbone_metadata(path: str | Path) -> tuple[str, dict]:
    """The timm model name and keyword arguments stored in an m3i backbone.safetensors."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if "timm_name" not in metadata:
        raise ValueError(f"{path} is not an m3i backbone (no timm_name in its metadata)")
    return metadata["timm_name"], json.loads(metadata["timm_kwargs"])


def load_timm_model(path: str | Path) -> VisionTransformer:
    """`timm.create_model` + `load_state_dict` from an m3i backbone.safetensors."""
    name, kwargs = read_backbone_metadata(path)
    model = timm.create_model(name, pretrained=False, **kwargs)
    model.load_state_dict(load_file(str(path)))
    return model
