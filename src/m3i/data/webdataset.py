"""WebDataset tar shards: write any source as shards, stream them back as augmented views.

A shard sample holds ``KEY.png`` (or ``KEY.jpg``), optional ``KEY.txt`` (caption) and
``KEY.cls`` (label as text); ``classes.txt`` beside the shards lists the class names. The stream
resamples shards with replacement from a seeded RNG, so it is infinite and a function of
(seed, rank, DataLoader worker, start step) only: a resumed run calls ``set_start(step)``.

A sample whose image cannot be read is skipped, named once in the log by each reader (a rank's
DataLoader worker) and counted (the next item's ``skipped``); a reader stops with one line only
when more than ``max_corrupt_fraction`` of the last ``CORRUPT_WINDOW`` samples it read were
unreadable.
"""

from __future__ import annotations

import io
import logging
import random
from collections import deque
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from m3i.data.base import DataError, ImageSource, SourceScan
from m3i.data.images import IMAGE_ERRORS, rgb_tensor
from m3i.data.sources import MAX_CORRUPT_FRACTION
from m3i.data.views import ViewConfig, view_item
from m3i.io import atomic_write, atomic_write_text

log = logging.getLogger("m3i.data")

VALID_SPEC = "wds:/path/shard-{000000..000099}.tar"
SHUFFLE_BUFFER = 1000  # samples (undecoded bytes) held by the shuffle buffer of each worker
IMAGE_KEYS = ("png", "jpg", "jpeg")
JPEG_QUALITY = 90  # of the jpg images write_shards writes
CORRUPT_WINDOW = 1000  # the last samples read, of which at most max_corrupt_fraction may be bad


def encode_image(image: torch.Tensor, image_format: str = "png") -> bytes:
    """A uint8 (3, H, W) RGB tensor as PNG (lossless) or JPEG (quality 90) file bytes."""
    buffer = io.BytesIO()
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    if image_format == "jpg":
        pil.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        pil.save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(
    source: ImageSource, pattern: str, samples_per_shard: int, image_format: str = "png"
) -> list[Path]:
    """Write ``source`` as shards named ``pattern % shard`` (e.g. ``DIR/shard-%06d.tar``), each
    written atomically, plus ``DIR/classes.txt`` when the source has classes; returns the shards.
    Images are stored as ``KEY.png`` or, with ``image_format="jpg"``, as ``KEY.jpg``.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard}; use 1 or more")
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format={image_format!r}; use 'png' or 'jpg'")
    paths = []
    for first in range(0, len(source), samples_per_shard):
        path = Path(pattern % (first // samples_per_shard))
        indices = range(first, min(first + samples_per_shard, len(source)))

        def write(tmp: str, indices: range = indices, path: Path = path) -> None:
            with wds.TarWriter(tmp, compress=path.name.endswith("gz")) as writer:
                for index in indices:
                    sample = source[index]
                    image = encode_image(sample.image, image_format)
                    record = {"__key__": f"{index:09d}", image_format: image}
                    if sample.caption:
                        record["txt"] = sample.caption
                    if sample.label >= 0:
                        record["cls"] = str(sample.label)
                    writer.write(record)

        atomic_write(path, write)
        paths.append(path)
    if source.classes:
        atomic_write_text(Path(pattern).parent / "classes.txt", "\n".join(source.classes) + "\n")
    return paths


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(parts).generate_state(1, np.uint64)[0])


def _decode(sample: dict) -> torch.Tensor:
    """The sample's png/jpg as a uint8 (3, H, W) RGB tensor."""
    url = sample["__url__"]
    data = next((sample[key] for key in IMAGE_KEYS if key in sample), None)
    if data is None:
        raise DataError(
            f"{url}: sample {sample['__key__']} has no png or jpg (keys: "
            f"{', '.join(key for key in sample if not key.startswith('__'))}); every sample "
            "of a wds: shard needs KEY.png or KEY.jpg"
        )
    try:
        with Image.open(io.BytesIO(data)) as image:
            return rgb_tensor(image)
    except IMAGE_ERRORS as error:
        message = f"{url}: sample {sample['__key__']}: unreadable image ({error}); rewrite it"
        raise DataError(message) from error


