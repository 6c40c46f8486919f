"""Augmented views that record their geometry (crop box and flip), reproducibly.

The geometry convention of a view's box is :mod:`m3i.data.base`'s. Each view also records its
colour change (:class:`ColourChange`), so that a source can describe
the view its text target sees (:meth:`ImageSource.describe_view`), not only the whole image.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any, ClassVar

import numpy as np
import torch
from PIL.Image import Image
from timm.data import DEFAULT_CROP_PCT, create_transform
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from m3i.data.base import ColourChange, ImageSource, ViewInfo
from m3i.ranges import FRACTION, NON_NEGATIVE, PROBABILITY, Range, ranged, value_problem

# colour step name -> torchvision op on a float image (ColorJitter's four steps)
COLOUR_OPS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "brightness": F.adjust_brightness,
    "contrast": F.adjust_contrast,
    "saturation": F.adjust_saturation,
    "hue": F.adjust_hue,
}
EVAL_CROP_PCT = DEFAULT_CROP_PCT  # timm's: the central 87.5% of the resized short side
EVAL_INTERPOLATION = "bicubic"  # timm's eval default for ViTs and ConvNeXts


@dataclass
class ViewConfig:
    """Augmentation of a view (RandomResizedCrop, flip, colour jitter, grayscale): the config's
    `views` section. A view's side is the model's input side, given where views are made."""

    ratio: ClassVar[tuple[float, float]] = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect range
    mean: ClassVar[tuple[float, float, float]] = (0.485, 0.456, 0.406)  # ImageNet's, as timm's
    std: ClassVar[tuple[float, float, float]] = (0.229, 0.224, 0.225)

    scale_min: float = ranged(0.35, FRACTION)  # RandomResizedCrop area range
    scale_max: float = ranged(1.0, FRACTION)
    flip: float = ranged(0.5, PROBABILITY)  # horizontal flip probability
    # brightness/contrast/saturation strength, 0 disables
    color_jitter: float = ranged(0.4, NON_NEGATIVE)
    hue: float = ranged(0.1, Range(0, 0.5))  # hue jitter in [-hue, hue] (of a full turn), 0: off
    grayscale: float = ranged(0.1, PROBABILITY)  # probability

    def __post_init__(self) -> None:
        problem = value_problem(self) or self.relation_problem()
        if problem:
            raise ValueError(f"ViewConfig: {problem}")

    def relation_problem(self, prefix: str = "") -> str | None:
        """A one-line message if the values do not fit together, else None."""
        if self.scale_min <= self.scale_max:
            return None
        return (
            f"{prefix}scale_min ({self.scale_min}) must be <= {prefix}scale_max ({self.scale_max})"
        )


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return torch.empty(1).uniform_(low, high, generator=generator).item()


def sample_crop(
    height: int,
    width: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    generator: torch.Generator,
) -> tuple[int, int, int, int]:
    """(top, left, h, w) in pixels, drawn exactly as RandomResizedCrop.get_params draws it."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * _uniform(scale[0], scale[1], generator)
        aspect_ratio = math.exp(_uniform(log_ratio[0].item(), log_ratio[1].item(), generator))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height  # fall back to a central crop
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _color_jitter(
    view: torch.Tensor, cfg: ViewConfig, generator: torch.Generator
) -> tuple[torch.Tensor, ColourChange]:
    """Brightness, contrast, saturation and hue in random order, as ColorJitter does."""
    strength = cfg.color_jitter
    ops = []
    if strength:
        low = max(0.0, 1.0 - strength)
        ops += [
            (name, _uniform(low, 1.0 + strength, generator))
            for name in ("brightness", "contrast", "saturation")
        ]
    if cfg.hue:
        ops.append(("hue", _uniform(-cfg.hue, cfg.hue, generator)))
    steps = tuple(ops[k] for k in torch.randperm(len(ops), generator=generator).tolist())
    grey = 0.0
    for name, factor in steps:
        if name == "contrast":
            grey = F.rgb_to_grayscale(view).mean().item()  # what adjust_contrast blends toward
        view = COLOUR_OPS[name](view, factor)
    return view, ColourChange(steps, grey)


def make_view(
    image: torch.Tensor, cfg: ViewConfig, size: int, generator: torch.Generator
) -> tuple[torch.Tensor, ViewInfo]:
    """One augmented view: (float image (3, size, size) normalised, how it was made)."""
    _, height, width = image.shape
    scale = (cfg.scale_min, cfg.scale_max)
    top, left, h, w = sample_crop(height, width, scale, cfg.ratio, generator)
    view = F.resized_crop(image, top, left, h, w, [size, size], antialias=True)
    view = F.to_dtype(view, torch.float32, scale=True)
    flipped = bool(torch.rand(1, generator=generator).item() < cfg.flip)
    if flipped:
        view = F.horizontal_flip(view)
    view, colour = _color_jitter(view, cfg, generator)
    if torch.rand(1, generator=generator).item() < cfg.grayscale:
        view = F.rgb_to_grayscale(view, num_output_channels=3)
        colour = ColourChange(colour.steps, colour.contrast_grey, grayscale=True)
    view = F.normalize(view, list(cfg.mean), list(cfg.std))
    box = (top / height, left / width, h / height, w / width)
    return view, ViewInfo(box, flipped, colour)


