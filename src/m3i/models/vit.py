"""A timm VisionTransformer behind the backbone contract: the patch mix of two images, each
isolated from the other.

Image A of a mixed input occupies some grid positions and image B the others. With
`isolate=True` (the default) attention is restricted to tokens of the same image, which is
exactly running each image's tokens as its own sequence (with its own prefix tokens). With
`model.attention=separate` (the default) that is how it is computed: two short sequences per
sample. With `model.attention=packed` both images' sequences are packed into one per sample with
a block-diagonal attention mask (models/packed.py). With `isolate=False` the mixed sequence is
one sequence and the two images see each other.
"""

from __future__ import annotations

import math

import timm
import torch
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn
from torch.utils.checkpoint import checkpoint

from m3i.data.mixing import gather_tokens
from m3i.models.backbone import FAMILIES, Backbone, Check, no_class_token, register
from m3i.models.config import ModelConfig
from m3i.models.packed import install_flex, packed_kernel, packed_mask


def _is_size(value: object) -> bool:
    return type(value) is int and value >= 1


@register
class ViTBackbone(Backbone):
    """The image backbone f_theta as a timm VisionTransformer with absolute positions."""

    family = "vit"
    timm_class = VisionTransformer
    has_class_token = True  # timm's ViTs have one unless built with class_token=False
    # The timm keyword arguments m3i writes into a ViT backbone file, each with the values it may
    # hold: nothing else reaches timm.create_model (e.g. no checkpoint_path).
    timm_kwargs_allowed: dict[str, Check] = {
        "img_size": ("an integer >= 1", _is_size),
        "patch_size": ("an integer >= 1", _is_size),
        "depth": ("an integer >= 1", _is_size),
        "num_classes": ("0", lambda value: type(value) is int and value == 0),
        "global_pool": ("'avg'", lambda value: value == "avg"),
        "fc_norm": ("false", lambda value: value is False),
        "drop_path_rate": (
            "a number in [0, 1)",
            lambda value: type(value) in (int, float) and 0 <= value < 1,
        ),
    }

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.timm_kwargs = {
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
        self.attention = cfg.attention
        # the packed kernel: None picks it by device (packed_kernel), else "flex" or "sdpa"
        self.attention_kernel: str | None = None
        if cfg.attention == "packed":
            install_flex(vit.blocks, cfg.name)
        self.embed_dim = vit.embed_dim
        self.grid = tuple(vit.patch_embed.grid_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.has_class_token = vit.cls_token is not None
        if cfg.freeze_patch_embed:
            self.freeze_patch_embedding()

    checkpoint_filter = staticmethod(checkpoint_filter_fn)  # timm's: resamples pos_embed

    @classmethod
    def claims(cls, name: str) -> bool:
        """The default family: every timm name no other family claims (whether it is a
        VisionTransformer is checked on the model)."""
        return not any(family.claims(name) for family in FAMILIES.values() if family is not cls)

    @classmethod
    def model_settings(cls, timm_kwargs: dict) -> dict[str, object]:
        return {key: timm_kwargs.get(key) for key in ("img_size", "patch_size", "depth")}

    @property
    def timm_model(self) -> nn.Module:
        return self.vit

    def blocks(self) -> list[nn.Module]:
        return list(self.vit.blocks)

    @property
    def block_outputs(self) -> int:
        return len(self.vit.blocks)

    def patch_embedding(self) -> nn.Module:
        return self.vit.patch_embed

    def freeze_patch_embedding(self) -> None:
        """MoCo v3's random patch projection: the projection drawn as MoCo v3 (and SiameseIM)
        draws it, uniform in +-sqrt(6 / (fan_in + D)) over the flattened (D, 3 p p) weight,
        bias 0, then kept untrained."""
        proj = self.vit.patch_embed.proj
        weight = proj.weight.view(proj.weight.shape[0], -1)
        bound = math.sqrt(6.0 / (weight.shape[0] + weight.shape[1]))
        with torch.no_grad():
            nn.init.uniform_(proj.weight, -bound, bound)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        super().freeze_patch_embedding()

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embeddings plus their position embeddings, (N, P, D), before any block."""
        x = self.vit.patch_embed(images)
        pos = self.vit.pos_embed
        if not self.vit.no_embed_class:
            pos = pos[:, self.vit.num_prefix_tokens :]
        return x + pos

    embed_patches = embed

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

    def _sequence(self, tokens: torch.Tensor) -> torch.Tensor:
        """The blocks and the final norm on embedded patch tokens (N, L, D) with this model's
        prefix tokens in front: (N, prefix + L, D)."""
        prefix = self._prefix(tokens.shape[0])
        x = tokens if prefix is None else torch.cat([prefix, tokens], dim=1)
        x = self.vit.norm_pre(self.vit.pos_drop(x))
        if self.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint_seq(self.vit.blocks, x, use_reentrant=False)  # DDP-safe
        else:
            x = self.vit.blocks(x)
        return self.vit.norm(x)

    def _split(self, sequence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A `_sequence` output -> its patch tokens and its class token (timm puts it first)."""
        class_token = sequence[:, 0] if self.has_class_token else None
        return sequence[:, self.vit.num_prefix_tokens :], class_token

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run the blocks on embedded patch tokens (N, L, D) with this model's prefix tokens."""
        return self._sequence(tokens)[:, self.vit.num_prefix_tokens :]

    def encode_token_mix(
        self,
        tokens_a: torch.Tensor,
        tokens_b: torch.Tensor,
        isolate: bool = True,
        class_tokens: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """Encode the mixed input of image A's tokens and image B's tokens, (N, La|Lb, D); with
        `class_tokens` also each image's own class token, (N, D) or None for an image without
        tokens (`Backbone.encode_mix`)."""
        if class_tokens and not self.has_class_token:
            raise no_class_token(self.timm_name)
        la, lb = tokens_a.shape[1], tokens_b.shape[1]
        if class_tokens and not isolate and la and lb:
            raise ValueError(
                "a mix that is not isolated (mix.isolate=false) has one class token for both "
                "images; isolate them (mix.isolate=true) to read each image's own"
            )
        if isolate and self.attention == "packed":
            out = self.encode_packed(tokens_a, tokens_b, class_tokens=True)
        elif not isolate and la and lb:
            mixed = self.encode(torch.cat([tokens_a, tokens_b], dim=1))
            out = (mixed[:, :la], mixed[:, la:], None, None)
        elif la == lb and la:  # one batch of 2N sequences
            both, both_class = self._split(self._sequence(torch.cat([tokens_a, tokens_b], 0)))
            n = tokens_a.shape[0]
            classes = (None, None) if both_class is None else (both_class[:n], both_class[n:])
            out = (both[:n], both[n:], *classes)
        else:  # each image its own sequences; an image without tokens is not encoded
            (a, class_a), (b, class_b) = [
                self._split(self._sequence(t)) if t.shape[1] else (t, None)
                for t in (tokens_a, tokens_b)
            ]
            out = (a, b, class_a, class_b)
        return out if class_tokens else out[:2]

    def encode_packed(
        self, tokens_a: torch.Tensor, tokens_b: torch.Tensor, class_tokens: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """Isolated encoding of A's and B's tokens, (N, La|Lb, D), as ONE sequence per sample:
        [A's prefix, A's tokens, B's prefix, B's tokens] (an image without tokens adds nothing),
        attention restricted to each image's own segment. Drop-path drops a block's branch for
        the whole sample (both images together, as one mixed sequence would). With
        `class_tokens`, also each image's own class token (None without tokens or one)."""
        n = tokens_a.shape[0]
        segments = [tokens for tokens in (tokens_a, tokens_b) if tokens.shape[1] > 0]
        prefix = self._prefix(n)
        if prefix is not None:
            segments = [torch.cat([prefix, tokens], dim=1) for tokens in segments]
        lengths = tuple(segment.shape[1] for segment in segments)
        x = self.vit.norm_pre(self.vit.pos_drop(torch.cat(segments, dim=1)))
        mask = None
        if len(lengths) > 1:
            kernel = self.attention_kernel or packed_kernel(x.device)
            mask = packed_mask(lengths, x.device, kernel)
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.vit.blocks:
            if recompute:
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, attn_mask=mask)
        outputs = iter(self.vit.norm(x).split(lengths, dim=1))
        split = [
            self._split(next(outputs)) if tokens.shape[1] > 0 else (tokens, None)
            for tokens in (tokens_a, tokens_b)
        ]
        (a, class_a), (b, class_b) = split
        return (a, b, class_a, class_b) if class_tokens else (a, b)

    def encode_mix(
        self,
        images: torch.Tensor,
        partners: torch.Tensor,
        pos_a: torch.Tensor,
        pos_b: torch.Tensor,
        isolate: bool = True,
        class_tokens: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """One patch embedding of `images`; A's patches at `pos_a`, B's (`images[partners]`)
        at `pos_b`, encoded by `encode_token_mix`."""
        patches = self.embed(images)
        return self.encode_token_mix(
            gather_tokens(patches, pos_a),
            gather_tokens(patches[partners], pos_b),
            isolate,
            class_tokens,
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Dense patch tokens of full views, (N, P, D)."""
        return self.encode(self.embed(images))

    def forward_with_block_outputs(
        self, images: torch.Tensor, last: int
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`forward`, plus the MLP outputs of the last `last` blocks (all of them when there are
        fewer), each (N, P, D) over patch tokens, in block order.

        A block's MLP output is its feed-forward branch before the residual add (and before any
        layer scale): data2vec 2.0's per-block target (its `end_of_block_targets: false`).
        """
        if last < 1:
            raise ValueError(f"last must be >= 1 block, got {last}")
        tokens, outputs, _ = self._with_block_outputs(images, last)
        return tokens, outputs

    def forward_with_class_token(
        self, images: torch.Tensor, last: int = 0
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        if not self.has_class_token:
            raise no_class_token(self.timm_name)
        return self._with_block_outputs(images, last)

    def _with_block_outputs(
        self, images: torch.Tensor, last: int
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
        """Dense tokens, the MLP outputs of the last `last` blocks (none for 0) over the patch
        tokens, and the class token (None without one), in one pass."""
        outputs: list[torch.Tensor] = []
        hooks = [
            block.mlp.register_forward_hook(lambda _module, _args, out: outputs.append(out))
            for block in (list(self.vit.blocks)[-last:] if last > 0 else [])
        ]
        try:
            tokens, class_token = self._split(self._sequence(self.embed(images)))
        finally:
            for hook in hooks:
                hook.remove()
        n_prefix = self.vit.num_prefix_tokens
        return tokens, [out[:, n_prefix:] for out in outputs], class_token

    @classmethod
    def input_size(cls, model: nn.Module) -> int:
        return model.patch_embed.img_size[0]

    @classmethod
    def frozen_features(
        cls, model: nn.Module, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """timm's pooled pre-logits (the mean of the normalised patch tokens) and those tokens."""
        out = model.forward_features(images)
        return model.forward_head(out, pre_logits=True), out[:, model.num_prefix_tokens :]
