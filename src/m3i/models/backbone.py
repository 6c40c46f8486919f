"""The backbone contract: what the step, sharding, monitors, eval and export ask of an image
backbone f_theta, whatever its family (a timm ViT in models/vit.py, a timm ConvNeXt in
models/convnet.py), and its export as a plain timm state dict.

Geometry: the mix of two images is laid out on a `grid` of `num_patches` cells, each
`patch_size` pixels square (a ViT's patches; a ConvNet's coarsest stride). Dense features are
one token per cell, (N, P, D) with D = `embed_dim`, row-major; pooled features average them.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import timm
import torch
from safetensors.torch import load_file, safe_open
from torch import nn

from m3i.errors import first_line
from m3i.io import atomic_save_safetensors
from m3i.models.config import ModelConfig

Check = tuple[str, Callable[[object], bool]]  # what a timm keyword argument may hold, and a test


class Backbone(nn.Module, ABC):
    """An image backbone that encodes the cell mix of two images, each isolated from the other.

    `Backbone(cfg)` builds the family registered for `cfg.name` (see `family_for`). A backbone
    holds its timm model as its only child module (`timm_model`), so that its state dict, less
    that child's name, is the timm state dict it exports.
    """

    family: ClassVar[str]  # the registry key
    timm_class: ClassVar[type[nn.Module]]  # the timm model class an export must build
    timm_kwargs_allowed: ClassVar[dict[str, Check]]  # the export's timm arguments and values
    # whether the family's models have a class token (a ViT built without one says so on its
    # instance): what `forward_with_class_token` and `encode_mix(class_tokens=True)` read
    has_class_token: ClassVar[bool] = False
    # the timm arguments a `local-dir` export adds, so that timm pools as m3i does
    timm_dir_args: ClassVar[dict[str, object]] = {}

    def __new__(cls, cfg: ModelConfig | None = None, *args, **kwargs) -> Backbone:
        if cls is Backbone:  # (copy.deepcopy calls __new__ on the family, with no config)
            cls = family_for(cfg.name)
        return super().__new__(cls)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.timm_name = cfg.name
        self.img_size: int = cfg.img_size
        self.timm_kwargs: dict = {}
        self.embed_dim: int = 0
        self.patch_size: int = cfg.patch_size  # pixels per side of one grid cell
        self.grid: tuple[int, int] = (cfg.img_size // cfg.patch_size,) * 2
        self.num_patches: int = self.grid[0] * self.grid[1]
        self.grad_checkpointing = False  # recompute each block in backward (saves memory)

    @classmethod
    @abstractmethod
    def claims(cls, name: str) -> bool:
        """Whether a timm model name belongs to this family."""

    @property
    @abstractmethod
    def timm_model(self) -> nn.Module:
        """The timm model whose state dict is exported."""

    @abstractmethod
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The input of the first block (ViT: patch tokens with positions, (N, P, D); ConvNet:
        the stem's feature map, (N, C, H/4, W/4))."""

    @abstractmethod
    def encode_mix(
        self,
        images: torch.Tensor,
        partners: torch.Tensor,
        pos_a: torch.Tensor,
        pos_b: torch.Tensor,
        isolate: bool = True,
        class_tokens: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """Tokens of the mix of image A = `images` at cells `pos_a` (N, La) and image B =
        `images[partners]` at cells `pos_b` (N, Lb): (N, La, D) and (N, Lb, D). With `isolate`
        A's tokens depend on A's pixels in its own cells only, and B's on B's. With
        `class_tokens` (a backbone with a class token, each image isolated), also each image's
        class token after the final norm, (N, D) (None for an image without cells):
        (tokens_a, tokens_b, class_a, class_b)."""

    @abstractmethod
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Dense tokens of full views, (N, P, D)."""

    def forward_with_class_token(
        self, images: torch.Tensor, last: int = 0
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """`forward`, the MLP outputs of the last `last` blocks (none for 0; as
        `forward_with_block_outputs`) and the class token after the final norm, (N, D): what a
        ViT's classifier reads with timm's global_pool="token" (MoCo v3's features)."""
        raise no_class_token(self.timm_name)

    @abstractmethod
    def patch_embedding(self) -> nn.Module:
        """The layer that embeds pixels before the first block (ViT: `patch_embed`; ConvNeXt:
        its patchify `stem`), which `model.freeze_patch_embed` keeps untrained."""

    def freeze_patch_embedding(self) -> None:
        """Keep the patch embedding at its initial weights: no gradient, so no optimizer update
        (timm's optimizer factory leaves out parameters without `requires_grad`) and no EMA
        drift (the teacher copies the same weights); load() and a resume keep the flag."""
        self.patch_embedding().requires_grad_(False)

    @abstractmethod
    def forward_with_block_outputs(
        self, images: torch.Tensor, last: int
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`forward`, plus the MLP outputs (the feed-forward branch before layer scale and
        residual: data2vec 2.0's per-block target) of the last `last` blocks on the grid, each
        (N, P, D), in block order (all of them when there are fewer)."""

    @abstractmethod
    def blocks(self) -> list[nn.Module]:
        """The blocks FSDP shards one by one (each has an `mlp`)."""

    @property
    @abstractmethod
    def block_outputs(self) -> int:
        """How many block outputs `forward_with_block_outputs` can give at most."""

    @classmethod
    @abstractmethod
    def frozen_features(
        cls, model: nn.Module, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled (N, D) and dense (N, P, D) features of a timm model loaded from an export, the
        same features this family's backbone computes in training."""

    @classmethod
    @abstractmethod
    def model_settings(cls, timm_kwargs: dict) -> dict[str, object]:
        """The `model.*` values that decide the weights' shapes, read from timm arguments."""

    @classmethod
    @abstractmethod
    def input_size(cls, model: nn.Module) -> int:
        """The image side a timm model of this family takes."""

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features of full views: the mean of their dense tokens, (N, D)."""
        return self(images).mean(dim=1)

    def load(self, path: str | Path) -> None:
        """Load an m3i backbone.safetensors written with this model's settings (`init`); a
        one-line ValueError names the model.* keys that differ."""
        self.timm_model.load_state_dict(self.checked_state(path))

    def checked_state(self, path: str | Path) -> dict[str, torch.Tensor]:
        """The weights of an m3i backbone.safetensors written with this model's settings; a
        one-line ValueError names the model.* keys that differ."""
        name, kwargs = read_backbone_metadata(path)
        stored = {"name": name, **self.model_settings(kwargs)}
        mine = {"name": self.timm_name, **self.model_settings(self.timm_kwargs)}
        differ = [f"model.{key}={value}" for key, value in stored.items() if value != mine[key]]
        if differ:
            raise ValueError(
                f"init {path} holds a backbone with {', '.join(differ)}; set the same, or init "
                "from a backbone of this run's model"
            )
        _check_shapes(path, name, kwargs)
        return load_file(str(path))

    @staticmethod
    @abstractmethod
    def checkpoint_filter(state: dict[str, torch.Tensor], model: nn.Module) -> dict:
        """timm's own `checkpoint_filter_fn` of the family: converts a checkpoint's layout to
        timm's and resamples what the model's grid changes (position embeddings)."""

    @classmethod
    def to_timm_dir(cls, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weights of a timm `local-dir` export (models/timm_dir.py) built with the extra
        timm arguments `timm_dir_args`, whose timm pooling is m3i's: the same by default."""
        return state

    @classmethod
    def from_timm_dir(cls, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inverse of `to_timm_dir` (also what a timm model of the family built with
        `timm_dir_args` holds)."""
        return state

    def save(self, path: str | Path, state: dict[str, torch.Tensor] | None = None) -> None:
        """Write the weights (or `state`, e.g. gathered from shards) as a plain timm state dict,
        with the timm arguments and the input size as metadata."""
        state = self.timm_model.state_dict() if state is None else state
        state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        metadata = {
            "timm_name": self.timm_name,
            "timm_kwargs": json.dumps(self.timm_kwargs),
            "img_size": str(self.img_size),
        }
        atomic_save_safetensors(state, path, metadata)


def no_class_token(name: str) -> ValueError:
    """The error for a class token asked of a model without one."""
    return ValueError(f"model.name {name!r} has no class token; pool by averaging its tokens")


FAMILIES: dict[str, type[Backbone]] = {}


def register(cls: type[Backbone]) -> type[Backbone]:
    """Class decorator: add a backbone family to the registry."""
    FAMILIES[cls.family] = cls
    return cls


def family_for(name: str) -> type[Backbone]:
    """The family of a timm model name (ValueError when none claims it)."""
    check_timm_name(name, "model.name")
    for cls in FAMILIES.values():
        if cls.claims(name):
            return cls
    raise ValueError(
        f"model.name {name!r} is in no backbone family ({', '.join(FAMILIES)}); use e.g. "
        "vit_tiny_patch16_224 or convnext_atto"
    )


def check_timm_name(name: object, what: str) -> None:
    """Refuse anything but the name of a model built into the installed timm: no `hf-hub:`,
    `local-dir:` or other prefix, no path (timm would reach for the network or the disk)."""
    if not (
        isinstance(name, str) and not any(char in name for char in ":/\\") and timm.is_model(name)
    ):
        raise ValueError(
            f"{what} {name!r} is not a model built into timm (no hub names, prefixes or paths); "
            "use a timm ViT or ConvNeXt name, e.g. vit_tiny_patch16_224 or convnext_atto"
        )


def read_backbone_metadata(path: str | Path) -> tuple[str, dict]:
    """The timm model name and keyword arguments stored in an m3i backbone.safetensors, checked
    against its family's allow-list (a ValueError names the first bad one)."""
    name, kwargs, _ = _read_metadata(path)
    return name, kwargs


def _read_metadata(path: str | Path) -> tuple[str, dict, int | None]:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if "timm_name" not in metadata or "timm_kwargs" not in metadata:
        raise ValueError(f"{path} is not an m3i backbone (no timm_name in its metadata)")
    name = metadata["timm_name"]
    check_timm_name(name, f"{path}: timm_name")
    try:
        allowed = family_for(name).timm_kwargs_allowed
        kwargs = json.loads(metadata["timm_kwargs"])
    except ValueError:
        kwargs = None
    if not isinstance(kwargs, dict):
        raise ValueError(f"{path}: its timm_kwargs metadata is not a JSON object of an m3i family")
    for key, value in kwargs.items():
        if key not in allowed:
            raise ValueError(
                f"{path}: timm_kwargs key {key!r} is not one m3i writes for {name}; allowed: "
                f"{', '.join(allowed)}"
            )
        what, valid = allowed[key]
        if not valid(value):
            raise ValueError(f"{path}: timm_kwargs {key}={value!r}; m3i writes {what}")
    size = metadata.get("img_size", kwargs.get("img_size"))
    if size is not None and not (str(size).isdigit() and int(size) >= 1):
        raise ValueError(f"{path}: img_size={size!r} in its metadata; m3i writes an integer >= 1")
    return name, kwargs, None if size is None else int(size)


def _create(path: str | Path, name: str, kwargs: dict) -> nn.Module:
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except (RuntimeError, TypeError, ValueError, AssertionError) as err:
        reason = first_line(err)
        raise ValueError(f"{path}: timm cannot build {name} from its metadata ({reason})") from None
    expected = family_for(name).timm_class
    if not isinstance(model, expected):
        raise ValueError(
            f"{path}: {name} is a {type(model).__name__}, not a timm {expected.__name__}; "
            "give a backbone.safetensors written by `m3i pretrain`"
        )
    return model


def _check_shapes(path: str | Path, name: str, kwargs: dict) -> None:
    """Compare the tensors a model built from the metadata would hold (on the meta device: no
    memory) with the file's, so that metadata cannot make us allocate more than the file; only a
    new classifier (`head.*` entries absent from the file) may be missing."""
    with torch.device("meta"):
        expected = {
            key: tuple(value.shape)
            for key, value in _create(path, name, kwargs).state_dict().items()
        }
    with safe_open(str(path), framework="pt") as f:
        stored = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    new_head = {key for key in expected if key.startswith("head.") and key not in stored}
    expected = {k: v for k, v in expected.items() if k not in new_head}
    differ = tensor_differences(expected, stored, "in the file", "for the model")
    if differ:
        raise ValueError(
            f"{path}: its weights do not fit {name} with {kwargs} ({differ}); give an unedited "
            "backbone.safetensors written by `m3i pretrain`"
        )


def tensor_differences(
    expected: dict[str, tuple], found: dict[str, tuple], where_found: str, where_expected: str
) -> str | None:
    """`N tensors differ, e.g. KEY: (shape) WHERE_FOUND, (shape) WHERE_EXPECTED` for the
    tensors (name -> shape) in one dict only or shaped otherwise; None when none differ."""
    shared = set(expected) & set(found)
    differ = sorted((set(expected) ^ set(found)) | {k for k in shared if expected[k] != found[k]})
    if not differ:
        return None
    key = differ[0]
    there = f"{found[key]} {where_found}" if key in found else f"not {where_found}"
    wanted = f"{expected[key]} {where_expected}" if key in expected else f"not {where_expected}"
    return f"{len(differ)} tensors differ, e.g. {key}: {there}, {wanted}"


def load_timm_model(path: str | Path, **overrides) -> nn.Module:
    """`timm.create_model` + `load_state_dict` from an m3i backbone.safetensors; a one-line
    ValueError when its metadata is refused or does not match its weights. The input size
    the backbone was trained at is the model's `pretrained_cfg["input_size"]` (timm's key).

    ``overrides`` change timm arguments (e.g. num_classes, drop_path_rate) after the check; a
    new classifier head stays freshly initialised.
    """
    name, kwargs, size = _read_metadata(path)
    kwargs.update(overrides)
    _check_shapes(path, name, kwargs)
    model = _create(path, name, kwargs)
    model.load_state_dict(load_file(str(path)), strict=False)  # only a new head is missing
    if size is not None:
        model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, size, size)}
    return model


def _family_of_model(model: nn.Module) -> type[Backbone]:
    for cls in FAMILIES.values():
        if isinstance(model, cls.timm_class):
            return cls
    raise ValueError(f"a {type(model).__name__} is in no backbone family ({', '.join(FAMILIES)})")


def input_size(model: nn.Module) -> int:
    """The image side a timm model of a backbone family takes (from `load_timm_model`: the
    side it was trained at)."""
    return _family_of_model(model).input_size(model)


def frozen_features(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled (N, D) and dense (N, P, D) features of a timm model of a backbone family."""
    return _family_of_model(model).frozen_features(model, images)
