"""Detection scenes of the shapes: several small objects of the ten shape classes on the shapes'
textured backgrounds, partly hiding one another. The `detect` probe reads these instead of the
classification images, whose one big object and tiny distractors raw pixels already localise.

Every object gets its own palette colour (all different within an image), so colour says
nothing about the class and an occluding edge is always a colour edge: only shape tells the
classes apart. Objects are drawn in order, later ones on top; an object left with fewer than
MIN_VISIBLE of its pixels by the objects kept above it is not drawn and not annotated (decided
from the top object down). Every sample is a pure function of (seed, split, index).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from m3i.data.base import ImageSource, Sample
from m3i.data.shape_words import COLOURS
from m3i.data.shapes import (
    CLASSES,
    NUM_SAMPLES,
    Background,
    ShapeObject,
    check_arguments,
    object_pixels,
    paint_background,
    sample_background,
)

OBJECTS = (2, 5)  # objects sampled per image, both ends included
RADIUS = (0.12, 0.22)  # object half extent as a fraction of the image side
MIN_VISIBLE = 0.4  # share of an object's pixels that must stay visible for it to be kept
_SPLIT_STREAM = {"train": 2, "val": 3}  # random streams apart from the shapes images'


@dataclass(frozen=True)
class DetectionScene:
    """Every random choice of one detection image: its background and the objects sampled, in
    drawing order (later on top), before hidden ones are dropped."""

    background: Background
    objects: tuple[ShapeObject, ...]


def object_masks(objects: tuple[ShapeObject, ...], size: int) -> list[np.ndarray]:
    """Each object's full (S, S) boolean mask, as if nothing hid it."""
    centres = np.arange(size, dtype=np.float64) + 0.5
    masks = []
    for obj in objects:
        mask = np.zeros((size, size), dtype=bool)
        rows, columns, inside = object_pixels(obj, centres)
        mask[rows, columns] = inside
        masks.append(mask)
    return masks


def kept_objects(masks: list[np.ndarray]) -> list[int]:
    """Indices (drawing order) of the objects kept: from the top down, an object is kept when
    at least MIN_VISIBLE of its pixels lie outside every kept object above it."""
    kept: list[int] = []
    above = np.zeros_like(masks[0])
    for index in reversed(range(len(masks))):
        area = masks[index].sum()
        if area and (masks[index] & ~above).sum() / area >= MIN_VISIBLE:
            kept.append(index)
            above |= masks[index]
    return kept[::-1]


class ShapesDetection(ImageSource):
    """Detection scenes: images with no single label or caption, and boxes of every object."""

    def __init__(
        self,
        split: str = "train",
        num_samples: int | None = None,
        image_size: int = 32,
        seed: int = 0,
    ) -> None:
        check_arguments("shapes detection", split, num_samples, image_size, seed)
        self.classes = list(CLASSES)
        self.name = "shapes-detection"
        self.split = split
        self.image_size = image_size
        self.seed = seed
        self._length = NUM_SAMPLES[split] if num_samples is None else num_samples

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Sample:
        image, _ = self.render(self.scene(index))
        return Sample(torch.from_numpy(image), -1, "")

    def captions(self, limit: int | None = None) -> list[str]:
        return []

    def labels(self) -> list[int]:
        return [-1] * len(self)

    def scene(self, index: int) -> DetectionScene:
        """Sample every parameter of item ``index`` (cheap: nothing is rendered)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} detection scenes")
        rng = np.random.default_rng([self.seed, _SPLIT_STREAM[self.split], index])
        size = self.image_size
        background = sample_background(rng, size)
        count = int(rng.integers(OBJECTS[0], OBJECTS[1] + 1))
        colours = rng.choice(list(COLOURS), size=count, replace=False)
        objects = []
        for colour in colours:
            kind = CLASSES[rng.integers(len(CLASSES))]
            radius = size * rng.uniform(*RADIUS)
            cx, cy = rng.uniform(radius, size - radius, 2)
            objects.append(ShapeObject(kind, str(colour), cx, cy, radius, radius))
        return DetectionScene(background, tuple(objects))

    def render(self, scene: DetectionScene) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 image (3, S, S), instance map (S, S): 0 background, 1 + k where the k-th
        object of ``scene.objects`` shows)."""
        size = self.image_size
        image = paint_background(*scene.background, np.arange(size, dtype=np.float64) + 0.5)
        instances = np.zeros((size, size), dtype=np.int64)
        masks = object_masks(scene.objects, size)
        for index in kept_objects(masks):
            colour = np.array(COLOURS[scene.objects[index].colour], np.uint8)
            image[:, masks[index]] = colour[:, None]
            instances[masks[index]] = 1 + index
        return image, instances

    def annotations(self, index: int) -> dict[str, torch.Tensor]:
        """The boxes of item ``index`` (:meth:`annotate`)."""
        return self.annotate(self.scene(index))

    def annotate(self, scene: DetectionScene) -> dict[str, torch.Tensor]:
        """``boxes`` (M, 4) float xyxy pixel edges, tight around each kept object's visible
        pixels, in drawing order; ``box_labels`` (M,) int64 shape classes (indices of CLASSES)."""
        _, instances = self.render(scene)
        boxes, labels = [], []
        for instance in np.unique(instances[instances > 0]):
            rows, cols = np.nonzero(instances == instance)
            boxes.append([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
            labels.append(CLASSES.index(scene.objects[instance - 1].kind))
        return {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "box_labels": torch.tensor(labels, dtype=torch.int64),
        }
