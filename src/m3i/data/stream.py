"""Batch streams: this rank's batches of a mixture of sources from any global batch on, with
DataLoader workers' errors re-raised in one line.

One global batch of G = batch_size x world samples is drawn at a time. Which source each of its
G slots reads is drawn with the mixture's weights from a generator seeded by (seed, batch
number) (:class:`SourceDraws`), so the draw is a function of the seed and the batch alone; rank r
reads slots r*B..(r+1)*B-1. An indexable source is read in seeded permutations, epoch after
epoch (its c-th sample drawn is position c of that sequence), so a stream started at any batch
continues exactly what an uninterrupted run reads, without reading what it skips. A shard
stream part is read in order by each rank and DataLoader worker (m3i.data.webdataset).
A source alone reads whole global batches of each epoch (drop_last); in a mixture each source
reads its whole permutation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from itertools import count

import numpy as np
import torch

from m3i import runtime
from m3i.data.base import DataError
from m3i.data.batch import Batch, collate

ORDER_STRIDE = 1_000_003  # epoch e of a source is permutation seed * ORDER_STRIDE + e
PART_SEED_STRIDE = 7_919  # source k of a mixture draws with seed + k * PART_SEED_STRIDE
DRAW_TAG = 0x6D6978  # separates the source draws' generators from every other seeded one


class DataStreamError(ValueError):
    """The data cannot make a batch; the message is one line."""


@contextlib.contextmanager
def worker_errors() -> Iterator[None]:
    """Re-raise a DataError from a DataLoader worker with its own one-line message.

    torch re-raises a worker's exception in the main process as the same type with the worker's
    whole traceback as its message ("Caught DataError in DataLoader worker process 0. Original
    Traceback ..."); the original message follows the traceback's last `module.DataError: `.
    """
    try:
        yield
    except DataError as err:
        kind, text = type(err), str(err)
        last = f"{kind.__module__}.{kind.__qualname__}: "
        if not text.startswith(f"Caught {kind.__name__} in DataLoader worker") or last not in text:
            raise
        raise kind(text.rsplit(last, 1)[1].strip()) from None


def part_seed(seed: int, part: int) -> int:
    """The seed of source `part`'s reading order and views in a run seeded `seed` (source 0:
    the run's own, as a single-source run has always had)."""
    return seed + part * PART_SEED_STRIDE


class SourceDraws:
    """Which source each of the `size` slots of global batch b reads: drawn i.i.d. with
    `weights` from a generator seeded by (seed, b); all slots read source 0 when there is one."""

    def __init__(self, weights: Sequence[float], seed: int, size: int) -> None:
        self.p = np.asarray(weights, dtype=np.float64)
        self.p /= self.p.sum()
        self.seed, self.size = seed, size
        self._at, self._counts = 0, np.zeros(len(self.p), dtype=np.int64)

    def __call__(self, batch: int) -> np.ndarray:
        """(size,) int64 source index of each slot of global batch `batch`."""
        if len(self.p) == 1:
            return np.zeros(self.size, dtype=np.int64)
        rng = np.random.default_rng([self.seed, DRAW_TAG, batch])
        return rng.choice(len(self.p), size=self.size, p=self.p).astype(np.int64)

    def counts_before(self, batch: int) -> np.ndarray:
        """Samples drawn from each source by global batches 0..batch-1 (counted on from the
        last call when `batch` is not below it)."""
        if len(self.p) == 1:
            return np.array([batch * self.size], dtype=np.int64)
        if batch < self._at:
            self._at, self._counts = 0, np.zeros(len(self.p), dtype=np.int64)
        for number in range(self._at, batch):
            self._counts += np.bincount(self(number), minlength=len(self.p))
        self._at = batch
        return self._counts.copy()


class MixtureStream(torch.utils.data.IterableDataset):
    """This rank's view items of global batches `start`, `start` + 1, ...: batch_size items
    per batch, each tagged with its `source`; labels mapped into the mixture's classes.

    `parts` are indexable datasets of view items (ViewDataset; `epoch` is set before each
    read) or streams of them (WebDatasetStream). DataLoader worker w of W makes batches
    start + w, start + w + W, ..., which the DataLoader returns in order. `label_maps[k]` maps
    source k's classes to the mixture's; None (the default for every source when not given):
    labels as they are, or, given maps, a source without classes whose labels are dropped.
    """

    def __init__(
        self,
        parts: Sequence[torch.utils.data.Dataset],
        weights: Sequence[float],
        seed: int,
        batch_size: int,
        start: int = 0,
        label_maps: Sequence[list[int] | None] | None = None,
    ) -> None:
        self.parts, self.seed, self.batch_size, self.start = list(parts), seed, batch_size, start
        self.world, self.rank = runtime.world_size(), runtime.rank()
        self.draws = SourceDraws(weights, seed, batch_size * self.world)
        self.label_maps = list(label_maps) if label_maps else None
        alone = len(self.parts) == 1
        self.lengths = [
            None if _is_stream(part) else _readable(len(part), self.draws.size, alone)
            for part in self.parts
        ]

    def _order(self, part: int, epoch: int) -> torch.Tensor:
        seed = part_seed(self.seed, part) * ORDER_STRIDE + epoch
        generator = torch.Generator().manual_seed(seed)
        return torch.randperm(len(self.parts[part]), generator=generator)[: self.lengths[part]]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor | str]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        streams = {k: iter(part) for k, part in enumerate(self.parts) if _is_stream(part)}
        orders: dict[tuple[int, int], torch.Tensor] = {}
        drawn = self.draws.counts_before(self.start)
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        for batch in count(self.start):
            draw = self.draws(batch)
            if (batch - self.start) % workers == worker:
                earlier = _earlier_draws(draw, len(self.parts))
                for slot in range(mine.start, mine.stop):
                    part = int(draw[slot])
                    if part in streams:
                        item = next(streams[part])
                    else:
                        reads = int(drawn[part] + earlier[slot])
                        epoch, position = divmod(reads, self.lengths[part])
                        if (part, epoch) not in orders:
                            orders = {k: v for k, v in orders.items() if k[0] != part}
                            orders[part, epoch] = self._order(part, epoch)
                        self.parts[part].epoch = epoch
                        item = self.parts[part][int(orders[part, epoch][position])]
                    yield self._tag(item, part)
            drawn += np.bincount(draw, minlength=len(self.parts))

    def _tag(self, item: dict, part: int) -> dict:
        item["source"] = torch.tensor(part, dtype=torch.int64)
        if self.label_maps is None:
            return item
        mapping = self.label_maps[part]
        if "label" in item and item["label"] >= 0:  # a source without classes: unlabelled
            label = -1 if mapping is None else mapping[int(item["label"])]
            item["label"] = torch.tensor(label, dtype=torch.int64)
        return item


