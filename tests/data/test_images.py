"""Every PIL mode to uint8 RGB, against hand-made images with hand-worked expected pixels."""

import numpy as np
import pytest
import torch
from PIL import Image

from m3i.data.images import rgb_tensor


def palette_with_transparency() -> Image.Image:
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255])  # index 0 red, 1 blue
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 1  # blue is transparent
    return image


def one_bit() -> Image.Image:
    image = Image.new("1", (2, 1))
    image.putpixel((1, 0), 1)
    return image


WHITE = (255, 255, 255)
MODES = {  # mode: (a hand-made image, its expected RGB pixels left to right)
    "I;16": (
        Image.fromarray(np.array([[0, 257, 32896, 65535]], dtype=np.uint16)),
        [(0,) * 3, (1,) * 3, (128,) * 3, WHITE],  # 16-bit grey / 257
    ),
    "I": (
        Image.fromarray(np.array([[0, 257, 65535, 70000]], dtype=np.int32)),
        [(0,) * 3, (1,) * 3, WHITE, WHITE],  # as 16-bit grey; above 65535 clips
    ),
    "F": (
        Image.fromarray(np.array([[-0.5, 0.0, 0.2, 1.0, 2.0]], dtype=np.float32)),
        [(0,) * 3, (0,) * 3, (51,) * 3, WHITE, WHITE],  # 0..1 grey
    ),
    "1": (one_bit(), [(0,) * 3, WHITE]),
    "L": (Image.new("L", (1, 1), 77), [(77,) * 3]),
    "LA": (
        Image.fromarray(np.array([[[100, 255], [100, 0]]], dtype=np.uint8), "LA"),
        [(100,) * 3, WHITE],  # transparent: the white background
    ),
    "P": (palette_with_transparency(), [(255, 0, 0), WHITE]),
    "RGBA": (
        Image.fromarray(
            np.array([[[10, 20, 30, 255], [10, 20, 30, 0], [0, 0, 0, 128]]], dtype=np.uint8),
            "RGBA",
        ),
        [(10, 20, 30), WHITE, (127,) * 3],  # 0 * 128/255 + 255 * 127/255
    ),
    "CMYK": (
        Image.fromarray(np.array([[[255, 0, 0, 0], [0, 0, 0, 0]]], dtype=np.uint8), "CMYK"),
        [(0, 255, 255), WHITE],  # full cyan ink; no ink
    ),
}


@pytest.mark.parametrize("mode", MODES)
def test_every_image_mode_becomes_the_expected_rgb(mode: str) -> None:
    image, expected = MODES[mode]
    assert image.mode == mode
    rgb = rgb_tensor(image)
    assert rgb.dtype == torch.uint8 and rgb.shape == (3, 1, len(expected))
    assert [tuple(pixel) for pixel in rgb[:, 0].T.tolist()] == expected
