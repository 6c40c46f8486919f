"""The procedural shapes set, checked against its own pixels and annotations."""

import hashlib
import re
from collections import Counter

import numpy as np
import pytest
import torch

from m3i.data.base import DataError
from m3i.data.shapes import COLOURS, POSITIONS, ShapesDataset
from m3i.data.specs import open_source

CAPTION = re.compile(
    r"^a (small|large) (\w+) ([\w-]+) (" + "|".join(POSITIONS) + r") on a (\w+) background"
    r"(?: with (.+))?$"
)
DISTRACTOR_PHRASE = re.compile(r"(a|two|three) small (\w+) (dots?|dash(?:es)?|bars?)")
COUNTS = {"a": 1, "two": 2, "three": 3}


def components(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Boxes (x0, y0, x1, y1) of the 8-connected components of a boolean mask, by flood fill."""
    seen = np.zeros_like(mask)
    boxes = []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        stack, pixels = [start], []
        seen[start] = True
        while stack:
            row, col = stack.pop()
            pixels.append((row, col))
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    r, c = row + dr, col + dc
                    inside = 0 <= r < mask.shape[0] and 0 <= c < mask.shape[1]
                    if inside and mask[r, c] and not seen[r, c]:
                        seen[r, c] = True
                        stack.append((r, c))
        rows, cols = zip(*pixels, strict=True)
        boxes.append((min(cols), min(rows), max(cols) + 1, max(rows) + 1))
    return sorted(boxes)


def test_deterministic_by_seed_and_index() -> None:
    first, again, other = ShapesDataset(), ShapesDataset(), ShapesDataset(seed=1)
    for index in (0, 7, 9999):
        assert torch.equal(first[index].image, again[index].image)
        assert first[index].caption == again[index].caption
    assert any(not torch.equal(first[i].image, other[i].image) for i in range(5))
    assert open_source("shapes", seed=3)[5].caption == ShapesDataset(seed=3)[5].caption


def test_train_and_val_differ() -> None:
    train, val = ShapesDataset("train"), ShapesDataset("val")
    assert (len(train), len(val)) == (10000, 2000)
    train_images = {train[i].image.numpy().tobytes() for i in range(200)}
    assert not any(val[i].image.numpy().tobytes() in train_images for i in range(200))


def test_classes_all_appear_roughly_balanced() -> None:
    source = ShapesDataset("val")
    assert len(source.classes) >= 10
    counts = Counter(source[i].label for i in range(2000))
    expected = 2000 / len(source.classes)
    assert set(counts) == set(range(len(source.classes)))
    assert all(0.7 * expected < count < 1.3 * expected for count in counts.values())


def test_image_format_and_sizes() -> None:
    source = open_source("shapes", "val", num_samples=3, image_size=48)
    sample = source[2]
    assert len(source) == 3
    assert sample.image.dtype == torch.uint8 and sample.image.shape == (3, 48, 48)
    assert 0 <= sample.label < len(source.classes)
    with pytest.raises(IndexError):
        source[3]
    with pytest.raises(DataError, match="^shapes: image_size=8 too small; use 16"):
        ShapesDataset(image_size=8)


def test_captions_match_the_drawn_pixels() -> None:
    source = ShapesDataset("val")
    size = source.image_size
    num_classes = len(source.classes)
    seen_counts = Counter()
    for index in range(300):
        sample = source[index]
        notes = source.annotations(index)
        image = sample.image.numpy()
        mask = notes["mask"].numpy()
        match = CAPTION.match(sample.caption)
        assert match, sample.caption
        size_word, colour, kind, position, texture, rest = match.groups()
        assert kind == source.classes[sample.label]

        main = mask == 1 + sample.label
        assert {tuple(pixel) for pixel in image[:, main].T} == {COLOURS[colour]}

        x0, y0, x1, y1 = notes["boxes"][0].tolist()
        side = max(x1 - x0, y1 - y0)
        assert side >= 13 if size_word == "large" else side <= 11, (sample.caption, side)

        centre = ((x0 + x1) / 2, (y0 + y1) / 2)
        if all(min(abs(c - size / 3), abs(c - 2 * size / 3)) > 1 for c in centre):
            column, row = (int(c // (size / 3)) for c in centre)
            assert POSITIONS[3 * row + column] == position, sample.caption

        background = image[:, mask == 0].T
        distinct = len({tuple(pixel) for pixel in background})
        expected = {"plain": 1, "striped": 2, "checkered": 2}.get(texture)
        assert distinct == expected if expected else distinct > 2, (sample.caption, distinct)

        phrases = DISTRACTOR_PHRASE.findall(rest or "")
        count = sum(COUNTS[word] for word, _, _ in phrases)
        distractors = mask == 1 + num_classes
        found = components(distractors)
        assert len(found) == count == len(notes["boxes"]) - 1, sample.caption
        drawn_colours = {tuple(pixel) for pixel in image[:, distractors].T}
        assert drawn_colours == {COLOURS[colour] for _, colour, _ in phrases}
        seen_counts[count] += 1
    assert set(seen_counts) == {0, 1, 2, 3}


def test_captions_are_cheap_and_match_items() -> None:
    source = ShapesDataset(num_samples=50)
    assert source.captions() == [source[i].caption for i in range(50)]
    assert source.captions(limit=5) == source.captions()[:5]


def test_mask_and_boxes_are_tight() -> None:
    source = ShapesDataset(seed=5, image_size=40)
    num_classes = len(source.classes)
    for index in range(100):
        notes = source.annotations(index)
        mask, boxes, labels = notes["mask"].numpy(), notes["boxes"], notes["box_labels"]
        label = source[index].label
        assert mask.dtype == np.int64 and mask.shape == (40, 40)
        assert set(np.unique(mask)) <= {0, 1 + label, 1 + num_classes}
        assert boxes.dtype == torch.float32 and boxes.shape == (len(labels), 4)
        assert labels.tolist() == [label] + [num_classes] * (len(labels) - 1)
        rows, cols = np.nonzero(mask == 1 + label)
        tight = [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
        assert boxes[0].tolist() == tight
        expected = components(mask == 1 + num_classes)
        assert sorted(tuple(int(v) for v in box) for box in boxes[1:].tolist()) == expected


@pytest.mark.parametrize(
    ("split", "index", "label", "image_sha", "notes_sha"),
    [
        ("train", 0, 8, "fed65f47d18074e3", "fbb5bd1d052a64b1"),
        ("train", 17, 5, "769a10a05cf39e25", "72cd7c06063c43d4"),
        ("train", 4321, 2, "6f758a577ff64a58", "e416a5dd05c083b0"),
        ("val", 0, 5, "5f3c853a11fb3e66", "ae463f82ba2a382a"),
        ("val", 1999, 3, "cd7ceb535754441f", "08def9d4321d00b2"),
    ],
)
def test_images_and_annotations_are_pinned(split, index, label, image_sha, notes_sha) -> None:
    """The pre-training images stay bit-identical: SHA-256 prefixes recorded at commit 25839e7
    (before the detection scenes shared its background and drawing code)."""
    source = ShapesDataset(split)
    sample, notes = source[index], source.annotations(index)
    notes_bytes = notes["mask"].numpy().tobytes() + notes["boxes"].numpy().tobytes()
    assert sample.label == label
    assert hashlib.sha256(sample.image.numpy().tobytes()).hexdigest()[:16] == image_sha
    assert hashlib.sha256(notes_bytes).hexdigest()[:16] == notes_sha
