"""The data of a run: its training source and this rank's batch stream from any step on."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from m3i import runtime
from m3i.config import Config
from m3i.data.base import ImageSource
from m3i.data.specs import open_source
from m3i.data.stream import batches, stream_batches
from m3i.data.views import ViewDataset
from m3i.data.webdataset import WebDatasetStream


def training_stream(
    cfg: Config, source: ImageSource | WebDatasetStream, step: int, device: torch.device
) -> Iterator[dict[str, Any]]:
    """This rank's batches of a run from its step `step` on: global batch number
    train.first_batch + step onwards (a `wds:` stream is reseeded there instead)."""
    first = cfg.train.first_batch + step
    if isinstance(source, WebDatasetStream):
        source.set_start(first)
        return stream_batches(source, cfg.train.batch_size, cfg.data.workers, device)
    dataset = ViewDataset(source, cfg.views, cfg.model.img_size, seed=cfg.train.seed)
    return batches(dataset, cfg.train.batch_size, cfg.train.seed, cfg.data.workers, device, first)


def training_source(cfg: Config) -> ImageSource | WebDatasetStream:
    """The run's training data: a `wds:` shard stream (this rank's), or an indexable source."""
    kind, _, arg = cfg.data.spec.partition(":")
    if kind == "wds":
        return WebDatasetStream(
            arg, cfg.views, cfg.model.img_size, cfg.train.seed, runtime.rank(),
            runtime.world_size(),
        )  # fmt: skip
    return open_source(
        cfg.data.spec,
        "train",
        num_samples=cfg.data.num_train,
        image_size=cfg.data.image_size,
        seed=cfg.data.seed,
    )
