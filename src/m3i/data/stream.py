"""Batch streams: this rank's batches of a ViewDataset from any global batch on, or of an endless
shard stream, with DataLoader workers' errors re-raised in one line."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from m3i import runtime
from m3i.data.base import DataError
from m3i.data.batch import Batch, collate
from m3i.data.views import ViewDataset
from m3i.data.webdataset import WebDatasetStream


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


def batches(
    dataset: ViewDataset,
    batch_size: int,
    seed: int,
    workers: int,
    device: torch.device,
    start: int = 0,
) -> Iterator[Batch]:
    """An endless stream of this rank's batches, from batch number `start` on.

    Global batch b is slice b % per_epoch of epoch b // per_epoch's seeded permutation, and
    rank r takes part r of it: the stream is a function of (seed, b), so a resumed run continues
    exactly where the checkpoint was taken without reading the batches it skips.
    """
    world, rank = runtime.world_size(), runtime.rank()
    batch_size = min(batch_size, len(dataset) // world)
    per_epoch = len(dataset) // (batch_size * world)
    if per_epoch == 0:
        raise DataStreamError(
            f"{len(dataset)} training samples make no batch of {batch_size} on {world} ranks; "
            "lower train.batch_size or use more data"
        )
    epoch, skip = divmod(start, per_epoch)
    while True:
        dataset.epoch = epoch
        order = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        permutation = torch.randperm(len(dataset), generator=order)[
            : per_epoch * batch_size * world
        ]
        mine = permutation.view(per_epoch, world, batch_size)[skip:, rank].reshape(-1)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=mine.tolist(),
            num_workers=workers,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(seed + epoch),  # not the global RNG
        )
        yield from _drain(loader, workers, device)
        epoch, skip = epoch + 1, 0


def stream_batches(
    stream: WebDatasetStream, batch_size: int, workers: int, device: torch.device
) -> Iterator[Batch]:
    """Batches of an endless (resampled) shard stream; one DataLoader iterator for the run
    (views made in the main process are made single-threaded, as in `batches`)."""
    loader = torch.utils.data.DataLoader(
        stream, batch_size=batch_size, num_workers=workers, collate_fn=collate
    )
    yield from _drain(loader, workers, device)


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
