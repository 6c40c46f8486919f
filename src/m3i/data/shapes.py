"""The embedded procedural dataset: one labelled shape on a texture, plus small distractors.

Every sample is a pure function of (seed, split, index) and is rendered on demand, so
DataLoader workers share the work and nothing is downloaded. The label is the main object's
category; the caption adds what the label does not say (colour, size, position, background,
distractors). ``annotations`` gives a segmentation mask and tight boxes for dense evaluation.

A training view gets its own caption (:meth:`Scene.view_caption`): the crop, flip and colour
change it went through decide which objects, positions, sizes and colours it shows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from m3i.data.base import DataError, ImageSource, Sample, ViewInfo
from m3i.data.shape_words import COLOURS, POSITIONS, colour_name, noun_phrase, sentence

CLASSES = [
    "circle", "square", "triangle", "diamond", "cross",
    "plus", "ring", "star", "ellipse", "half-disc",
]  # fmt: skip
TEXTURES = ["plain", "striped", "checkered", "noisy", "gradient"]
# distractor kind -> (half width, half height) in units of the distractor radius
DISTRACTORS: dict[str, tuple[float, float]] = {
    "dot": (1.0, 1.0),
    "dash": (1.6, 0.45),
    "bar": (0.45, 1.6),
}
SMALL_RADIUS = (0.13, 0.16)  # main object half-extent as a fraction of the image side
LARGE_RADIUS = (0.26, 0.30)
DISTRACTOR_RADIUS = 0.07
MIN_DISTRACTOR_RADIUS = 1.6  # pixels, so that every distractor covers a pixel centre
GAP = 2.0  # pixels between object boxes, so that objects never touch or hide each other
MAX_DISTRACTORS = 3
MIN_IMAGE_SIZE = 16
NUM_SAMPLES = {"train": 10000, "val": 2000}
_SPLIT_STREAM = {"train": 0, "val": 1}


def _in_polygon(x: np.ndarray, y: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over broadcast ``x`` and ``y``."""
    inside = np.zeros(np.broadcast_shapes(x.shape, y.shape), dtype=bool)
    for (xa, ya), (xb, yb) in zip(vertices, np.roll(vertices, 1, axis=0), strict=True):
        if ya != yb:
            crosses = (ya > y) != (yb > y)
            inside ^= crosses & (x < xa + (xb - xa) * (y - ya) / (yb - ya))
    return inside


_STAR = np.array(
    [
        ((1.0 if k % 2 == 0 else 0.42) * math.cos(-math.pi / 2 + k * math.pi / 5),
         (1.0 if k % 2 == 0 else 0.42) * math.sin(-math.pi / 2 + k * math.pi / 5) + 0.095)
        for k in range(10)
    ]
)  # fmt: skip


