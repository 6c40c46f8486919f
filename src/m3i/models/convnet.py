"""A timm ConvNeXt / ConvNeXt V2 behind the backbone contract (METHOD.md section 6).

The mix is laid out on the grid of the coarsest stride (`model.patch_size`, timm's
`output_stride`: 8, 16 or 32; below 32 the last stages are dilated, as timm does for dense
prediction) and upsampled to pixels. Each image is isolated as ConvNeXt V2's FCMAE isolates
the visible part of a masked image: its input holds its own cells only (the others are zero),
and the other cells are set to zero again after every layer of the stem and of each
downsampling and after every block, while each GlobalResponseNorm (V2) sees zeros there. A
dense convolution on a map that is zero outside the visible cells, masked again afterwards, is
the sparse convolution FCMAE runs, and every normalisation is per position (LayerNorm) or sees
only visible cells (GRN): so image A's tokens depend on A's pixels in A's cells only. The two
images run as one batch of 2N, each with its own mask; the tokens of the zeroed cells are
discarded.

Dense tokens are the last stage's map with timm's head LayerNorm applied at every position
(the ConvNeXt counterpart of a ViT's final norm), one per grid cell; pooled features are their
mean over an image's own cells.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import timm
import torch
import torch.nn.functional as F
from timm.layers.grn import GlobalResponseNorm
from timm.models.convnext import ConvNeXt, ConvNeXtBlock, checkpoint_filter_fn
from torch import nn
from torch.utils.checkpoint import checkpoint

from m3i.data.mixing import gather_tokens
from m3i.models.backbone import Backbone, Check, no_class_token, register
from m3i.models.config import ModelConfig

STRIDES = (8, 16, 32)  # the output strides timm's ConvNeXt builds


def _is_depths(value: object) -> bool:
    return isinstance(value, list) and len(value) == 4 and all(_is_count(d) for d in value)


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 1


@contextmanager
def _grn_sees_visible_cells(block: nn.Module, mask: torch.Tensor) -> Iterator[None]:
    """While inside, every GlobalResponseNorm of `block` reads zeros outside the mask (its
    spatial norm then runs over the visible cells only, as FCMAE's sparse GRN)."""

    def zero_hidden(module: GlobalResponseNorm, args: tuple) -> tuple:
        x = args[0]
        return (x * (mask if module.channel_dim == 1 else mask.permute(0, 2, 3, 1)),)

    hooks = [
        m.register_forward_pre_hook(zero_hidden)
        for m in block.modules()
        if isinstance(m, GlobalResponseNorm)
    ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _renamed(key: str, prefix: str, replacement: str) -> str:
    return replacement + key[len(prefix) :] if key.startswith(prefix) else key


def _layers(module: nn.Module) -> list[nn.Module]:
    return list(module) if isinstance(module, nn.Sequential) else [module]


def _masked_block(block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One block; with a mask, zero outside it inside every GRN and after the block."""
    if mask is None:
        return block(x)
    with _grn_sees_visible_cells(block, mask):
        return block(x) * mask


@register
class ConvNetBackbone(Backbone):
    """The image backbone f_theta as a timm ConvNeXt (V1 or V2), `model.patch_size` its stride."""

    family = "convnet"
    timm_class = ConvNeXt
    timm_kwargs_allowed: dict[str, Check] = {
        "output_stride": ("8, 16 or 32", lambda value: type(value) is int and value in STRIDES),
        "depths": ("a list of 4 integers >= 1", _is_depths),
        "num_classes": ("0", lambda value: type(value) is int and value == 0),
        "drop_path_rate": (
            "a number in [0, 1)",
            lambda value: type(value) in (int, float) and 0 <= value < 1,
        ),
    }

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        if cfg.patch_size not in STRIDES:
            raise ValueError(
                f"model.patch_size={cfg.patch_size} for {cfg.name}: a ConvNeXt's grid cell is its "
                f"output stride; use one of {', '.join(map(str, STRIDES))}"
            )
        if cfg.attention != "separate":
            raise ValueError(
                f"model.attention={cfg.attention} is for ViT backbones; {cfg.name} isolates by "
                "masking cells: use model.attention=separate"
            )
        self.timm_kwargs = {
            "output_stride": cfg.patch_size,
            "num_classes": 0,
            "drop_path_rate": cfg.drop_path,
        }
        if cfg.depth is not None:
            self.timm_kwargs["depths"] = [cfg.depth] * 4
        try:
            convnet = timm.create_model(cfg.name, pretrained=False, **self.timm_kwargs)
        except (RuntimeError, TypeError, AssertionError) as err:
            raise ValueError(f"model.name {cfg.name!r}: {err}") from None
        if not isinstance(convnet, ConvNeXt) or not isinstance(convnet.head.norm, nn.Module):
            raise ValueError(f"model.name {cfg.name!r} is not a timm ConvNeXt; use convnext_atto")
        self.convnet = convnet
        self.embed_dim = convnet.num_features
        if cfg.freeze_patch_embed:  # the stem, at timm's initialisation
            self.freeze_patch_embedding()

    checkpoint_filter = staticmethod(checkpoint_filter_fn)  # timm's (FB layouts to timm's)
    # m3i pools a ConvNeXt as timm's head_norm_first=True does (the head's LayerNorm at every
    # position, then the mean): the export's norm is that model's norm_pre
    HEAD_NORM, NORM_FIRST = "head.norm.", "norm_pre."
    timm_dir_args = {"head_norm_first": True}

    @classmethod
    def claims(cls, name: str) -> bool:
        return name in timm.list_models(module="convnext")

    @classmethod
    def to_timm_dir(cls, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {_renamed(k, cls.HEAD_NORM, cls.NORM_FIRST): v for k, v in state.items()}

    @classmethod
    def from_timm_dir(cls, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {_renamed(k, cls.NORM_FIRST, cls.HEAD_NORM): v for k, v in state.items()}

    @classmethod
    def model_settings(cls, timm_kwargs: dict) -> dict[str, object]:
        depths = timm_kwargs.get("depths")
        return {
            "patch_size": timm_kwargs.get("output_stride"),
            "depth": None if depths is None else depths[0],
        }

    @property
    def timm_model(self) -> nn.Module:
        return self.convnet

    def blocks(self) -> list[nn.Module]:
        return [block for stage in self.convnet.stages for block in stage.blocks]

    @property
    def block_outputs(self) -> int:
        """The last stage's blocks (earlier stages have other widths and grids)."""
        return len(self.convnet.stages[-1].blocks)

    def patch_embedding(self) -> nn.Module:
        """The stem: a 4 x 4 convolution of stride 4 (ConvNeXt's "patchify" layer) and its
        LayerNorm."""
        return self.convnet.stem

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The stem's feature map, (N, C, H/4, W/4)."""
        return self.convnet.stem(images)

    def _features(self, images: torch.Tensor, cells: torch.Tensor | None) -> torch.Tensor:
        """Tokens (N, P, D) of images whose cells outside `cells` (N, 1, g, g; 1 = visible) are
        zeroed at the input and after every layer that mixes positions; None: full views."""
        convnet = self.convnet

        def keep(x: torch.Tensor) -> torch.Tensor | None:  # the mask at x's size and dtype
            if cells is None:
                return None
            return F.interpolate(cells, size=x.shape[-2:], mode="nearest").to(x.dtype)

        def zero_hidden(x: torch.Tensor) -> torch.Tensor:
            return x if cells is None else x * keep(x)

        x = zero_hidden(images)
        for stage in convnet.stages:
            stem = _layers(convnet.stem) if stage is convnet.stages[0] else []
            for layer in stem + _layers(stage.downsample):  # convolutions and norms
                x = zero_hidden(layer(x))
            mask = keep(x)
            for block in stage.blocks:
                if self.grad_checkpointing and torch.is_grad_enabled():
                    x = checkpoint(_masked_block, block, x, mask, use_reentrant=False)
                else:
                    x = _masked_block(block, x, mask)
        x = convnet.head.norm(convnet.norm_pre(x))  # per position
        return x.flatten(2).transpose(1, 2)

    def encode_mix(
        self,
        images: torch.Tensor,
        partners: torch.Tensor,
        pos_a: torch.Tensor,
        pos_b: torch.Tensor,
        isolate: bool = True,
        class_tokens: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Isolated: A (its cells `pos_a` visible) and B (`images[partners]`, cells `pos_b`)
        encoded as one masked batch of 2N; not isolated: one pass over the mixed image. A
        ConvNeXt has no class token (`class_tokens` is refused)."""
        if class_tokens:
            raise no_class_token(self.timm_name)
        n, (la, lb) = images.shape[0], (pos_a.shape[1], pos_b.shape[1])
        cells_a, cells_b = self._cells(pos_a, n), self._cells(pos_b, n)
        empty = images.new_zeros(n, 0, self.embed_dim)
        if not isolate and la and lb:
            size = images.shape[-2:]
            mixed = images * F.interpolate(cells_a, size) + images[partners] * F.interpolate(
                cells_b, size
            )
            tokens = self._features(mixed, None)
            return gather_tokens(tokens, pos_a), gather_tokens(tokens, pos_b)
        inputs = ([images] if la else []) + ([images[partners]] if lb else [])
        if not inputs:
            return empty, empty
        cells = torch.cat(([cells_a] if la else []) + ([cells_b] if lb else []))
        tokens = self._features(torch.cat(inputs), cells)
        tokens_a = gather_tokens(tokens[:n], pos_a) if la else empty
        tokens_b = gather_tokens(tokens[-n:], pos_b) if lb else empty
        return tokens_a, tokens_b

    def _cells(self, positions: torch.Tensor, n: int) -> torch.Tensor:
        """(N, 1, g, g) float mask, 1 at the given cells."""
        cells = positions.new_zeros(n, self.num_patches, dtype=torch.float32)
        cells.scatter_(1, positions, 1.0)
        return cells.view(n, 1, *self.grid)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Dense tokens of full views, (N, P, D), one per grid cell."""
        return self._features(images, None)

    def forward_with_block_outputs(
        self, images: torch.Tensor, last: int
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`forward`, plus the MLP outputs of the last `last` blocks of the last stage (all of
        its blocks when it has fewer: earlier stages have other widths), each (N, P, D)."""
        if last < 1:
            raise ValueError(f"last must be >= 1 block, got {last}")
        outputs: list[torch.Tensor] = []
        blocks: list[ConvNeXtBlock] = list(self.convnet.stages[-1].blocks)[-last:]
        hooks = [
            block.mlp.register_forward_hook(
                lambda module, _args, out, conv=block.use_conv_mlp: outputs.append(
                    out.flatten(2).transpose(1, 2) if conv else out.flatten(1, 2)
                )
            )
            for block in blocks
        ]
        try:
            tokens = self(images)
        finally:
            for hook in hooks:
                hook.remove()
        return tokens, outputs

    @classmethod
    def input_size(cls, model: nn.Module) -> int:
        """The side `load_timm_model` read from the export (a ConvNeXt takes any multiple of
        its stride; timm's default 224 otherwise)."""
        return model.pretrained_cfg["input_size"][-1]

    @classmethod
    def frozen_features(
        cls, model: nn.Module, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The dense tokens training computes (timm's features, head norm at each position) and
        their mean."""
        out = model.head.norm(model.forward_features(images))
        dense = out.flatten(2).transpose(1, 2)
        return dense.mean(dim=1), dense
