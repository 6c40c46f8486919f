"""Captions of training views: every word is checked against the view's own pixels and geometry."""

import colorsys
import math
import re
from collections import Counter

import torch
from torchvision.transforms.v2 import functional as F

from m3i.data.base import ColourChange, Sample, ViewInfo
from m3i.data.shape_words import (
    COLOURS,
    HUE_MARGIN,
    HUE_MIN_SATURATION,
    HUE_MIN_VALUE,
    POSITIONS,
    WHITE_MAX_SATURATION,
    WHITE_MIN_VALUE,
    colour_name,
)
from m3i.data.shapes import (
    CLASSES,
    LARGE_RADIUS,
    SMALL_RADIUS,
    TEXTURES,
    Scene,
    ShapeObject,
    ShapesDataset,
)
from m3i.data.views import ViewConfig, ViewDataset

NAME = "|".join(COLOURS)
MAIN = (
    rf"an? (?:(?P<size>small|large) )?(?:(?P<colour>{NAME}) )?"
    rf"(?P<kind>{'|'.join(CLASSES)})(?: (?P<position>{'|'.join(POSITIONS)}))? on a "
)
CAPTION = re.compile(
    rf"^(?:{MAIN}|a )(?P<texture>{'|'.join(TEXTURES)}) background(?: with (?P<rest>.+))?$"
)
PHRASE = rf"(?:a|two|three) (?:(?:small|large) )?(?:(?:{NAME}) )?(?:dots?|dash(?:es)?|bars?)"
PHRASES = re.compile(rf"{PHRASE}(?:, {PHRASE})*(?: and {PHRASE})?")
PARTS = re.compile(rf"(a|two|three) (?:(small|large) )?(?:({NAME}) )?(dot|dash|bar)(s|es)?")
COUNTS = {"a": 1, "two": 2, "three": 3}
PALETTE_HUES = {
    name: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0]
    for name, rgb in COLOURS.items()
    if name != "white"
}


def hand_scene(**changes) -> Scene:
    """A small red circle (centre (4.5, 5), top left) and a blue dot at (28, 28), 32 px."""
    scene = dict(
        label=CLASSES.index("circle"),
        large=False,
        position=0,
        main=ShapeObject("circle", "red", 4.5, 5.0, 4.5, 4.5),
        texture="plain",
        dark=(10.0, 10.0, 10.0),
        light=(100.0, 100.0, 100.0),
        period=5.0,
        angle=0.0,
        noise_seed=0,
        distractors=(ShapeObject("dot", "blue", 28.0, 28.0, 2.24, 2.24),),
    )
    return Scene(**{**scene, **changes})


NO_CHANGE = ColourChange()


def view(box: tuple, flipped: bool = False, colour: ColourChange = NO_CHANGE) -> ViewInfo:
    return ViewInfo(box, flipped, colour)


def test_hand_made_views() -> None:
    scene = hand_scene()
    assert scene.caption() == (
        "a small red circle at the top left on a plain background with a small blue dot"
    )
    whole = view((0.0, 0.0, 1.0, 1.0))
    assert scene.view_caption(whole, 32) == scene.caption()
    # the top-left 16 px, flipped: the circle's centre (4.5, 5) -> view (1 - 4.5/16, 5/16), its
    # size 4.5/16 = 0.28 of the view; the dot is cut out
    quarter = view((0.0, 0.0, 0.5, 0.5), flipped=True)
    assert scene.view_caption(quarter, 32) == (
        "a large red circle at the top right on a plain background"
    )
    grey = view((0.0, 0.0, 0.5, 0.5), True, ColourChange(grayscale=True))
    assert scene.view_caption(grey, 32) == "a large circle at the top right on a plain background"
    # 22 px: size 4.5/22 = 0.20 is neither small nor large; hue +36 deg: red -> orange
    shifted = view((0.0, 0.0, 22 / 32, 22 / 32), colour=ColourChange((("hue", 0.1),)))
    assert scene.view_caption(shifted, 32) == (
        "an orange circle at the top left on a plain background"
    )
    # columns 6..32: the centre (x = 4.5) is out, the circle's right edge (to x = 9) is in
    edge = view((0.0, 6 / 32, 1.0, 26 / 32))
    assert scene.view_caption(edge, 32) == (
        "a small red circle on a plain background with a small blue dot"
    )
    # rows 8..32, columns 16..32: no circle pixel; blue hue 227 + 36 deg is nearest purple (280)
    corner = view((0.25, 0.5, 0.75, 0.5), colour=ColourChange((("hue", 0.1),)))
    assert scene.view_caption(corner, 32) == "a plain background with a small purple dot"


