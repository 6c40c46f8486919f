"""WebDataset tar shards: write any source as shards, stream them back as augmented views.

A shard sample holds ``KEY.png`` (or ``KEY.jpg``), optional ``KEY.txt`` (caption) and
``KEY.cls`` (label as text); ``classes.txt`` beside the shards lists the class names. The stream
resamples shards with replacement from a seeded RNG, so it is infinite and a function of
(seed, rank, DataLoader worker, start step) only: a resumed run calls ``set_start(step)``.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from m3i.data.base import DataError, ImageSource
from m3i.data.images import IMAGE_ERRORS, rgb_tensor
from m3i.data.views import ViewConfig, view_item
from m3i.io import atomic_write, atomic_write_text

VALID_SPEC = "wds:/path/shard-{000000..000099}.tar"
SHUFFLE_BUFFER = 1000  # samples (undecoded bytes) held by the shuffle buffer of each worker
IMAGE_KEYS = ("png", "jpg", "jpeg")
JPEG_QUALITY = 90  # of the jpg images write_shards writes


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
        self.cfg = cfg
        self.size = size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start = 0

    def set_start(self, step: int) -> None:
        """Reseed shard resampling, shuffling and views for a run that starts at ``step``."""
        self.start = step

    def captions(self, limit: int | None = None) -> list[str]:
        """Non-empty captions of the first shards in order (at most ``limit``); no image is read."""
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(self.urls),
            wds.tarfile_to_samples(select_files=lambda name: name.endswith(".txt")),
        )
        found = (sample["txt"].decode("utf-8") for sample in pipeline)
        return list(islice((caption for caption in found if caption), limit))

    def labels(self) -> list[int]:
        """Every sample's label (-1: none), shard by shard in order; no image is decoded.

        Shards are resampled uniformly, so these are the stream's class frequencies."""
        keep = (".cls", *(f".{key}" for key in IMAGE_KEYS))
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(self.urls),
            wds.tarfile_to_samples(select_files=lambda name: name.endswith(keep)),
        )
        return [int(sample["cls"]) if "cls" in sample else -1 for sample in pipeline]

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
        for counter, sample in enumerate(pipeline):
            generator = torch.Generator().manual_seed(_seed(*stream, 2, counter))
            label = int(sample["cls"]) if "cls" in sample else -1
            caption = sample.get("txt", b"").decode("utf-8")
            index = (counter * num_workers + worker) * self.world_size + self.rank
            yield view_item(_decode(sample), label, caption, index, self.cfg, self.size, generator)
