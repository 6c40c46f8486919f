"""`m3i bench data`: images/s of the training input stream, per source and number of workers.

Each source is streamed the way `m3i pretrain` streams it (`m3i.train.batches`: reading and
decoding, two augmented views per image, collation, the copy to the device), with no model.
The sources `folder` and `wds` without a path are generated from `shapes` in a temporary
directory: JPEG files in class folders, and JPEG WebDataset shards.

Timing: the first batches are left out (worker start-up, then one batch per worker, which the
workers made together); then `repeats` timings of `batches` batches each (rounded up to a
multiple of the worker count, so that every timing spans whole rounds of the workers). Each
timing gives images/s; the report holds their median, min and max.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from m3i.config import Config, ConfigError, load_config
from m3i.data.base import ImageSource, Sample, ViewInfo
from m3i.data.batch import Batch
from m3i.data.shapes import ShapesDataset
from m3i.data.specs import SPECS, open_source
from m3i.data.stream import batches, stream_batches
from m3i.data.views import ViewDataset
from m3i.data.webdataset import WebDatasetStream, encode_image, write_shards
from m3i.train.input_rate import usable_cores

WORKERS = (0, 1, 2, 4, 8, 16)
GENERATED = ("folder", "wds")  # sources written from shapes when given without a path
KINDS = ("shapes", "fashion-mnist", "folder", "captions", "wds")
SAMPLES_PER_SHARD = 64


@dataclass
class DataBenchSettings:
    specs: tuple[str, ...] = ("shapes", "folder", "wds")
    img_size: int | None = None  # None: the preset's model.img_size
    batch: int = 64
    workers: tuple[int, ...] = WORKERS  # those above the usable cores are skipped
    batches: int = 10  # per timing, at least; rounded up to a multiple of the workers
    repeats: int = 3
    samples: int = 256  # images of the generated folder and shards
    preset: str = "m3i"  # its views.* settings (and model.img_size by default)
    overrides: tuple[str, ...] = ()


def check_settings(settings: DataBenchSettings) -> None:
    """Refuse bad settings with a one-line ConfigError before any work."""
    sizes = {"--batch": settings.batch, "--batches": settings.batches}
    sizes.update({"--repeats": settings.repeats, "--samples": settings.samples})
    if settings.img_size is not None:
        sizes["--img-size"] = settings.img_size
    for name, value in sizes.items():
        if value < 1:
            raise ConfigError(f"{name} {value}: must be >= 1")
    if not settings.workers or min(settings.workers) < 0:
        raise ConfigError(f"--workers {settings.workers}: give counts >= 0, e.g. 0,1,2,4")
    for spec in settings.specs:
        if spec.partition(":")[0] not in KINDS:
            raise ConfigError(f"--data {spec!r}: unknown source; use {SPECS} (or folder, wds)")


class Cycled(ImageSource):
    """`source` read round and round up to `length` items, so that a timed stream never ends
    an epoch (which would restart the workers)."""

    def __init__(self, source: ImageSource, length: int) -> None:
        self.source, self.length = source, length
        self.classes, self.name = source.classes, source.name

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Sample:
        return self.source[index % len(self.source)]

    def describe_view(self, index: int, sample: Sample, view: ViewInfo) -> str:
        return self.source.describe_view(index % len(self.source), sample, view)


def write_generated(root: Path, img_size: int, samples: int) -> dict[str, str]:
    """`samples` shapes images at `img_size` px as JPEG class folders (ROOT/folder/train/CLASS)
    and JPEG shards (ROOT/wds); their data specs by kind."""
    shapes = ShapesDataset("train", samples, img_size)
    for index in range(samples):
        sample = shapes[index]
        directory = root / "folder" / "train" / shapes.classes[sample.label]
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{index:06d}.jpg").write_bytes(encode_image(sample.image, "jpg"))
    folder = open_source(f"folder:{root / 'folder'}", "train")  # decoded JPEG, not re-rendered
    (root / "wds").mkdir()
    shards = write_shards(folder, str(root / "wds" / "shard-%06d.tar"), SAMPLES_PER_SHARD, "jpg")
    last = len(shards) - 1
    return {
        "folder": f"folder:{root / 'folder'}",
        "wds": f"wds:{root}/wds/shard-{{000000..{last:06d}}}.tar",
    }


def open_stream(
    spec: str, cfg: Config, workers: int, length: int, device: torch.device
) -> Iterator[Batch]:
    """The training loop's batch stream over `spec` with `workers` DataLoader workers, at
    least `length` images long."""
    if spec.startswith("wds:"):
        stream = WebDatasetStream(spec[4:], cfg.views, cfg.model.img_size, cfg.train.seed)
        return stream_batches(stream, cfg.train.batch_size, workers, device)
    source = open_source(spec, "train", image_size=cfg.data.image_size, seed=cfg.data.seed)
    dataset = ViewDataset(
        Cycled(source, length), cfg.views, cfg.model.img_size, seed=cfg.train.seed
    )
    return batches(dataset, cfg.train.batch_size, cfg.train.seed, workers, device)


def time_stream(
    stream: Iterator[Any],
    batch_size: int,
    warmup: int,
    batches_per_timing: int,
    repeats: int,
    device: torch.device,
) -> dict[str, float]:
    """Start-up seconds (the first batch), then `warmup` more batches untimed, then `repeats`
    timings of `batches_per_timing` batches: images/s median, min and max."""
    start = time.perf_counter()
    next(stream)
    startup = time.perf_counter() - start
    for _ in range(warmup):
        next(stream)
    rates = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for _ in range(batches_per_timing):
            next(stream)
        _sync(device)
        rates.append(batches_per_timing * batch_size / (time.perf_counter() - start))
    return {
        "img_per_s": statistics.median(rates),
        "img_per_s_min": min(rates),
        "img_per_s_max": max(rates),
        "startup_s": startup,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_config(settings: DataBenchSettings) -> Config:
    """The preset with the bench's image size (views and shapes images) and batch."""
    cfg = load_config(settings.preset, overrides=list(settings.overrides))
    size = settings.img_size or cfg.model.img_size
    cfg.model.img_size = cfg.data.image_size = size
    cfg.train.batch_size = settings.batch
    return cfg