def test_colour_names() -> None:
    for name, rgb in COLOURS.items():
        assert colour_name([c / 255 for c in rgb]) == name
    assert colour_name((0.5, 0.5, 0.5)) is None  # grey is not white
    assert colour_name((0.8, 0.78, 0.8)) == "white"
    assert colour_name((0.2, 0.05, 0.05)) is None  # too dark
    red_orange = colorsys.hsv_to_rgb(PALETTE_HUES["orange"] / 2, 0.8, 0.9)  # halfway
    assert colour_name(red_orange) is None
    assert colour_name(colorsys.hsv_to_rgb(PALETTE_HUES["orange"] / 2 - 4 / 360, 0.8, 0.9)) == "red"


def pixel_colour_word(rgb: torch.Tensor) -> str | None:
    """The colour word a colour of measured pixels earns, by the rule the captions document:
    white for bright near-greys; the palette colour of nearest hue (brute force over the
    palette) for saturated, bright enough colours, unless the two nearest hues nearly tie."""
    hue, saturation, value = colorsys.rgb_to_hsv(*rgb.tolist())
    if saturation < WHITE_MAX_SATURATION:
        return "white" if value >= WHITE_MIN_VALUE else None
    if saturation < HUE_MIN_SATURATION or value < HUE_MIN_VALUE:
        return None
    distances = sorted(
        (min((hue - palette) % 1, (palette - hue) % 1), name)
        for name, palette in PALETTE_HUES.items()
    )
    (nearest, name), (second, _) = distances[:2]
    return name if second - nearest >= 2 * HUE_MARGIN else None


def measured_word(pixels: torch.Tensor, interior: torch.Tensor) -> tuple[bool, str | None]:
    """(whether an object has view pixels untouched by resampling (``interior``), the word the
    colour of those pixels earns)."""
    if not interior.any():
        return False, None
    return True, pixel_colour_word(pixels[:, interior].mean(1))


def size_word(obj: ShapeObject, height: int, width: int) -> str | None:
    extent = math.sqrt(obj.half_width / width * obj.half_height / height)
    return "small" if extent <= SMALL_RADIUS[1] else "large" if extent >= LARGE_RADIUS[0] else None


