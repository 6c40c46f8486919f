"""Evaluation settings: one dataclass per task, changed with `m3i eval ... --set key=value`."""

from __future__ import annotations

from dataclasses import dataclass, field

from m3i.config import ConfigError, apply_overrides


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
    hidden_dim: int = 128  # width of the light head's 3x3 convolution
    max_detections: int = 10  # peaks kept per image


@dataclass
class ZeroshotSettings:
    templates: list[str] = field(
        default_factory=lambda: ["a {}", "a photo of a {}", "a small {}", "a large {}"]
    )


@dataclass
class EvalSettings:
    num_train: int | None = None  # None: the whole train split
    num_val: int | None = None  # None: the whole val split
    image_size: int | None = None  # side of generated `shapes` images (None: the backbone's)
    data_seed: int = 0  # which `shapes` dataset
    batch_size: int = 256  # feature extraction
    seed: int = 0
    device: str = "auto"
    knn: KnnSettings = field(default_factory=KnnSettings)
    linear: LinearSettings = field(default_factory=LinearSettings)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    segment: DenseSettings = field(default_factory=DenseSettings)
    detect: DetectSettings = field(default_factory=DetectSettings)
    zeroshot: ZeroshotSettings = field(default_factory=ZeroshotSettings)


def load_settings(overrides: list[str] | tuple[str, ...] = ()) -> EvalSettings:
    """Defaults < `key=value` overrides, checked."""
    settings = apply_overrides(EvalSettings(), overrides)
    checks = [
        (settings.knn.k >= 1, "knn.k must be >= 1"),
        (settings.knn.temperature > 0, "knn.temperature must be > 0"),
        (bool(settings.linear.lrs), "linear.lrs must list at least one learning rate"),
        (0 < settings.linear.holdout < 1, "linear.holdout must be in (0, 1)"),
        (settings.batch_size >= 1, "batch_size must be >= 1"),
        (settings.device in ("auto", "cpu", "cuda"), "device must be auto, cpu or cuda"),
        (bool(settings.zeroshot.templates), "zeroshot.templates must list at least one"),
        (
            all("{}" in t for t in settings.zeroshot.templates),
            "every zeroshot template needs a {} where the class name goes",
        ),
    ]
    for task in ("linear", "finetune", "segment", "detect"):
        part = getattr(settings, task)
        checks.append((part.epochs >= 1, f"{task}.epochs must be >= 1"))
        checks.append((part.batch_size >= 1, f"{task}.batch_size must be >= 1"))
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    return settings