def run_data_bench(
    settings: DataBenchSettings, device: torch.device, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Time every source with every usable worker count; the report as a dict."""
    check_settings(settings)
    cfg = bench_config(settings)
    cores = usable_cores()
    workers = sorted({w for w in settings.workers if w <= cores})
    skipped = sorted({w for w in settings.workers if w > cores})
    if not workers:
        raise ConfigError(f"--workers {settings.workers}: all above the {cores} usable cores")
    for spec in settings.specs:  # a bad path fails now, before any data is written
        if spec not in GENERATED:
            open_stream(spec, cfg, 0, settings.batch, device).close()
    rows = []
    with tempfile.TemporaryDirectory(prefix="m3i-bench-data-") as tmp:
        generated = {}
        if any(spec in GENERATED for spec in settings.specs):
            log(f"writing {settings.samples} shapes images at {cfg.data.image_size} px as JPEG")
            generated = write_generated(Path(tmp), cfg.data.image_size, settings.samples)
        for spec in settings.specs:
            for count in workers:
                rounds = max(count, 1)
                per_timing = rounds * math.ceil(settings.batches / rounds)
                length = (1 + count + settings.repeats * per_timing) * settings.batch
                stream = open_stream(generated.get(spec, spec), cfg, count, length, device)
                timed = time_stream(
                    stream, settings.batch, count, per_timing, settings.repeats, device
                )
                stream.close()  # ends the DataLoader iterator and its workers
                rows.append({"source": spec, "workers": count, **timed})
                log(f"{spec}, {count} workers: {timed['img_per_s']:.1f} img/s")
    return {
        "device": str(device),
        "cores": cores,
        "img_size": cfg.model.img_size,
        "settings": vars(settings),
        "skipped_workers": skipped,
        "generated": {"samples": settings.samples, "format": "jpg"} if generated else None,
        "results": rows,
    }


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"input stream at {report['img_size']} px on {report['device']} ({report['cores']} "
        f"usable cores), batch {report['settings']['batch']}",
        "source              workers   img/s median (min-max)   start-up s",
    ]
    for r in report["results"]:
        lines.append(
            f"{r['source'][:18]:<18} {r['workers']:>8}   {r['img_per_s']:8.1f} "
            f"({r['img_per_s_min']:.1f}-{r['img_per_s_max']:.1f})   {r['startup_s']:8.2f}"
        )
    if report["skipped_workers"]:
        skipped = ", ".join(map(str, report["skipped_workers"]))
        lines.append(f"skipped worker counts above the {report['cores']} usable cores: {skipped}")
    if report["generated"]:
        lines.append(
            f"folder and wds: {report['generated']['samples']} shapes images written as JPEG"
        )
    return "\n".join(lines)
