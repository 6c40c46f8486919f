"""Evaluation settings: one dataclass per task, changed with `m3i eval ... --set key=value`."""

from __future__ import annotations

from dataclasses import dataclass, field

from m3i.config import DEVICES, ConfigError, apply_overrides
from m3i.data.shapes import MIN_IMAGE_SIZE
from m3i.data.views import EVAL_CROP_PCT
from m3i.ranges import COUNT, FRACTION, NON_NEGATIVE, POSITIVE, Range, one_of, ranged, value_problem


@dataclass
class KnnSettings:
    k: int = ranged(20, COUNT)  # DINO's weighted kNN
    temperature: float = ranged(0.07, POSITIVE)


@dataclass
class LinearSettings:
    lrs: list[float] = ranged([1e-3, 3e-3, 1e-2, 3e-2, 1e-1], POSITIVE)
    weight_decay: float = ranged(1e-4, NON_NEGATIVE)
    epochs: int = ranged(30, COUNT)
    batch_size: int = ranged(256, COUNT)
    # share of train used to pick the learning rate
    holdout: float = ranged(0.1, Range(0, 1, low_open=True, high_open=True))


@dataclass
class FinetuneSettings:
    epochs: int = ranged(3, COUNT)
    batch_size: int = ranged(64, COUNT)
    lr: float = ranged(1e-3, POSITIVE)
    min_lr: float = ranged(1e-5, NON_NEGATIVE)
    warmup_epochs: float = ranged(0.5, NON_NEGATIVE)
    weight_decay: float = ranged(0.05, NON_NEGATIVE)
    layer_decay: float = ranged(0.75, FRACTION)  # timm's layer-wise learning-rate decay
    label_smoothing: float = ranged(0.1, Range(0, 1, high_open=True))
    drop_path: float = ranged(0.1, Range(0, 1, high_open=True))
    scale_min: float = ranged(0.35, FRACTION)  # RandomResizedCrop of the training views


@dataclass
class DenseSettings:
    epochs: int = ranged(20, COUNT)
    batch_size: int = ranged(128, COUNT)
    lr: float = ranged(1e-3, POSITIVE)
    weight_decay: float = ranged(1e-4, NON_NEGATIVE)


@dataclass
class DetectSettings(DenseSettings):
    epochs: int = ranged(30, COUNT)
    # 0: a linear head per token (the default; a probe of what the tokens hold, as segment's);
    # > 0: a 3x3 convolution of this width first (it learns shapes from random tokens too)
    hidden_dim: int = ranged(0, Range(0, note="0: a linear head"))
    max_detections: int = ranged(10, COUNT)  # peaks kept per image


@dataclass
class ZeroshotSettings:
    templates: list[str] = field(
        default_factory=lambda: ["a {}", "a photo of a {}", "a small {}", "a large {}"]
    )
    # a file of templates, one a line with {} where the name goes, or imagenet1k: open_clip's
    # OpenAI ImageNet templates; null: `templates`
    templates_file: str | None = None
    # a file of class names, one a line in label order, or imagenet1k: open_clip's ImageNet-1k
    # names; null: the data's own class names
    classnames: str | None = None


@dataclass
class EvalSettings:
    num_train: int | None = ranged(None, Range(1, note="null: the whole train split"))
    num_val: int | None = ranged(None, Range(1, note="null: the whole val split"))
    # side of generated `shapes` images (None: the backbone's)
    image_size: int | None = ranged(None, Range(MIN_IMAGE_SIZE, note="null: the backbone's"))
    data_seed: int = ranged(0, NON_NEGATIVE)  # which `shapes` dataset
    batch_size: int = ranged(256, COUNT)  # feature extraction
    # timm's: resize the short side to side / crop_pct, crop
    crop_pct: float = ranged(EVAL_CROP_PCT, FRACTION)
    # DataLoader processes making the eval views (0: the main process)
    workers: int = ranged(0, NON_NEGATIVE)
    seed: int = ranged(0, NON_NEGATIVE)
    device: str = one_of("auto", DEVICES)
    knn: KnnSettings = field(default_factory=KnnSettings)
    linear: LinearSettings = field(default_factory=LinearSettings)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    segment: DenseSettings = field(default_factory=DenseSettings)
    detect: DetectSettings = field(default_factory=DetectSettings)
    zeroshot: ZeroshotSettings = field(default_factory=ZeroshotSettings)


def load_settings(overrides: list[str] | tuple[str, ...] = ()) -> EvalSettings:
    """Defaults < `key=value` overrides, checked."""
    settings = apply_overrides(EvalSettings(), overrides)
    problem = value_problem(settings)
    if problem:
        raise ConfigError(problem)
    checks = [
        (bool(settings.linear.lrs), "linear.lrs must list at least one learning rate"),
        (bool(settings.zeroshot.templates), "zeroshot.templates must list at least one"),
        (
            all("{}" in t for t in settings.zeroshot.templates),
            "every zeroshot template needs a {} where the class name goes",
        ),
        (
            settings.finetune.min_lr <= settings.finetune.lr,
            f"finetune.min_lr ({settings.finetune.min_lr}) must be <= finetune.lr "
            f"({settings.finetune.lr})",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    return settings
