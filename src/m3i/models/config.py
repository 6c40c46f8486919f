"""The backbone's section of the config (`model.*`)."""

from __future__ import annotations

from dataclasses import dataclass

from m3i.ranges import COUNT, Range, one_of, ranged

ATTENTIONS = ("separate", "packed")  # the values of model.attention


@dataclass
class ModelConfig:
    name: str = "vit_tiny_patch16_224"  # a timm VisionTransformer or ConvNeXt (models/)
    img_size: int = ranged(32, COUNT)
    patch_size: int = ranged(4, COUNT)
    # override the timm model's depth (null: the model's own)
    depth: int | None = ranged(6, Range(1, note="null: the timm model's own"))
    drop_path: float = ranged(0.0, Range(0, 1, high_open=True))
    # how an isolated mix attends (ViT): separate | packed (one sequence, block-diagonal mask)
    attention: str = one_of("separate", ATTENTIONS)
    # keep the patch embedding (a ConvNeXt: its stem) at its random initialisation, untrained:
    # MoCo v3's random patch projection, SiameseIM's default (models/backbone.py)
    freeze_patch_embed: bool = False
