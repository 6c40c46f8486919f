"""The backbone's section of the config (`model.*`)."""

from __future__ import annotations

from dataclasses import dataclass

ATTENTIONS = ("separate", "packed")  # the values of model.attention


@dataclass
class ModelConfig:
    name: str = "vit_tiny_patch16_224"  # a timm VisionTransformer or ConvNeXt (models/)
    img_size: int = 32
    patch_size: int = 4
    depth: int | None = 6  # override the timm model's depth (null: the model's own)
    drop_path: float = 0.0
    # how an isolated mix attends (ViT): separate | packed (one sequence, block-diagonal mask)
    attention: str = "separate"
    # keep the patch embedding (a ConvNeXt: its stem) at its random initialisation, untrained:
    # MoCo v3's random patch projection, SiameseIM's default (models/backbone.py)
    freeze_patch_embed: bool = False