def _earlier_draws(draw: np.ndarray, parts: int) -> np.ndarray:
    """For each slot, how many earlier slots of the batch drew the same source."""
    earlier = np.zeros(len(draw), dtype=np.int64)
    for part in range(parts):
        slots = draw == part
        earlier[slots] = np.arange(np.count_nonzero(slots))
    return earlier


def _is_stream(part: torch.utils.data.Dataset) -> bool:
    return isinstance(part, torch.utils.data.IterableDataset)


def _readable(length: int, global_batch: int, alone: bool) -> int:
    """How much of each epoch's permutation a source reads: all of it in a mixture; alone,
    the whole global batches it holds (as a single-source run has always read)."""
    return length - length % global_batch if alone else length


class BatchStream:
    """An endless iterator of this rank's batches of a mixture; `draws` says which source each
    slot of every global batch read (the counts `data/samples/K` are made from it)."""

    def __init__(self, stream: MixtureStream, workers: int, device: torch.device) -> None:
        self.draws, self.batch_size = stream.draws, stream.batch_size
        loader = torch.utils.data.DataLoader(
            stream,
            batch_size=stream.batch_size,
            num_workers=workers,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(stream.seed),  # not the global RNG (masks')
        )
        self._batches = _drain(loader, workers, device)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Batch:
        return next(self._batches)

    def close(self) -> None:
        """Stop the DataLoader's workers now (as a generator's close)."""
        self._batches.close()


def mixture_batches(
    parts: Sequence[torch.utils.data.Dataset],
    weights: Sequence[float],
    batch_size: int,
    seed: int,
    workers: int,
    device: torch.device,
    start: int = 0,
    label_maps: Sequence[list[int] | None] | None = None,
) -> BatchStream:
    """An endless stream of this rank's batches of a mixture, from global batch `start` on.
    An indexable source alone gives batches of at most len / world samples, and at least one
    whole global batch (else DataStreamError)."""
    if len(parts) == 1 and not _is_stream(parts[0]):
        world = runtime.world_size()
        batch_size = min(batch_size, len(parts[0]) // world)
        if batch_size == 0 or len(parts[0]) // (batch_size * world) == 0:
            raise DataStreamError(
                f"{len(parts[0])} training samples make no batch of {batch_size} on {world} "
                "ranks; lower train.batch_size or use more data"
            )
    stream = MixtureStream(parts, weights, seed, batch_size, start, label_maps)
    return BatchStream(stream, workers, device)


def batches(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    seed: int,
    workers: int,
    device: torch.device,
    start: int = 0,
) -> BatchStream:
    """An endless stream of this rank's batches of one indexable dataset, from batch number
    `start` on: global batch b is slice b % per_epoch of epoch b // per_epoch's seeded
    permutation, and rank r takes part r of it."""
    return mixture_batches([dataset], [1.0], batch_size, seed, workers, device, start)


def stream_batches(
    stream: torch.utils.data.IterableDataset, batch_size: int, workers: int, device: torch.device
) -> BatchStream:
    """Batches of an endless (resampled) shard stream."""
    return mixture_batches([stream], [1.0], batch_size, 0, workers, device)


def _drain(
    loader: torch.utils.data.DataLoader, workers: int, device: torch.device
) -> Iterator[Batch]:
    """The loader's batches on `device`; views made in the main process (no workers) are made
    on one thread, so that they do not compete with the step's threads."""
    threads = 1 if workers == 0 else None
    iterator = iter(loader)
    while True:
        with runtime.intra_op_threads(threads), worker_errors():
            batch = next(iterator, None)
        if batch is None:
            return
        yield batch.to(device)