def eval_data_config(size: int, crop_pct: float = EVAL_CROP_PCT) -> dict[str, Any]:
    """The timm data config m3i evaluates with: the short side resized to floor(size /
    crop_pct) with bicubic interpolation, the central (size, size) crop, ViewConfig's mean/std
    (the keys of ``timm.data.resolve_data_config``; a model's ``pretrained_cfg`` may hold it)."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return {
        "input_size": (3, size, size),
        "interpolation": EVAL_INTERPOLATION,
        "mean": ViewConfig.mean,
        "std": ViewConfig.std,
        "crop_pct": crop_pct,
        "crop_mode": "center",
    }


@lru_cache(maxsize=8)
def _timm_eval_transform(frozen: tuple[tuple[str, Any], ...]) -> Callable[[Image], torch.Tensor]:
    return create_transform(**dict(frozen), is_training=False)


def _frozen(data_config: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """A data config as a hashable key (its lists as tuples)."""
    return tuple(
        (key, tuple(value) if isinstance(value, list) else value)
        for key, value in sorted(data_config.items())
    )


def eval_transform(image: torch.Tensor, data_config: dict[str, Any]) -> torch.Tensor:
    """Evaluation view (3, H, W) float of a uint8 (3, H', W') image: timm's eval transform
    ``create_transform(**data_config, is_training=False)`` on the image as PIL, timm's input
    (on float tensors its bicubic resize would not clip overshoots as PIL's does)."""
    return _timm_eval_transform(_frozen(data_config))(F.to_pil_image(image))


def eval_annotations(
    annotations: dict[str, torch.Tensor],
    canvas: tuple[int, int],
    data_config: dict[str, Any],
) -> dict[str, torch.Tensor]:
    """The geometry of :func:`eval_transform` (resize of the short side, central crop) applied
    to the annotations of a (H', W') ``canvas`` with torchvision's tv_tensors: ``mask`` (H', W')
    by pixel-centre nearest neighbour; ``boxes`` (M, 4) xyxy pixels scaled, shifted, clipped
    to the crop and dropped with their ``box_labels`` when under a pixel wide or tall.
    Other keys pass unchanged. For a square ``input_size`` (as :func:`eval_data_config`'s)."""
    size = data_config["input_size"][-1]
    scale = math.floor(size / data_config["crop_pct"])  # timm's resize of the short side
    geometry = v2.Compose(
        [v2.Resize(scale, interpolation=v2.InterpolationMode.NEAREST_EXACT), v2.CenterCrop(size)]
    )
    out = dict(annotations)
    if "mask" in out:
        out["mask"] = geometry(tv_tensors.Mask(out["mask"])).as_subclass(torch.Tensor)
    if "boxes" in out:
        boxes = tv_tensors.BoundingBoxes(out["boxes"], format="XYXY", canvas_size=canvas)
        kept = v2.SanitizeBoundingBoxes()(
            {"boxes": geometry(boxes), "labels": out.get("box_labels")}
        )
        out["boxes"] = kept["boxes"].as_subclass(torch.Tensor)
        if "box_labels" in out:
            out["box_labels"] = kept["labels"]
    return out


def view_item(
    image: torch.Tensor,
    label: int,
    caption: str,
    index: int,
    cfg: ViewConfig,
    size: int,
    generator: torch.Generator,
    num_views: int = 2,
    describe: Callable[[ViewInfo], str] | None = None,
) -> dict[str, torch.Tensor | str]:
    """One training item: `num_views` augmented (size, size) views with their boxes (float32)
    and flips, the label (-1: none), the caption ("" if none) and the sample's index.

    The caption is the one the text target pairs with view 1: ``describe(view 1's info)`` when
    the source can describe a view, else ``caption`` (the sample's own).
    """
    item: dict[str, torch.Tensor | str] = {}
    for number in range(1, num_views + 1):
        view, info = make_view(image, cfg, size, generator)
        item[f"view{number}"] = view
        item[f"box{number}"] = torch.tensor(info.box, dtype=torch.float32)
        item[f"flip{number}"] = torch.tensor(info.flipped)
        if number == 1 and describe is not None:
            caption = describe(info)
    item["label"] = torch.tensor(label, dtype=torch.int64)
    item["caption"] = caption
    item["index"] = torch.tensor(index, dtype=torch.int64)
    return item


class ViewDataset(torch.utils.data.Dataset):
    """``num_views`` (two by default) augmented (size, size) views per sample; item i's
    randomness is a function of (seed, epoch, i).

    Set ``epoch`` before iterating a DataLoader over it (workers copy the dataset when the
    iterator starts, so use non-persistent workers or recreate them each epoch).
    """

    def __init__(
        self, source: ImageSource, cfg: ViewConfig, size: int, seed: int = 0, num_views: int = 2
    ) -> None:
        self.source = source
        self.cfg = cfg
        self.size = size
        self.seed = seed
        self.num_views = num_views  # 1 for supervised fine-tuning: view1 only
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.source)

    def generator(self, index: int) -> torch.Generator:
        """The generator that item ``index`` of the current epoch draws from."""
        state = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1, np.uint64)
        return torch.Generator().manual_seed(int(state[0]))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        sample = self.source[index]
        item = view_item(
            sample.image, sample.label, sample.caption, index, self.cfg, self.size,
            self.generator(index), self.num_views,
            partial(self.source.describe_view, index, sample),
        )  # fmt: skip
        item["skipped"] = torch.tensor(sample.skipped, dtype=torch.int64)
        return item
