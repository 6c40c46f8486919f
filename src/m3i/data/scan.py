"""The start-up scans of a run's sources, done once: rank 0 scans, the other ranks get its
result, and the run folder caches it (`data_scan.json`), so that a resume reuses it.

What is scanned, per source:
- a `wds:` stream: the labels and captions of a bounded sample of `limit` samples, read from
  whole shards in a seeded random order (the label prior and the tokenizer's captions); no
  image is decoded;
- an indexable source of image files (`folder:`, `images:`, `captions:`) with `verify`: every
  image's header and data, once, so that reading passes over the unreadable ones.
Indexable sources give their labels and captions without reading an image, on every rank; a
run whose sources have nothing to scan (shapes, fashion-mnist) writes no `data_scan.json`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from m3i import runtime
from m3i.data.base import DataError, ImageSource
from m3i.data.sources import ImageFiles
from m3i.data.webdataset import WebDatasetStream
from m3i.io import atomic_write_text

log = logging.getLogger("m3i.data")
SCAN_FILE = "data_scan.json"

Source = ImageSource | WebDatasetStream


@dataclass
class SourceScan:
    """What the scan found of one source: a stream's sampled labels (-1: none) and non-empty
    captions; the indices of a file source's unreadable images."""

    labels: list[int] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    corrupt: list[int] = field(default_factory=list)


def needs_scan(source: Source, verify: bool) -> bool:
    """Whether a source has anything to scan (else its scan is empty and nothing is cached)."""
    return isinstance(source, WebDatasetStream) or (verify and isinstance(source, ImageFiles))


def scan_source(source: Source, limit: int, seed: int, verify: bool, progress: bool) -> SourceScan:
    """The scan of one source (module docstring); DataError from verifying too many bad files."""
    if isinstance(source, WebDatasetStream):
        sample = source.scan(limit, seed)
        return SourceScan(sample.labels, sample.captions)
    if verify and isinstance(source, ImageFiles):
        source.verify(progress=progress)
        return SourceScan(corrupt=source.corrupt())
    return SourceScan()


def _read_cache(path: Path, key: dict[str, Any]) -> list[SourceScan] | None:
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except ValueError:
        log.warning("%s: not JSON; scanning the data again", path)
        return None
    if saved.get("key") != key:
        return None
    return [SourceScan(**scan) for scan in saved["sources"]]


def _scan_on_rank0(
    sources: Sequence[Source],
    key: dict[str, Any],
    cache: Path | None,
    verify: bool,
    progress: bool,
) -> list[SourceScan] | str:
    """Rank 0's scans (the cached ones when `cache` holds them for `key`), or its DataError's
    message."""
    cached = _read_cache(cache, key) if cache is not None else None
    if cached is not None and len(cached) == len(sources):
        log.info("data scans read from %s", cache)
        return cached
    try:
        scans = [
            scan_source(source, key["limit"], key["seed"], verify, progress) for source in sources
        ]
    except DataError as err:
        return str(err)
    if cache is not None and any(needs_scan(source, verify) for source in sources):
        text = json.dumps({"key": key, "sources": [asdict(scan) for scan in scans]})
        atomic_write_text(cache, text + "\n")
    return scans


def shared_scans(
    sources: Sequence[Source],
    key: dict[str, Any],
    cache: Path | None = None,
    verify: bool = True,
    progress: bool = False,
) -> list[SourceScan]:
    """Every source's scan, made once by rank 0 (or read from `cache` when it holds them for
    the same `key`, which names the specs and every setting the scans depend on, `limit` and
    `seed` among them) and given to every rank; file sources get their unreadable images
    marked. A DataError on rank 0 is raised on every rank."""
    result = _scan_on_rank0(sources, key, cache, verify, progress) if runtime.rank() == 0 else None
    result = runtime.from_rank0(result)
    if isinstance(result, str):
        raise DataError(result)
    for source, scan in zip(sources, result, strict=True):
        if scan.corrupt and isinstance(source, ImageFiles):
            source.set_corrupt(scan.corrupt)
    return result
