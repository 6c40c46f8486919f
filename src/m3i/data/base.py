"""The base types of the data layer: the one-line DataError, a Sample, the ImageSource every
source implements, and how a view was made (ViewInfo, ColourChange), which a source reads to
describe a view (:meth:`ImageSource.describe_view`).

Geometry convention (the decoder relies on it): ``box = (top, left, height, width)`` as
fractions of the source image; the view's normalised point (u, v) in [0, 1]^2 (u horizontal)
maps to the source point x = left + (1 - u if flipped else u) * width, y = top + v * height.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


class DataError(ValueError):
    """Bad data input; the message is one line naming the file or spec and what would work."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


@dataclass
class Sample:
    """One image with its optional label and caption."""

    image: torch.Tensor  # uint8, (3, H, W), RGB
    label: int  # class index, -1 when the sample has no label
    caption: str  # "" when the sample has no caption
    skipped: int = field(default=0, kw_only=True)  # unreadable samples passed over to reach it


@dataclass
class SourceScan:
    """What a start-up scan knows of a source's samples without decoding an image: the label of
    each sample read (-1: none) and the non-empty captions (m3i.data.scan)."""

    labels: list[int] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)


class ImageSource(torch.utils.data.Dataset):
    """Base class of every source: indexable samples plus class names and cheap captions."""

    classes: list[str] | None
    name: str
    # True when the class names are only the numbers 0..C-1 (a captions: file's labels): there
    # is no name to match them by when two labelled sources are mixed
    numbered_classes: bool = False

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Sample:
        raise NotImplementedError

    def captions(self, limit: int | None = None) -> list[str]:
        """Non-empty captions in index order (at most ``limit``), without decoding images."""
        raise NotImplementedError

    def labels(self) -> list[int]:
        """Every sample's label in index order (-1: none), without decoding images."""
        return [self[index].label for index in range(len(self))]

    def describe_view(self, index: int, sample: Sample, view: ViewInfo) -> str:
        """The caption of one augmented view of sample ``index`` (``sample`` is ``self[index]``).

        By default the sample's own caption; a source that knows what its images hold (shapes)
        describes what the view shows after its crop, flip and colour change.
        """
        return sample.caption

    @property
    def num_corrupt(self) -> int:
        """Images found unreadable so far (always 0 for sources held in memory)."""
        return 0

    def verify(self, progress: bool = False) -> int:
        """Check every image up-front (a progress bar if `progress`); returns the number of
        corrupt images (none here)."""
        return 0


@dataclass(frozen=True)
class ColourChange:
    """The colour steps one view went through, replayable on single colours.

    ``steps`` are (name in m3i.data.views.COLOUR_OPS, factor) in the order applied;
    ``contrast_grey`` is the mean grey level the contrast step blended toward (the whole view's
    at that point: the one step that is not per pixel); ``grayscale`` says whether the view
    ended grey.
    """

    steps: tuple[tuple[str, float], ...] = ()
    contrast_grey: float = 0.0
    grayscale: bool = False

    def apply(self, rgb: Sequence[float]) -> tuple[float, float, float]:
        """A float RGB colour in [0, 1] -> the colour its pixels have in the view (before
        normalisation), exact where resampling left them unmixed with their neighbours.

        The formulas of torchvision's ops, on one colour in plain Python: the ops themselves cost
        about a millisecond per call even on one pixel, as much as making the view.
        """
        red, green, blue = rgb
        for name, factor in self.steps:
            if name == "hue":
                hue, saturation, value = colorsys.rgb_to_hsv(red, green, blue)
                red, green, blue = colorsys.hsv_to_rgb((hue + factor) % 1.0, saturation, value)
                continue
            toward = {
                "brightness": 0.0,
                "contrast": self.contrast_grey,
                "saturation": _grey(red, green, blue),
            }[name]
            red, green, blue = (
                min(max(factor * channel + (1 - factor) * toward, 0.0), 1.0)
                for channel in (red, green, blue)
            )
        if self.grayscale:
            red = green = blue = _grey(red, green, blue)
        return red, green, blue


def _grey(red: float, green: float, blue: float) -> float:
    """Luma with torchvision's rgb_to_grayscale weights."""
    return 0.2989 * red + 0.587 * green + 0.114 * blue


@dataclass(frozen=True)
class ViewInfo:
    """How one view was made: ``box`` = (top, left, height, width) as fractions of the source
    (the module's geometry convention), the horizontal flip and the colour change."""

    box: tuple[float, float, float, float]
    flipped: bool
    colour: ColourChange

    def to_view(self, x: float, y: float) -> tuple[float, float]:
        """The view point (u, v) of the source point (x, y), all fractions; the point lies in
        the view when both are in [0, 1)."""
        top, left, height, width = self.box
        u = (x - left) / width
        return (1 - u if self.flipped else u), (y - top) / height
