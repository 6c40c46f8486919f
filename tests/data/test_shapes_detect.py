"""The detection scenes against a pixel-by-pixel painter and hand-checked occlusions."""

import numpy as np
import pytest
import torch

from m3i.data.base import DataError
from m3i.data.shape_words import COLOURS
from m3i.data.shapes import _SHAPES, CLASSES, ShapeObject, ShapesDataset, paint_background
from m3i.data.shapes_detect import MIN_VISIBLE, DetectionScene, ShapesDetection

PLAIN = ("plain", (10.0, 20.0, 30.0), (90.0, 90.0, 90.0), 5.0, 0.0, 0)


def covers(obj: ShapeObject, x: float, y: float) -> bool:
    """Whether the object covers the point (x, y), one point at a time."""
    dx, dy = (x - obj.cx) / obj.half_width, (y - obj.cy) / obj.half_height
    return bool(_SHAPES[obj.kind](np.array(dx), np.array(dy)))


def painted(scene: DetectionScene, size: int) -> tuple[list[int], dict[int, list[int]]]:
    """Brute force: (kept object indices, object index -> visible box), one pixel at a time.

    From the top object down, an object is kept when at least MIN_VISIBLE of the pixels it
    covers are covered by no kept object above it; each pixel shows the top kept object."""
    pixels = [(x, y) for y in range(size) for x in range(size)]
    cover = [[covers(obj, x + 0.5, y + 0.5) for x, y in pixels] for obj in scene.objects]
    kept: list[int] = []
    for index in reversed(range(len(scene.objects))):
        own = [p for p, on in enumerate(cover[index]) if on]
        free = [p for p in own if not any(cover[k][p] for k in kept)]
        if own and len(free) / len(own) >= MIN_VISIBLE:
            kept.append(index)
    boxes: dict[int, list[int]] = {}
    for p, (x, y) in enumerate(pixels):
        shown = [k for k in kept if cover[k][p]]
        if shown:
            top = max(shown)
            x0, y0, x1, y1 = boxes.get(top, [x, y, x + 1, y + 1])
            boxes[top] = [min(x0, x), min(y0, y), max(x1, x + 1), max(y1, y + 1)]
    return sorted(kept), boxes


def test_boxes_and_pixels_match_a_pixel_by_pixel_painter() -> None:
    size = 24
    source = ShapesDetection("val", 12, image_size=size, seed=4)
    dropped = 0
    for index in range(len(source)):
        scene = source.scene(index)
        kept, boxes = painted(scene, size)
        dropped += len(scene.objects) - len(kept)
        notes = source.annotations(index)
        assert notes["boxes"].dtype == torch.float32 and notes["box_labels"].dtype == torch.int64
        assert notes["boxes"].tolist() == [boxes[k] for k in kept]
        labels = [CLASSES.index(scene.objects[k].kind) for k in kept]
        assert notes["box_labels"].tolist() == labels
        image = source[index].image.numpy()
        expected = paint_background(*scene.background, np.arange(size) + 0.5)
        for y in range(size):
            for x in range(size):
                shown = [k for k in kept if covers(scene.objects[k], x + 0.5, y + 0.5)]
                if shown:
                    expected[:, y, x] = COLOURS[scene.objects[max(shown)].colour]
        assert np.array_equal(image, expected)
    assert dropped > 0  # the check covered an object hidden too much to be drawn


def square(cx: float, cy: float) -> ShapeObject:
    """A blue square of half extent 6: it covers the pixel centres within 5.1 of (cx, cy) on
    both axes, 10 x 10 pixels."""
    return ShapeObject("square", "blue", cx, cy, 6.0, 6.0)


@pytest.mark.parametrize(
    ("top", "boxes", "red_pixels"),
    [
        # bottom square covers columns and rows 5..14; the top one 11..20 in both: the bottom
        # keeps 84 of 100 pixels and its whole box (an L-shaped visible region)
        (square(16, 16), [[5, 5, 15, 15], [11, 11, 21, 21]], 84),
        # top covers columns 11..20, rows 5..14: the bottom keeps columns 5..10 (60 %)
        (square(16, 10), [[5, 5, 11, 15], [11, 5, 21, 15]], 60),
        # top covers columns 9..18: the bottom keeps columns 5..8 (40 %, just enough)
        (square(14, 10), [[5, 5, 9, 15], [9, 5, 19, 15]], 40),
        # top covers columns 8..17: the bottom would keep columns 5..7 (30 %): not drawn
        (square(13, 10), [[8, 5, 18, 15]], 0),
    ],
)
def test_hand_checked_occlusions(top: ShapeObject, boxes: list, red_pixels: int) -> None:
    source = ShapesDetection(image_size=32)
    scene = DetectionScene(PLAIN, (ShapeObject("square", "red", 10, 10, 6.0, 6.0), top))
    notes = source.annotate(scene)
    assert notes["boxes"].tolist() == boxes
    assert notes["box_labels"].tolist() == [CLASSES.index(top.kind)] * len(boxes)
    image, _ = source.render(scene)
    red = (image == np.array(COLOURS["red"], np.uint8)[:, None, None]).all(axis=0)
    assert red.sum() == red_pixels


def test_labels_are_shape_classes_with_one_colour_per_object() -> None:
    source = ShapesDetection("train", 200)
    counts = np.zeros(len(CLASSES), dtype=int)
    for index in range(len(source)):
        scene = source.scene(index)
        colours = [obj.colour for obj in scene.objects]
        assert len(set(colours)) == len(colours) and 2 <= len(colours) <= 5
        labels = source.annotations(index)["box_labels"]
        assert 1 <= len(labels) <= len(colours)
        counts += np.bincount(labels.numpy(), minlength=len(CLASSES))
    assert counts.min() > 0.5 * counts.mean()  # every class appears, roughly balanced
    assert source.classes == CLASSES and source.labels() == [-1] * 200
    assert source[0].label == -1 and source[0].caption == "" and source.captions() == []


def test_deterministic_by_seed_split_and_index() -> None:
    first, again = ShapesDetection("val", seed=2), ShapesDetection("val", seed=2)
    for index in (0, 9, 1999):
        assert torch.equal(first[index].image, again[index].image)
        assert torch.equal(first.annotations(index)["boxes"], again.annotations(index)["boxes"])
    others = [ShapesDetection("val", seed=3), ShapesDetection("train", seed=2)]
    for other in others:
        assert not any(torch.equal(first[i].image, other[i].image) for i in range(5))
    shapes = ShapesDataset("val", seed=2)
    assert not any(torch.equal(first[i].image, shapes[i].image) for i in range(5))
    assert (len(ShapesDetection()), len(ShapesDetection("val", 7))) == (10000, 7)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"split": "test"}, "unknown split 'test'"),
        ({"image_size": 8}, "image_size=8 too small"),
        ({"num_samples": 0}, "n > 0"),
    ],
)
def test_bad_arguments(kwargs: dict, fragment: str) -> None:
    with pytest.raises(DataError, match=fragment) as error:
        ShapesDetection(**kwargs)
    assert str(error.value).startswith("shapes detection: ")  # names the source, not `shapes`