def _box(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.maximum(abs(x), abs(y)) <= 1.0


def _disc(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return x * x + y * y <= 1.0


# kind -> inside test on coordinates normalised to the object's half extents ([-1, 1]^2)
_SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": _disc,
    "square": lambda x, y: np.maximum(abs(x), abs(y)) <= 0.85,
    "triangle": lambda x, y: (y <= 0.9) & (abs(x) <= (y + 0.9) / 1.8),
    "diamond": lambda x, y: abs(x) + abs(y) <= 1.0,
    "cross": lambda x, y: (
        (np.maximum(abs(x), abs(y)) <= 0.8) & ((abs(x - y) <= 0.32) | (abs(x + y) <= 0.32))
    ),
    "plus": lambda x, y: (
        (np.maximum(abs(x), abs(y)) <= 0.95) & (np.minimum(abs(x), abs(y)) <= 0.25)
    ),
    "ring": lambda x, y: (x * x + y * y <= 1.0) & (x * x + y * y >= 0.3),
    "star": lambda x, y: _in_polygon(x, y, _STAR),
    "ellipse": lambda x, y: x * x + (y / 0.55) ** 2 <= 1.0,
    "half-disc": lambda x, y: (x * x + (y - 0.5) ** 2 <= 1.0) & (y <= 0.5),
    "dot": _disc,
    "dash": _box,
    "bar": _box,
}


Background = tuple[str, tuple[float, ...], tuple[float, ...], float, float, int]


def sample_background(rng: np.random.Generator, size: int) -> Background:
    """(texture, dark, light, period, angle, noise_seed) of one image of side ``size``."""
    texture = TEXTURES[rng.integers(len(TEXTURES))]
    dark = tuple(rng.uniform(0.0, 45.0, 3))
    light = tuple(rng.uniform(75.0, 120.0, 3))
    period = size * rng.uniform(0.12, 0.25)
    angle = rng.uniform(0.0, 2 * math.pi)
    if texture == "striped":  # horizontal, vertical or diagonal stripes
        angle = round(angle / (math.pi / 4)) * (math.pi / 4)
    return texture, dark, light, period, angle, int(rng.integers(2**32))


def paint_background(
    texture: str,
    dark: tuple[float, ...],
    light: tuple[float, ...],
    period: float,
    angle: float,
    noise_seed: int,
    centres: np.ndarray,
) -> np.ndarray:
    """Blend of the dark and light colours by the texture's weight map, uint8 (3, S, S), at
    the pixel centres ``centres`` (S,)."""
    x = centres[None, :]
    y = centres[:, None]
    along = x * math.cos(angle) + y * math.sin(angle)
    half = period / 2
    if texture == "plain":
        weight = np.zeros_like(along)
    elif texture == "striped":
        weight = np.floor(along / half) % 2
    elif texture == "checkered":
        weight = (np.floor(x / half) + np.floor(y / half)) % 2
    elif texture == "noisy":
        weight = np.random.default_rng(noise_seed).random(along.shape)
    else:  # gradient
        weight = (along - along.min()) / (along.max() - along.min())
    dark_colour = np.array(dark)[:, None, None]
    light_colour = np.array(light)[:, None, None]
    return np.rint(dark_colour + (light_colour - dark_colour) * weight).astype(np.uint8)


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object: kind, colour name, centre and half extents in pixels."""

    kind: str
    colour: str
    cx: float
    cy: float
    half_width: float
    half_height: float

    def bounds(self) -> tuple[float, float, float, float]:
        """Geometric (x0, y0, x1, y1); every pixel centre of the object lies inside."""
        return (
            self.cx - self.half_width,
            self.cy - self.half_height,
            self.cx + self.half_width,
            self.cy + self.half_height,
        )


@dataclass(frozen=True)
class Scene:
    """Every random choice of one sample; rendering and captioning are functions of it."""

    label: int
    large: bool
    position: int  # index into POSITIONS: 3 * row + column of the third holding the centre
    main: ShapeObject
    texture: str
    dark: tuple[float, float, float]  # the two background colours
    light: tuple[float, float, float]
    period: float  # stripe / checker period in pixels
    angle: float  # stripe / gradient direction in radians
    noise_seed: int
    distractors: tuple[ShapeObject, ...]

    def caption(self) -> str:
        """E.g. 'a large red triangle at the top left on a striped background with two small
        blue dots'."""
        size = "large" if self.large else "small"
        main = noun_phrase(1, [size, self.main.colour], self.main.kind)
        distractors = [("small", obj.colour, obj.kind) for obj in self.distractors]
        return sentence(f"{main} {POSITIONS[self.position]}", self.texture, distractors)

    def view_caption(self, view: ViewInfo, image_size: int) -> str:
        """The caption of one view of this scene rendered at ``image_size``; every word is true
        for the view, or left out.

        An object is mentioned when one of its pixels lies in the crop. The position word says
        which third of the view (flip applied) holds the main object's centre; none when the
        centre lies outside. Size words compare the object's size in the view (geometric mean of
        its half extents over the view side) with the ranges drawn for whole images: "small" up
        to SMALL_RADIUS[1], "large" from LARGE_RADIUS[0], none between. Colour words name the
        colour the object's pixels have after the view's colour change (:func:`colour_name`);
        none in a grey view.
        """
        crop = [round(fraction * image_size) for fraction in view.box]  # top, left, h, w pixels
        names = self._view_colour_names(view)
        main = None
        if _shows(self.main, crop):
            words = [_view_size(self.main, crop), names[self.main.colour]]
            main = noun_phrase(1, words, self.main.kind)
            u, v = view.to_view(self.main.cx / image_size, self.main.cy / image_size)
            if 0 <= u < 1 and 0 <= v < 1:
                main += f" {POSITIONS[3 * int(3 * v) + int(3 * u)]}"
        distractors = [
            (_view_size(obj, crop), names[obj.colour], obj.kind)
            for obj in self.distractors
            if _shows(obj, crop)
        ]
        return sentence(main, self.texture, distractors)

    def _view_colour_names(self, view: ViewInfo) -> dict[str, str | None]:
        """Palette colour of each object -> the name of its colour in the view (or None)."""
        drawn = list(dict.fromkeys(obj.colour for obj in (self.main, *self.distractors)))
        if view.colour.grayscale:
            return dict.fromkeys(drawn)
        return {
            name: colour_name(view.colour.apply([channel / 255 for channel in COLOURS[name]]))
            for name in drawn
        }


def object_pixels(obj: ShapeObject, centres: np.ndarray) -> tuple[slice, slice, np.ndarray]:
    """(rows, columns, inside): the pixel window around ``obj`` in an image with pixel centres
    ``centres`` (S,), and which of its pixels the object covers (a boolean array)."""
    x0, y0, x1, y1 = obj.bounds()
    size = len(centres)
    columns = slice(max(int(x0), 0), min(math.ceil(x1) + 1, size))
    rows = slice(max(int(y0), 0), min(math.ceil(y1) + 1, size))
    dx = (centres[columns] - obj.cx)[None, :] / obj.half_width
    dy = (centres[rows] - obj.cy)[:, None] / obj.half_height
    return rows, columns, _SHAPES[obj.kind](dx, dy)


def _shows(obj: ShapeObject, crop: Sequence[int]) -> bool:
    """Whether a pixel the object covers lies in ``crop`` = (top, left, height, width) pixels."""
    top, left, height, width = crop
    x0, y0, x1, y1 = obj.bounds()
    xs = np.arange(max(left, math.floor(x0)), min(left + width, math.ceil(x1))) + 0.5
    ys = np.arange(max(top, math.floor(y0)), min(top + height, math.ceil(y1))) + 0.5
    if not (len(xs) and len(ys)):
        return False
    dx = (xs[None, :] - obj.cx) / obj.half_width
    dy = (ys[:, None] - obj.cy) / obj.half_height
    return bool(_SHAPES[obj.kind](dx, dy).any())


def _view_size(obj: ShapeObject, crop: Sequence[int]) -> str | None:
    """'small' / 'large' / None by the object's size in the view (see Scene.view_caption)."""
    _, _, height, width = crop
    extent = math.sqrt(obj.half_width / width * obj.half_height / height)
    if extent <= SMALL_RADIUS[1]:
        return "small"
    return "large" if extent >= LARGE_RADIUS[0] else None


@dataclass
class ShapesSample(Sample):
    """A shapes sample with the scene it was rendered from (its views need not sample it again)."""

    scene: Scene


def _apart(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """Whether two (x0, y0, x1, y1) boxes are at least GAP pixels apart on some axis."""
    return a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1]


def check_arguments(
    name: str, split: str, num_samples: int | None, image_size: int, seed: int
) -> None:
    """A one-line DataError, prefixed with `name`, for a split, size, seed or count that a
    procedural shapes source cannot render."""
    if split not in NUM_SAMPLES:
        raise DataError(f"{name}: unknown split {split!r}; use 'train' or 'val'")
    if image_size < MIN_IMAGE_SIZE:
        raise DataError(f"{name}: image_size={image_size} too small; use {MIN_IMAGE_SIZE}+")
    if seed < 0 or (num_samples is not None and num_samples <= 0):
        raise DataError(f"{name}: seed={seed}, num_samples={num_samples}; use seed >= 0, n > 0")


class ShapesDataset(ImageSource):
    """Procedural shapes: label = main object category, caption = its full description."""

    def __init__(
        self,
        split: str = "train",
        num_samples: int | None = None,
        image_size: int = 32,
        seed: int = 0,
    ) -> None:
        check_arguments("shapes", split, num_samples, image_size, seed)
        self.classes = list(CLASSES)
        self.name = "shapes"
        self.split = split
        self.image_size = image_size
        self.seed = seed
        self._length = NUM_SAMPLES[split] if num_samples is None else num_samples
        self._centres = np.arange(image_size, dtype=np.float64) + 0.5

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Sample:
        scene = self.scene(index)
        image, _ = self._render(scene)
        return ShapesSample(torch.from_numpy(image), scene.label, scene.caption(), scene)

    def captions(self, limit: int | None = None) -> list[str]:
        count = len(self) if limit is None else min(limit, len(self))
        return [self.scene(index).caption() for index in range(count)]

    def describe_view(self, index: int, sample: Sample, view: ViewInfo) -> str:
        """What this view of item ``index`` shows (:meth:`Scene.view_caption`)."""
        scene = sample.scene if isinstance(sample, ShapesSample) else self.scene(index)
        return scene.view_caption(view, self.image_size)

    def labels(self) -> list[int]:
        return [self.scene(index).label for index in range(len(self))]

    def annotations(self, index: int) -> dict[str, torch.Tensor]:
        """``mask`` (H, W) int64: 0 background, 1 + label main object, 1 + num_classes
        distractors; ``boxes`` (M, 4) float xyxy pixel edges, tight around each object's
        visible pixels (main object first); ``box_labels`` (M,) int64 (num_classes = distractor).
        """
        scene = self.scene(index)
        _, instances = self._render(scene)
        num_classes = len(CLASSES)
        main_id = len(scene.distractors) + 1
        mask = np.where(instances == main_id, 1 + scene.label, 0)
        mask[(instances > 0) & (instances < main_id)] = 1 + num_classes
        boxes = []
        for instance in [main_id, *range(1, main_id)]:
            rows, cols = np.nonzero(instances == instance)
            boxes.append([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
        box_labels = [scene.label] + [num_classes] * len(scene.distractors)
        return {
            "mask": torch.from_numpy(mask.astype(np.int64)),
            "boxes": torch.tensor(boxes, dtype=torch.float32),
            "box_labels": torch.tensor(box_labels, dtype=torch.int64),
        }

    def scene(self, index: int) -> Scene:
        """Sample every parameter of item ``index`` (cheap: nothing is rendered)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} shapes")
        rng = np.random.default_rng([self.seed, _SPLIT_STREAM[self.split], index])
        size = self.image_size
        names = list(COLOURS)
        label = int(rng.integers(len(CLASSES)))
        colour = names[rng.integers(len(names))]
        large = bool(rng.integers(2))
        position = int(rng.integers(len(POSITIONS)))
        radius = size * rng.uniform(*(LARGE_RADIUS if large else SMALL_RADIUS))
        row, column = divmod(position, 3)
        cx, cy = (
            rng.uniform(max(k * size / 3, radius), min((k + 1) * size / 3, size - radius))
            for k in (column, row)
        )
        main = ShapeObject(CLASSES[label], colour, cx, cy, radius, radius)
        texture, dark, light, period, angle, noise_seed = sample_background(rng, size)
        occupied = [main.bounds()]
        distractors = []
        unit = max(DISTRACTOR_RADIUS * size, MIN_DISTRACTOR_RADIUS)
        for _ in range(int(rng.integers(MAX_DISTRACTORS + 1))):
            kind = list(DISTRACTORS)[rng.integers(len(DISTRACTORS))]
            kind_colour = names[rng.integers(len(names))]
            half_w, half_h = (unit * extent for extent in DISTRACTORS[kind])
            for _attempt in range(20):  # a distractor with no free spot is left out
                candidate = ShapeObject(
                    kind,
                    kind_colour,
                    rng.uniform(half_w, size - half_w),
                    rng.uniform(half_h, size - half_h),
                    half_w,
                    half_h,
                )
                if all(_apart(candidate.bounds(), other) for other in occupied):
                    distractors.append(candidate)
                    occupied.append(candidate.bounds())
                    break
        return Scene(
            label, large, position, main, texture, dark, light, period, angle, noise_seed,
            tuple(distractors),
        )  # fmt: skip

    def _render(self, scene: Scene) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 image (3, S, S), instance map (S, S): 0 background, k = k-th drawn object)."""
        image = paint_background(
            scene.texture, scene.dark, scene.light, scene.period, scene.angle, scene.noise_seed,
            self._centres,
        )  # fmt: skip
        instances = np.zeros((self.image_size,) * 2, dtype=np.int64)
        for instance, obj in enumerate((*scene.distractors, scene.main), start=1):
            rows, columns, inside = object_pixels(obj, self._centres)
            image[:, rows, columns][:, inside] = np.array(COLOURS[obj.colour], np.uint8)[:, None]
            instances[rows, columns][inside] = instance
        return image, instances
