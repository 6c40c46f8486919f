"""Augmented views: the recorded box and flip are true, and randomness is reproducible."""

import itertools
from dataclasses import replace
from fractions import Fraction

import pytest
import timm.data
import torch
import torchvision.transforms as legacy
from PIL import Image
from torchvision.transforms.v2 import functional as F

from m3i.data.base import ColourChange, ImageSource, Sample, ViewInfo
from m3i.data.batch import collate
from m3i.data.shapes import ShapesDataset
from m3i.data.views import (
    EVAL_CROP_PCT,
    ViewConfig,
    ViewDataset,
    eval_annotations,
    eval_data_config,
    eval_transform,
    make_view,
    sample_crop,
    view_item,
)

GEOMETRY_ONLY = ViewConfig(color_jitter=0.0, hue=0.0, grayscale=0.0)
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]  # timm's, by hand
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def pixels(view: torch.Tensor) -> torch.Tensor:
    """A view's pixels in [0, 1]: its ImageNet normalisation undone."""
    return view * IMAGENET_STD + IMAGENET_MEAN


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ramp(height: int, width: int) -> torch.Tensor:
    """uint8 image whose channels encode x, y and x + y of each pixel centre."""
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    return torch.stack([xs / width * 255, ys / height * 255, (xs / width + ys / height) * 127])


