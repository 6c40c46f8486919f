"""Frozen features for evaluation: load a backbone, open a split, extract pooled/dense tokens."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from m3i.data.base import DataError, ImageSource
from m3i.data.specs import open_source
from m3i.data.views import EVAL_CROP_PCT, eval_data_config, eval_transform
from m3i.errors import first_line
from m3i.models.backbone import frozen_features, input_size, load_timm_model
from m3i.runtime import intra_op_threads

log = logging.getLogger("m3i.eval")


class EvalError(ValueError):
    """An evaluation cannot run; the message is one line saying what would work."""


def backbone_path(checkpoint: str | Path) -> Path:
    """The backbone.safetensors of a run directory, or the file itself."""
    path = Path(checkpoint)
    if path.is_dir():
        path = path / "backbone.safetensors"
    if not path.is_file():
        raise EvalError(
            f"checkpoint {str(checkpoint)!r} does not exist; give a run directory of "
            "`m3i pretrain` or its backbone.safetensors"
        )
    return path


def load_backbone(checkpoint: str | Path, **overrides) -> nn.Module:
    """The timm model stored in an m3i backbone.safetensors (safetensors only: nothing unpickled).

    ``overrides`` change timm arguments (e.g. num_classes, drop_path_rate) before loading; a
    new classifier head stays freshly initialised.
    """
    path = backbone_path(checkpoint)
    try:
        return load_timm_model(path, **overrides)
    except (SafetensorError, OSError) as err:
        reason = first_line(err)
        raise EvalError(
            f"{path} is not an m3i backbone ({reason}); give a backbone.safetensors written by "
            "`m3i pretrain`"
        ) from None
    except ValueError as err:
        raise EvalError(str(err)) from None


def open_split(
    spec: str, split: str, num_samples: int | None, image_size: int, seed: int
) -> ImageSource:
    """Open one split of a data spec for evaluation: `num_samples` of it (None: all), or all
    of it, with a warning, when it holds fewer; a clear error when the split is missing."""
    try:
        whole = open_source(spec, split, image_size=image_size, seed=seed)
        if num_samples is None or num_samples >= len(whole):
            if num_samples is not None and num_samples > len(whole):
                log.warning(
                    "data %r: %d %s images asked for, the split holds %d: using %d",
                    spec, num_samples, split, len(whole), len(whole),
                )  # fmt: skip
            return whole
        return open_source(spec, split, num_samples=num_samples, image_size=image_size, seed=seed)
    except DataError as err:
        if split == "val":
            raise EvalError(
                f"data {spec!r} has no usable val split ({err}); evaluation needs one: "
                "shapes, fashion-mnist, folder:PATH with train/ and val/, or "
                "captions:TRAIN.jsonl,VAL.jsonl"
            ) from None
        raise


@dataclass
class Features:
    """Frozen features of one split: GAP (N, D), patch tokens (N, P, D) or None, labels (N,)."""

    pooled: torch.Tensor
    dense: torch.Tensor | None
    labels: torch.Tensor


class EvalImages(torch.utils.data.Dataset):
    """A source's (eval view, label) pairs: :func:`m3i.data.views.eval_transform` of each image,
    made single-threaded (as DataLoader workers are) when made in the main process."""

    def __init__(self, source: ImageSource, data_config: dict[str, Any]) -> None:
        self.source, self.data_config = source, data_config

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with intra_op_threads(1):
            sample = self.source[index]
            return eval_transform(sample.image, self.data_config), sample.label


def image_batches(
    source: ImageSource, data_config: dict[str, Any], batch_size: int, workers: int = 0
) -> torch.utils.data.DataLoader:
    """(images (B, 3, size, size) normalised, labels (B,)) in index order, made by `workers`
    DataLoader processes (0: in this one); the same values for any number of workers."""
    return torch.utils.data.DataLoader(
        EvalImages(source, data_config), batch_size=batch_size, num_workers=workers
    )


@torch.no_grad()
def extract(
    model: nn.Module,
    source: ImageSource,
    batch_size: int = 256,
    dense: bool = False,
    device: torch.device | str = "cpu",
    crop_pct: float = EVAL_CROP_PCT,
    workers: int = 0,
) -> Features:
    """Run the frozen model over a split once, in batches, keeping everything in memory; each
    image is timm's eval view at the model's input size and `crop_pct` (eval_data_config)."""
    model.eval().to(device)
    data_config = eval_data_config(input_size(model), crop_pct)
    pooled, tokens, labels = [], [], []
    for images, batch_labels in image_batches(source, data_config, batch_size, workers):
        batch_pooled, batch_dense = frozen_features(model, images.to(device))
        pooled.append(batch_pooled.float().cpu())
        if dense:
            tokens.append(batch_dense.float().cpu())
        labels.append(batch_labels)
    return Features(
        pooled=torch.cat(pooled),
        dense=torch.cat(tokens) if dense else None,
        labels=torch.cat(labels),
    )
