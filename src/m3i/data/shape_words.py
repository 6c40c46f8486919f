"""The words of ``shapes`` captions: palette, positions, colour names and phrases.

Whole images and augmented views share these; a view's colour word names the colour its pixels
have (:func:`colour_name`), which hue jitter, saturation, brightness and contrast can change.
"""

from __future__ import annotations

import colorsys
from collections import Counter
from collections.abc import Sequence

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 240),
    "yellow": (245, 225, 40),
    "purple": (170, 70, 220),
    "orange": (250, 145, 30),
    "cyan": (40, 215, 225),
    "white": (245, 245, 245),
    "pink": (250, 130, 190),
}
POSITIONS = [
    "at the top left", "at the top", "at the top right",
    "on the left", "in the center", "on the right",
    "at the bottom left", "at the bottom", "at the bottom right",
]  # fmt: skip
_PLURALS = {"dot": "dots", "dash": "dashes", "bar": "bars"}
_COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
# Naming the colour of a view's pixels (HSV in [0, 1]; hue as a fraction of a turn):
WHITE_MAX_SATURATION = 0.2  # below: "white" when at least this bright, else grey (no name)
WHITE_MIN_VALUE = 0.75
HUE_MIN_SATURATION = 0.25  # from here (and at least this bright): named by the nearest hue
HUE_MIN_VALUE = 0.35
HUE_MARGIN = 3 / 360  # a hue this close to the midpoint between two palette hues has no name
PALETTE_HUES = {
    name: colorsys.rgb_to_hsv(*(channel / 255 for channel in rgb))[0]
    for name, rgb in COLOURS.items()
    if name != "white"
}


def colour_name(rgb: Sequence[float]) -> str | None:
    """The palette name of a float RGB colour in [0, 1], or None where no name clearly fits:
    "white" for bright near-greys, else the palette colour of nearest hue for saturated colours
    that are not too dark, unless the hue lies within HUE_MARGIN of the midpoint to the next."""
    hue, saturation, value = colorsys.rgb_to_hsv(*rgb)
    if saturation < WHITE_MAX_SATURATION:
        return "white" if value >= WHITE_MIN_VALUE else None
    if saturation < HUE_MIN_SATURATION or value < HUE_MIN_VALUE:
        return None
    turns = {name: abs(hue - palette) % 1 for name, palette in PALETTE_HUES.items()}
    distance = {name: min(turn, 1 - turn) for name, turn in turns.items()}
    nearest, second = sorted(distance, key=distance.__getitem__)[:2]
    return nearest if distance[second] - distance[nearest] >= 2 * HUE_MARGIN else None


def noun_phrase(count: int, adjectives: Sequence[str | None], kind: str) -> str:
    """E.g. 'an orange ellipse', 'two small dots' (adjectives that are None are left out)."""
    words = [word for word in adjectives if word] + [kind if count == 1 else _PLURALS[kind]]
    article = ("an" if words[0][0] in "aeiou" else "a") if count == 1 else _COUNT_WORDS[count]
    return " ".join([article, *words])


def sentence(
    main: str | None, texture: str, distractors: Sequence[tuple[str | None, str | None, str]]
) -> str:
    """The caption from the main object's phrase (None: not shown) and the distractors'
    (size, colour, kind), grouped in order of first appearance."""
    text = f"{main} on a {texture} background" if main else f"a {texture} background"
    groups = Counter(distractors)
    parts = [
        noun_phrase(count, [size, colour], kind) for (size, colour, kind), count in groups.items()
    ]
    if parts:
        listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        text += f" with {listed}"
    return text