def bilinear(image: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sample ``image`` at pixel coordinates (x, y) (pixel edges at integers), edges clamped."""
    _, height, width = image.shape
    x = (x - 0.5).clamp(0, width - 1)
    y = (y - 0.5).clamp(0, height - 1)
    x0 = x.floor().long().clamp(max=width - 2)
    y0 = y.floor().long().clamp(max=height - 2)
    fx, fy = x - x0, y - y0
    top = image[:, y0, x0] * (1 - fx) + image[:, y0, x0 + 1] * fx
    bottom = image[:, y0 + 1, x0] * (1 - fx) + image[:, y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def expected_view(image: torch.Tensor, box: torch.Tensor, flipped: bool, size: int) -> torch.Tensor:
    """The source sampled where the documented convention maps every view pixel centre."""
    top, left, height, width = box.tolist()
    u = (torch.arange(size) + 0.5) / size
    u_grid, v_grid = u[None, :].expand(size, size), u[:, None].expand(size, size)
    x = left + ((1 - u_grid) if flipped else u_grid) * width
    y = top + v_grid * height
    return bilinear(image, x * image.shape[2], y * image.shape[1])


def test_crop_sampler_matches_torchvision() -> None:
    cases = [((64, 48), (0.35, 1.0), (3 / 4, 4 / 3)), ((20, 28), (0.08, 1.0), (0.1, 0.2))]
    cases += [((5, 100), (0.5, 1.0), (5.0, 9.0)), ((100, 3), (0.9, 1.0), (3 / 4, 4 / 3))]
    for (height, width), scale, ratio in cases:
        for seed in range(50):
            torch.manual_seed(seed)
            reference = legacy.RandomResizedCrop.get_params(
                torch.zeros(3, height, width), list(scale), list(ratio)
            )
            generator = gen(seed)
            assert sample_crop(height, width, scale, ratio, generator) == tuple(reference)


@pytest.mark.parametrize("height,width", [(48, 64), (20, 28)])
def test_recorded_box_and_flip_are_true(height: int, width: int) -> None:
    exact = ramp(height, width)
    image = exact.round().to(torch.uint8)
    slope = 255 / min(height, width)  # value change per source pixel along the steeper ramp
    flips = set()
    for seed in range(40):
        view, info = make_view(image, GEOMETRY_ONLY, 32, gen(seed))
        box, flipped = torch.tensor(info.box), info.flipped
        flips.add(flipped)
        assert view.shape == (3, 32, 32) and view.dtype == torch.float32
        top, left, box_height, box_width = box.tolist()
        assert min(top, left) >= 0 and max(top + box_height, left + box_width) <= 1 + 1e-6
        assert 0.3 < box_height * box_width <= 1.0
        error = (pixels(view) * 255 - expected_view(exact, box, flipped, 32)).abs()
        assert error[:, 2:-2, 2:-2].max() < 2.0  # a quarter-pixel slip would exceed this
        assert error.max() < 0.5 * slope + 1.0  # borders: resampling clamps at the crop edge
    assert flips == {True, False}


def test_flip_probability_extremes() -> None:
    image = ramp(30, 30).round().to(torch.uint8)
    for probability, expected in ((1.0, True), (0.0, False)):
        cfg = replace(GEOMETRY_ONLY, flip=probability)
        for seed in range(5):
            view, info = make_view(image, cfg, 32, gen(seed))
            assert info.flipped is expected
            left_minus_right = view[0, :, 0] - view[0, :, -1]
            assert bool((left_minus_right > 0).all()) is expected  # x ramp decreases if flipped


def test_normalisation_and_colour_ops() -> None:
    image = ShapesDataset()[0].image
    plain, info = make_view(image, GEOMETRY_ONLY, 32, gen(3))
    top, left, height, width = (round(v * 32) for v in info.box)  # shapes are 32 px
    crop = F.resized_crop(image, top, left, height, width, [32, 32], antialias=True) / 255
    torch.testing.assert_close(pixels(plain), crop.flip(-1) if info.flipped else crop)
    grey, grey_info = make_view(image, replace(GEOMETRY_ONLY, grayscale=1.0), 32, gen(3))
    grey = pixels(grey)
    torch.testing.assert_close(grey[0], grey[1])
    torch.testing.assert_close(grey[1], grey[2])
    assert grey_info.colour == ColourChange(grayscale=True)
    jittered, info = make_view(image, ViewConfig(), 32, gen(3))
    jittered = pixels(jittered)
    assert not torch.allclose(jittered, pixels(plain))
    assert -1e-6 <= jittered.min() and jittered.max() <= 1 + 1e-6
    assert info.box == make_view(image, GEOMETRY_ONLY, 32, gen(3))[1].box
    with pytest.raises(ValueError, match="scale"):
        ViewConfig(scale_min=0.5, scale_max=0.2)


def test_colour_change_replays_the_view_pixels() -> None:
    """Four flat quadrants; ColorJitter-strength jitter and grayscale: the recorded change, applied
    to each quadrant's colour, gives that quadrant's pixels in the view."""
    colours = torch.tensor([[230, 40, 40], [40, 215, 225], [245, 245, 245], [20, 30, 90]])
    image = torch.empty(3, 32, 32, dtype=torch.uint8)
    for k, colour in enumerate(colours):
        row, column = divmod(k, 2)
        image[:, 16 * row : 16 * row + 16, 16 * column : 16 * column + 16] = colour[:, None, None]
    cfg = replace(GEOMETRY_ONLY, scale_min=1.0, flip=0.0)  # the whole (square) image
    cfg = replace(cfg, color_jitter=0.6, hue=0.3, grayscale=0.3)
    kinds = set()
    for seed in range(40):
        view, info = make_view(image, cfg, 32, gen(seed))
        view = pixels(view)
        kinds.add((len(info.colour.steps), info.colour.grayscale))
        for k, colour in enumerate(colours):
            row, column = divmod(k, 2)
            pixel = view[:, 16 * row + 8, 16 * column + 8]
            replayed = torch.tensor(info.colour.apply((colour / 255).tolist()))
            torch.testing.assert_close(replayed, pixel, atol=2e-6, rtol=0)
    assert kinds == {(4, False), (4, True)}


class Captioned(ImageSource):
    """Two flat images whose caption names the index; views keep that caption."""

    classes, name = None, "captioned"

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> Sample:
        return Sample(torch.full((3, 8, 8), 9 * index, dtype=torch.uint8), -1, f"image {index}")


def test_caption_describes_view_one() -> None:
    image = ShapesDataset()[0].image
    seen: list[ViewInfo] = []

    def describe(info: ViewInfo) -> str:
        seen.append(info)
        return f"view at {info.box}"

    item = view_item(image, 1, "whole", 0, ViewConfig(), 32, gen(5), describe=describe)
    first, _ = make_view(image, ViewConfig(), 32, gen(5))
    assert len(seen) == 1 and torch.equal(item["view1"], first)
    assert item["caption"] == f"view at {seen[0].box}"
    assert torch.equal(item["box1"], torch.tensor(seen[0].box, dtype=torch.float32))
    assert item["flip1"].item() == seen[0].flipped
    assert view_item(image, 1, "whole", 0, ViewConfig(), 32, gen(5))["caption"] == "whole"
    views = ViewDataset(Captioned(), ViewConfig(), 8)
    assert [views[i]["caption"] for i in range(2)] == ["image 0", "image 1"]


def test_view_dataset_is_reproducible_and_collates() -> None:
    source = ShapesDataset(num_samples=8)
    views = ViewDataset(source, ViewConfig(), 24, seed=1)
    torch.manual_seed(0)
    first = views[3]
    torch.manual_seed(123)  # the global RNG plays no part
    again = ViewDataset(source, ViewConfig(), 24, seed=1)[3]
    for key in ("view1", "view2", "box1", "box2", "flip1", "flip2"):
        assert torch.equal(first[key], again[key])
    assert not torch.equal(first["view1"], first["view2"])
    views.epoch = 1
    assert not torch.equal(views[3]["view1"], first["view1"])
    views.epoch = 0
    assert torch.equal(views[3]["view1"], first["view1"])
    assert first["label"].item() == source[3].label and first["caption"] == again["caption"]

    batch = collate([views[i] for i in range(4)])
    assert batch.views[0].image.shape == (4, 3, 24, 24) and batch.views[1].box.shape == (4, 4)
    assert batch.views[0].flip.dtype == torch.bool and batch.views[0].flip.shape == (4,)
    assert batch.labels.dtype == torch.int64 and batch.indices.tolist() == [0, 1, 2, 3]
    assert batch.captions == [views[i]["caption"] for i in range(4)]


def uint8_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Random uint8 (3, H, W) pixels: every bicubic overshoot is clipped somewhere."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)


def as_pil(image: torch.Tensor) -> Image.Image:
    """A uint8 (3, H, W) tensor as the RGB PIL image timm's pipelines read (by hand)."""
    return Image.fromarray(image.permute(1, 2, 0).numpy(), mode="RGB")


@pytest.mark.parametrize("crop_pct", [0.875, 1.0])
@pytest.mark.parametrize(("height", "width"), [(40, 56), (56, 40), (32, 32)])
def test_eval_transform_is_timms_create_transform(crop_pct, height, width) -> None:
    """Exactly timm's eval transform of the same config on the same (PIL) image: m3i hands the
    image to timm, so nothing may differ, not even rounding."""
    image = uint8_image(height, width)
    config = eval_data_config(32, crop_pct)
    expected = timm.data.create_transform(**config, is_training=False)(as_pil(image))
    view = eval_transform(image, config)
    assert view.shape == expected.shape == (3, 32, 32)
    assert torch.equal(view, expected)


def test_eval_data_config_is_a_whole_timm_data_config() -> None:
    config = eval_data_config(24)
    assert timm.data.DEFAULT_CROP_PCT == 0.875 == EVAL_CROP_PCT == config["crop_pct"]
    resolved = timm.data.resolve_data_config(pretrained_cfg=config)
    assert resolved == config  # timm reads every key back, as m3i gave them
    assert config["input_size"] == (3, 24, 24) and config["crop_mode"] == "center"
    assert (config["mean"], config["std"]) == (ViewConfig.mean, ViewConfig.std)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="crop_pct must be in"):
            eval_data_config(24, bad)


