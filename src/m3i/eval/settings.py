"""Evaluation settings: one dataclass per task, changed with `m3i eval ... --set key=value`."""

from __future__ import annotations

from dataclasses import dataclass, field

from m3i.config import ConfigError, apply_overrides
from m3i.data.shapes import MIN_IMAGE_SIZE
from m3i.data.views import EVAL_CROP_PCT
from m3i.ranges import COUNT, FRACTION, NON_NEGATIVE, POSITIVE, Range, out_of_range


@dataclass
class KnnSettings:
    k: int = 20  # DINO's weighted kNN
    temperature: float = 0.07


@dataclass
class LinearSettings:
    lrs: list[float] = field(default_factory=lambda: [1e-3, 3e-3, 1e-2, 3e-2, 1e-1])
    weight_decay: float = 1e-4
    epochs: int = 30
    batch_size: int = 256
    holdout: float = 0.1  # share of train used to pick the learning rate


@dataclass
class FinetuneSettings:
    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 0.5
    weight_decay: float = 0.05
    layer_decay: float = 0.75  # timm's layer-wise learning-rate decay
    label_smoothing: float = 0.1
    drop_path: float = 0.1
    scale_min: float = 0.35  # RandomResizedCrop of the training views


@dataclass
class DenseSettings:
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4


@dataclass
class DetectSettings(DenseSettings):
    epochs: int = 30
    # 0: a linear head per token (the default; a probe of what the tokens hold, as segment's);
    # > 0: a 3x3 convolution of this width first (it learns shapes from random tokens too)
    hidden_dim: int = 0
    max_detections: int = 10  # peaks kept per image


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
    num_train: int | None = None  # None: the whole train split
    num_val: int | None = None  # None: the whole val split
    image_size: int | None = None  # side of generated `shapes` images (None: the backbone's)
    data_seed: int = 0  # which `shapes` dataset
    batch_size: int = 256  # feature extraction
    crop_pct: float = EVAL_CROP_PCT  # timm's: resize the short side to side / crop_pct, crop
    workers: int = 0  # DataLoader processes making the eval views (0: the main process)
    seed: int = 0
    device: str = "auto"
    knn: KnnSettings = field(default_factory=KnnSettings)
    linear: LinearSettings = field(default_factory=LinearSettings)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    segment: DenseSettings = field(default_factory=DenseSettings)
    detect: DetectSettings = field(default_factory=DetectSettings)
    zeroshot: ZeroshotSettings = field(default_factory=ZeroshotSettings)


EVAL_RANGES: dict[str, Range] = {
    "num_train": Range(1, note="null: the whole train split"),
    "num_val": Range(1, note="null: the whole val split"),
    "image_size": Range(MIN_IMAGE_SIZE, note="null: the backbone's"),
    "data_seed": NON_NEGATIVE,
    "seed": NON_NEGATIVE,
    "crop_pct": FRACTION,
    "workers": NON_NEGATIVE,
    "*batch_size": COUNT,
    "*epochs": COUNT,
    "*lr": POSITIVE,
    "*lrs": POSITIVE,
    "*weight_decay": NON_NEGATIVE,
    "knn.k": COUNT,
    "knn.temperature": POSITIVE,
    "linear.holdout": Range(0, 1, low_open=True, high_open=True),
    "finetune.min_lr": NON_NEGATIVE,
    "finetune.warmup_epochs": NON_NEGATIVE,
    "finetune.layer_decay": FRACTION,
    "finetune.label_smoothing": Range(0, 1, high_open=True),
    "finetune.drop_path": Range(0, 1, high_open=True),
    "finetune.scale_min": FRACTION,
    "detect.hidden_dim": Range(0, note="0: a linear head"),
    "detect.max_detections": COUNT,
}


def load_settings(overrides: list[str] | tuple[str, ...] = ()) -> EvalSettings:
    """Defaults < `key=value` overrides, checked."""
    settings = apply_overrides(EvalSettings(), overrides)
    problem = out_of_range(settings, EVAL_RANGES)
    if problem:
        raise ConfigError(problem)
    checks = [
        (bool(settings.linear.lrs), "linear.lrs must list at least one learning rate"),
        (settings.device in ("auto", "cpu", "cuda"), "device must be auto, cpu or cuda"),
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
