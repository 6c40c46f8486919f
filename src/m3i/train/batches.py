"""The data of a run: its mixture of training sources (scanned once) and this rank's batch
stream from any step on."""

from __future__ import annotations

from pathlib import Path

import torch

from m3i import runtime
from m3i.config import Config
from m3i.data.mixture import Mixture
from m3i.data.scan import (
    SCAN_FILE,
    ScanCache,
    Source,
    scan_key,
    shared_stream_scans,
    shared_verify,
)
from m3i.data.specs import is_stream, open_source, spec_list
from m3i.data.stream import BatchStream, mixture_batches, part_seed
from m3i.data.views import ViewDataset
from m3i.data.webdataset import WebDatasetStream


def training_stream(cfg: Config, mixture: Mixture, step: int, device: torch.device) -> BatchStream:
    """This rank's batches of a run from its step `step` on: global batch number
    train.first_batch + step onwards (`wds:` streams are reseeded there)."""
    first = cfg.train.first_batch + step
    parts: list[torch.utils.data.Dataset] = []
    for number, source in enumerate(mixture.sources):
        if isinstance(source, WebDatasetStream):
            source.set_start(first)
            parts.append(source)
        else:
            seed = part_seed(cfg.train.seed, number)
            parts.append(ViewDataset(source, cfg.views, cfg.model.img_size, seed=seed))
    return mixture_batches(
        parts,
        mixture.weights,
        cfg.train.batch_size,
        cfg.train.seed,
        cfg.data.workers,
        device,
        first,
        mixture.label_maps,
    )


def open_training_source(cfg: Config, spec: str) -> Source:
    """One source of the run's data: a `wds:` shard stream (this rank's), or the train split of
    an indexable source (data.num_train of it)."""
    if is_stream(spec):
        source: Source = WebDatasetStream(
            spec.partition(":")[2], cfg.views, cfg.model.img_size, cfg.train.seed,
            runtime.rank(), runtime.world_size(),
        )  # fmt: skip
    else:
        source = open_source(
            spec,
            "train",
            num_samples=cfg.data.num_train,
            image_size=cfg.data.image_size,
            seed=cfg.data.seed,
        )
    source.max_corrupt_fraction = cfg.data.max_corrupt_fraction
    return source


def scan_cache(cfg: Config, sources: list[Source], run_dir: Path | None) -> ScanCache:
    """The run folder's cache of the start-up scans (none without a run folder)."""
    data = cfg.data
    settings = {
        "specs": spec_list(data.spec),
        "num_train": data.num_train,
        "image_size": data.image_size,
        "seed": data.seed,
        "limit": data.scan_samples,
    }
    return ScanCache(None if run_dir is None else run_dir / SCAN_FILE, scan_key(sources, settings))


def training_source(cfg: Config, run_dir: Path | None = None) -> Mixture:
    """The run's training data: the mixture of its specs, with its streams' start-up scans
    made once (by rank 0, cached in `run_dir` when given, m3i.data.scan). Its image files are
    checked by `verify_files`."""
    sources = [open_training_source(cfg, spec) for spec in spec_list(cfg.data.spec)]
    cache = scan_cache(cfg, sources, run_dir)
    scans = shared_stream_scans(sources, cache, cfg.data.scan_samples, cfg.data.seed)
    return Mixture(sources, cfg.data.weights, scans)


def verify_files(
    cfg: Config, mixture: Mixture, run_dir: Path | None = None, progress: bool = False
) -> None:
    """With data.verify, check every image of the mixture's file sources once (the ranks in
    shares, or the run folder's cache) so that reading passes over the unreadable ones."""
    if cfg.data.verify:
        shared_verify(mixture.sources, scan_cache(cfg, mixture.sources, run_dir), progress)
