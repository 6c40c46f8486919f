"""The start-up scans of a run's sources, each done once per run and cached in the run folder
(`data_scan.json`), so that a resume reuses them:

- `wds:` streams (:func:`shared_stream_scans`): the labels and captions of a bounded sample of
  about `limit` samples spread over the shards (the label prior and the tokenizer's captions);
  no image is decoded. Rank 0 reads it and gives it to the other ranks.
- image files, `folder:`, `images:` and `captions:` (:func:`shared_verify`): every image's header
  and data, so that reading passes over the unreadable ones. Each rank checks its share of the
  files and the ranks share what they found, so no rank waits for another's whole pass.
Indexable sources give their labels and captions without reading an image, on every rank. The
cache is keyed by the specs, the settings the scans depend on and each source's size and file
list (a digest), and is used only when all of them match.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from m3i import runtime
from m3i.data.base import DataError, ImageSource, SourceScan
from m3i.data.sources import ImageFiles
from m3i.data.webdataset import WebDatasetStream
from m3i.errors import first_line
from m3i.io import atomic_write_text

log = logging.getLogger("m3i.data")
SCAN_FILE = "data_scan.json"

Source = ImageSource | WebDatasetStream


def fingerprint(source: Source) -> list[Any]:
    """What identifies a source's files: its size and a digest of its file or shard names."""
    if isinstance(source, WebDatasetStream):
        names = source.urls
    elif isinstance(source, ImageFiles):
        names = [str(path) for path in source.files]
    else:
        return [source.name, len(source)]
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    return [source.name, len(names), digest]


def scan_key(sources: Sequence[Source], settings: dict[str, Any]) -> dict[str, Any]:
    """The cache key: the sources' fingerprints and the settings the scans depend on."""
    return {"sources": [fingerprint(source) for source in sources], **settings}


class ScanCache:
    """`data_scan.json` of a run folder: sections ("streams", "corrupt") valid for one key."""

    def __init__(self, path: Path | None, key: dict[str, Any]) -> None:
        self.path, self.key = path, key

    def read(self, section: str) -> Any:
        if self.path is None or not self.path.is_file():
            return None
        try:
            saved = json.loads(self.path.read_text())
        except ValueError:
            log.warning("%s: not JSON; scanning the data again", self.path)
            return None
        return saved.get(section) if saved.get("key") == self.key else None

    def write(self, section: str, value: Any) -> None:
        if self.path is None:
            return
        saved = {"key": self.key}
        if self.path.is_file():
            try:
                old = json.loads(self.path.read_text())
            except ValueError:
                old = {}
            if old.get("key") == self.key:
                saved = old
        atomic_write_text(self.path, json.dumps({**saved, section: value}) + "\n")


def _on_rank0(work: Any) -> Any:
    """`work()` on rank 0 (its value, or the one-line message of any exception it raised) given
    to every rank; every rank raises a DataError with that message."""
    result = None
    if runtime.rank() == 0:
        try:
            result = work()
        except Exception as err:  # every rank must hear of it, not wait for it
            result = _Failed(first_line(err))
    result = runtime.from_rank0(result)
    if isinstance(result, _Failed):
        raise DataError(result.message)
    return result


class _Failed:
    def __init__(self, message: str) -> None:
        self.message = message


def shared_stream_scans(
    sources: Sequence[Source], cache: ScanCache, limit: int, seed: int
) -> list[SourceScan]:
    """Each source's scan (empty for an indexable one), made by rank 0 or read from `cache`."""

    def scan() -> list[dict]:
        cached = cache.read("streams")
        if cached is not None:
            return cached
        scans = [
            asdict(source.scan(limit, seed))
            if isinstance(source, WebDatasetStream)
            else asdict(SourceScan())
            for source in sources
        ]
        if any(isinstance(source, WebDatasetStream) for source in sources):
            cache.write("streams", scans)
        return scans

    return [SourceScan(**scan) for scan in _on_rank0(scan)]


def shared_verify(sources: Sequence[Source], cache: ScanCache, progress: bool = False) -> None:
    """Check every image of the file sources once (each rank its share, or the cached result)
    and mark the unreadable ones on every rank (DataError past max_corrupt_fraction)."""
    files = [s for s in sources if isinstance(s, ImageFiles)]
    if not files:
        return
    found = _on_rank0(lambda: cache.read("corrupt"))
    if found is None:
        found = _verify_in_shares(files, progress)
        if runtime.rank() == 0:
            cache.write("corrupt", found)
    for source, unreadable in zip(files, found, strict=True):
        source.set_corrupt(unreadable, quiet=runtime.rank() != 0)


def _verify_in_shares(files: list[ImageFiles], progress: bool) -> list[list]:
    """Rank r checks images r, r + R, ... of each source; every rank gets all [index, error]
    found, in index order."""
    rank, world = runtime.rank(), runtime.world_size()
    try:
        mine: Any = [
            source.unreadable(range(rank, len(source), world), progress and rank == 0)
            for source in files
        ]
    except Exception as err:  # the other ranks wait for this rank's share
        mine = _Failed(f"rank {rank}: {err}")
    shares = [mine]
    if runtime.is_distributed():
        shares = [None] * world
        torch.distributed.all_gather_object(shares, mine)
    failed = next((share for share in shares if isinstance(share, _Failed)), None)
    if failed is not None:
        raise DataError(failed.message)
    return [sorted(pair for share in shares for pair in share[k]) for k in range(len(files))]
