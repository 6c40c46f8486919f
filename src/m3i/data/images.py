"""Decoded images of any PIL mode as uint8 RGB tensors, pixel values mapped rather than clipped."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

# what PIL raises for a broken image file (SyntaxError: e.g. bad PNG chunks during verify())
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_BACKGROUND = (255, 255, 255, 255)  # what transparent pixels show: a white page


def rgb_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image of any mode as uint8 RGB (3, H, W): integer grey (16-bit PNGs: I;16, I)
    scaled from 0..65535, float grey (F) from 0..1, transparency composited onto white."""
    if image.mode.startswith("I") or image.mode == "F":
        scale = 255.0 if image.mode == "F" else 255 / 65535
        grey = np.clip(np.rint(np.asarray(image, dtype=np.float64) * scale), 0, 255)
        return torch.from_numpy(grey.astype(np.uint8)).expand(3, -1, -1).contiguous()
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        background = Image.new("RGBA", image.size, _BACKGROUND)
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return F.pil_to_tensor(image.convert("RGB"))