class WebDatasetStream(torch.utils.data.IterableDataset):
    """Infinite stream of ViewDataset items from resampled shards (``wds:PATTERN``).

    Shard draws, shuffling and augmentation are functions of (seed, rank, worker, start):
    ranks and DataLoader workers draw different shards, and ``set_start`` (before the
    DataLoader iterator is created) gives a resumed run a fresh stream. Every ``iter()``
    restarts the same stream. ``index`` is a running counter, unique across ranks and workers.
    """

    def __init__(
        self,
        spec_arg: str,
        cfg: ViewConfig,
        size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank}, world_size={world_size}; need 0 <= rank < world_size")
        try:
            self.urls = wds.shardlists.expand_urls(spec_arg)
        except ValueError as error:  # unbalanced braces
            raise DataError(f"wds:{spec_arg}: {error}; a valid spec is {VALID_SPEC}") from error
        missing = [url for url in self.urls if not Path(url).is_file()]
        if missing:
            raise DataError(
                f"wds:{spec_arg}: no shard file {missing[0]!r} ({len(missing)} of "
                f"{len(self.urls)} expanded paths missing); a valid spec is {VALID_SPEC}"
            )
        classes_file = Path(self.urls[0]).parent / "classes.txt"
        self.classes: list[str] | None = None
        if classes_file.is_file():
            self.classes = [line for line in classes_file.read_text().splitlines() if line]
        self.name = f"wds:{spec_arg}"
        self.max_corrupt_fraction = MAX_CORRUPT_FRACTION
        self.cfg = cfg
        self.size = size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start = 0

    def set_start(self, step: int) -> None:
        """Reseed shard resampling, shuffling and views for a run that starts at ``step``."""
        self.start = step

    def scan(self, limit: int, seed: int = 0) -> SourceScan:
        """Labels and captions of about `limit` samples spread over the shards: the first
        ceil(limit / n) samples of each of n = min(shards, limit) shards drawn with `seed` (only
        the start of each tar is read, and a corpus written class by class, shard by shard,
        still shows every class); no image is decoded."""
        keep = (".cls", ".txt", *(f".{key}" for key in IMAGE_KEYS))
        urls = list(self.urls)
        random.Random(seed).shuffle(urls)
        urls = urls[:limit]
        quota = -(-limit // len(urls))
        labels, captions = [], []
        for url in urls:
            pipeline = wds.DataPipeline(
                wds.SimpleShardList([url]),
                wds.tarfile_to_samples(select_files=lambda name: name.endswith(keep)),
            )
            for sample in islice(pipeline, min(quota, limit - len(labels))):
                labels.append(int(sample["cls"]) if "cls" in sample else -1)
                caption = sample.get("txt", b"").decode("utf-8")
                if caption:
                    captions.append(caption)
        return SourceScan(labels, captions)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor | str]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        stream = (self.seed, self.rank, worker, self.start)
        pipeline = wds.DataPipeline(  # worker_seed: our seed already holds rank and worker
            wds.ResampledShards(
                self.urls, seed=_seed(*stream, 0), worker_seed=lambda: 0, deterministic=True
            ),
            wds.tarfile_to_samples(),
            wds.shuffle(SHUFFLE_BUFFER, seed=_seed(*stream, 1)),
        )
        window: deque[bool] = deque(maxlen=CORRUPT_WINDOW)  # the last samples read: unreadable?
        named: set[str] = set()
        skipped = 0
        for counter, sample in enumerate(pipeline):
            try:
                image = _decode(sample)
            except DataError as error:
                window.append(True)
                skipped += 1
                self._check_window(window, error)
                where = f"{sample['__url__']}:{sample['__key__']}"
                if where not in named:
                    named.add(where)
                    log.warning("skipped an unreadable sample: %s", error)
                continue
            window.append(False)
            generator = torch.Generator().manual_seed(_seed(*stream, 2, counter))
            label = int(sample["cls"]) if "cls" in sample else -1
            caption = sample.get("txt", b"").decode("utf-8")
            index = (counter * num_workers + worker) * self.world_size + self.rank
            item = view_item(image, label, caption, index, self.cfg, self.size, generator)
            item["skipped"] = torch.tensor(skipped, dtype=torch.int64)
            skipped = 0
            yield item

    def _check_window(self, window: deque[bool], error: DataError) -> None:
        """Stop when more than max_corrupt_fraction of the last CORRUPT_WINDOW samples read
        were unreadable (counted against the whole window, so one bad sample early is not
        more than 1%)."""
        bad = sum(window)
        if bad > self.max_corrupt_fraction * CORRUPT_WINDOW:
            raise DataError(
                f"{error} (the last of {bad} unreadable samples among the last {len(window)} "
                f"read, more than data.max_corrupt_fraction={self.max_corrupt_fraction:g} of "
                f"{CORRUPT_WINDOW}); rewrite the damaged shards or raise data.max_corrupt_fraction"
            )