def test_eval_transform_keeps_the_aspect_and_the_centre() -> None:
    """By hand: crop_pct=1 resizes the 20x40 image to 16x32 and keeps its central 16 columns
    (source columns 10..30): the bright left half ends at the middle of the view."""
    image = torch.full((3, 20, 40), 128, dtype=torch.uint8)
    image[:, :, 20:] = 0
    view = pixels(eval_transform(image, eval_data_config(16, 1.0)))
    assert view.shape == (3, 16, 16)
    # columns 0-4 and 11-15 see no pixel of the other half (bicubic support: 2.5 sources)
    torch.testing.assert_close(view[:, :, :5], torch.full((3, 16, 5), 128 / 255))
    torch.testing.assert_close(view[:, :, 11:], torch.zeros(3, 16, 5), atol=1e-6, rtol=0)


def source_pixels(view: int, resized: int, source: int, crop: int) -> list[list[int]]:
    """By hand, per view row (or column): the source rows whose label nearest-neighbour may
    give it: the one under its centre, or both where the centre lies on their shared edge."""
    start = int(round((resized - crop) / 2))  # CenterCrop's offset
    rows = []
    for index in range(view):
        centre = Fraction(2 * (index + start) + 1, 2) * Fraction(source, resized)
        rows.append([int(centre) - 1, int(centre)] if centre.denominator == 1 else [int(centre)])
    return rows