def test_captions_are_true_for_1000_random_views() -> None:
    """Default view settings at 32 px; the caption describes view 1, checked against its pixels,
    the rendered masks and the scene geometry under the recorded crop box and flip."""
    size, count = 32, 1000
    source = ShapesDataset("train", count, size, seed=2)
    cfg = ViewConfig()
    views = ViewDataset(source, cfg, size, seed=7, num_views=1)
    mean, std = torch.tensor(cfg.mean)[:, None, None], torch.tensor(cfg.std)[:, None, None]
    tally = Counter()
    for index in range(count):
        item, scene, notes = views[index], source.scene(index), source.annotations(index)
        match = CAPTION.match(item["caption"])
        assert match and (match["rest"] is None or PHRASES.fullmatch(match["rest"])), item[
            "caption"
        ]
        top, left, height, width = (round(v * size) for v in item["box1"].tolist())
        flipped = bool(item["flip1"])
        pixels = item["view1"] * std + mean  # the view before normalisation
        grey = bool((pixels.amax(0) - pixels.amin(0)).max() < 1e-5)

        # one float mask per object (main first): its pixels, each within its own bounds
        mask = notes["mask"]
        masks = []
        for obj, value in [(scene.main, 1 + scene.label)] + [
            (obj, 1 + len(CLASSES)) for obj in scene.distractors
        ]:
            x0, y0, x1, y1 = obj.bounds()
            own = torch.zeros_like(mask, dtype=torch.bool)
            own[max(int(y0), 0) : math.ceil(y1), max(int(x0), 0) : math.ceil(x1)] = True
            masks.append((mask == value) & own)
        stacked = torch.stack(masks).float()
        in_crop = stacked[:, top : top + height, left : left + width].flatten(1).any(1)
        resized = F.resized_crop(stacked, top, left, height, width, [size, size], antialias=True)
        interior = (F.horizontal_flip(resized) if flipped else resized) > 0.999

        # the main object: mentioned when drawn in the crop; its words
        assert bool(match["kind"]) == bool(in_crop[0]), item["caption"]
        if match["kind"]:
            assert match["kind"] == CLASSES[scene.label]
            first, second = item["caption"].split()[:2]
            assert first == ("an" if second[0] in "aeiou" else "a"), item["caption"]
            u = (scene.main.cx / size - item["box1"][1].item()) / item["box1"][3].item()
            v = (scene.main.cy / size - item["box1"][0].item()) / item["box1"][2].item()
            u = 1 - u if flipped else u
            inside = 0 <= u < 1 and 0 <= v < 1
            expected = POSITIONS[3 * int(3 * v) + int(3 * u)] if inside else None
            assert match["position"] == expected, (item["caption"], u, v)
            assert match["size"] == size_word(scene.main, height, width), item["caption"]
            checked, word = measured_word(pixels, interior[0])
            if grey:
                assert match["colour"] is None, item["caption"]
            elif checked:
                assert match["colour"] == word, (item["caption"], word)
                tally["main colour checked"] += 1
            tally["position word"] += match["position"] is not None
            tally["colour word"] += match["colour"] is not None

        # distractors: those drawn in the crop, with their size and colour words
        said = Counter()
        for number, size_said, colour_said, kind, plural in PARTS.findall(match["rest"] or ""):
            assert (COUNTS[number] > 1) == bool(plural), item["caption"]
            said[(size_said or None, colour_said or None, kind)] += COUNTS[number]
        shown = [k for k in range(1, len(masks)) if in_crop[k]]
        drawn = [scene.distractors[k - 1] for k in shown]
        sizes = [size_word(obj, height, width) for obj in drawn]
        kinds = Counter(zip(sizes, (obj.kind for obj in drawn), strict=True))
        assert Counter((s, k) for s, _, k in said.elements()) == kinds, item["caption"]
        measured = [measured_word(pixels, interior[k]) for k in shown]
        if grey:
            assert all(colour is None for _, colour, _ in said), item["caption"]
        elif all(checked for checked, _ in measured):
            colours = [word for _, word in measured]
            expected = Counter(zip(sizes, colours, (obj.kind for obj in drawn), strict=True))
            assert said == expected, item["caption"]
            tally["distractor colours checked"] += 1
        tally["grey"] += grey
    assert tally["grey"] > 50 and tally["main colour checked"] > 0.7 * count, tally
    assert tally["distractor colours checked"] > 0.5 * count, tally
    assert tally["position word"] > 0.7 * count and tally["colour word"] > 0.5 * count, tally


def test_whole_image_view_keeps_the_caption() -> None:
    source = ShapesDataset("val", 300)
    whole = view((0.0, 0.0, 1.0, 1.0))
    for index in range(300):
        sample = source[index]
        assert source.describe_view(index, sample, whole) == sample.caption
    plain = Sample(sample.image, sample.label, sample.caption)  # no scene: drawn again
    quarter = view((0.5, 0.5, 0.5, 0.5), True)
    assert source.describe_view(299, plain, quarter) == source.describe_view(299, sample, quarter)