@pytest.mark.parametrize(("crop_pct", "resized"), [(0.875, (36, 50)), (1.0, (32, 44))])
def test_eval_annotations_mask_follows_the_images_geometry(crop_pct, resized) -> None:
    """Each mask pixel is the label under its centre after timm's resize (short side to
    floor(32 / crop_pct), the long one as torchvision rounds it) and central crop; timm's own
    pipeline at nearest interpolation (no normalisation) gives the same, except where a centre
    lies exactly on a source pixel edge, which PIL and torch round each their own way."""
    labels = uint8_image(40, 56, seed=1)[0] % 7
    config = eval_data_config(32, crop_pct)
    mask = eval_annotations({"mask": labels.long()}, (40, 56), config)["mask"]
    assert mask.shape == (32, 32) and mask.dtype == torch.int64
    rows = source_pixels(32, resized[0], 40, 32)
    columns = source_pixels(32, resized[1], 56, 32)
    reference = {**config, "interpolation": "nearest", "mean": (0.0,) * 3, "std": (1.0,) * 3}
    pil = timm.data.create_transform(**reference)(as_pil(labels.expand(3, -1, -1)))[0]
    for r, c in itertools.product(range(32), range(32)):
        allowed = {labels[a, b].item() for a in rows[r] for b in columns[c]}
        assert mask[r, c].item() in allowed, (r, c)
        if len(allowed) == 1:
            assert round(pil[r, c].item() * 255) == mask[r, c].item(), (r, c)


def test_eval_annotations_boxes_by_hand() -> None:
    """40x56 at 32, crop_pct 0.875: short side to floor(32 / 0.875) = 36, so 36x50 (scales
    0.9 and 50/56), then the central 32x32 from row 2, column 9; boxes outside it go."""
    boxes = torch.tensor([[10.0, 4, 30, 20], [0, 0, 3, 3], [50, 30, 56, 40], [5, 30, 20, 40]])
    labels = torch.tensor([1, 2, 3, 4])
    annotations = {"boxes": boxes, "box_labels": labels, "other": torch.tensor(7)}
    out = eval_annotations(annotations, (40, 56), eval_data_config(32))
    sx, sy = 50 / 56, 0.9
    first = [10 * sx - 9, 4 * sy - 2, 30 * sx - 9, 20 * sy - 2]
    last = [5 * sx - 9, 30 * sy - 2, 20 * sx - 9, 40 * sy - 2]
    expected = torch.tensor([first, last]).clamp(0, 32)  # the last is cut left and below
    torch.testing.assert_close(out["boxes"], expected)
    assert out["box_labels"].tolist() == [1, 4] and out["other"].item() == 7
    same = eval_annotations(annotations, (32, 32), eval_data_config(32, 1.0))
    assert torch.equal(same["boxes"], boxes[[0, 1, 3]].clamp(0, 32))
