"""Data specs: one string names a source (`shapes`, `fashion-mnist[:DIR]`, `folder:PATH`,
`images:PATH`, `captions:TRAIN.jsonl[,VAL.jsonl]`, `wds:PATTERN`); :func:`open_source` opens
one split of an indexable one. A run's `data.spec` is one spec or a list of them (a mixture,
m3i.data.mixture)."""

from __future__ import annotations

from m3i.data.base import DataError, ImageSource
from m3i.data.shapes import ShapesDataset
from m3i.data.sources import (
    FASHION_MNIST_DIR,
    FashionMNIST,
    open_captions,
    open_folder,
    open_images,
)

SPECS = (
    "shapes, fashion-mnist[:DIR], folder:PATH, images:PATH, captions:TRAIN.jsonl[,VAL.jsonl], "
    "wds:PATTERN"
)
_SPLITS = ("train", "val")


def open_source(
    spec: str,
    split: str = "train",
    *,
    num_samples: int | None = None,
    image_size: int = 32,
    seed: int = 0,
) -> ImageSource:
    """Open a source from its spec; ``image_size`` and ``seed`` shape the procedural set.

    num_samples takes the first n samples in file order, except for ``folder:`` and
    ``images:`` (whose order is grouped by folder) where it takes a random subset drawn with
    ``seed``.
    """
    if split not in _SPLITS:
        raise DataError(f"{spec}: unknown split {split!r}; use 'train' or 'val'")
    kind, _, arg = spec.partition(":")
    if kind == "shapes" and not arg:
        return ShapesDataset(split, num_samples, image_size, seed)
    if kind == "fashion-mnist":
        return FashionMNIST(arg or FASHION_MNIST_DIR, split, num_samples, spec)
    if kind == "folder" and arg:
        return open_folder(arg, split, num_samples, seed, spec)
    if kind == "images" and arg:
        return open_images(arg, split, num_samples, seed, spec)
    if kind == "captions" and arg:
        return open_captions(arg, split, num_samples, spec)
    if kind == "wds":
        raise DataError(
            f"{spec}: WebDataset shards stream for training only; they have no indexable "
            "train/val splits: evaluate on shapes, fashion-mnist, folder: or captions:"
        )
    raise DataError(f"unknown data spec {spec!r}; valid specs: {SPECS}")


def spec_list(spec: str | list[str]) -> list[str]:
    """The specs of a run's `data.spec`: one spec, or the list of a mixture's."""
    return [spec] if isinstance(spec, str) else list(spec)


def is_stream(spec: str) -> bool:
    """Whether the spec is a shard stream (`wds:`), which has no indexable splits."""
    return spec.partition(":")[0] == "wds"


def eval_spec(spec: str | list[str]) -> str:
    """The spec a run evaluates on by default: a single spec itself; in a mixture, the first
    source that can have labelled splits (not `wds:`, not `images:`), else the first spec."""
    specs = spec_list(spec)
    indexable = [s for s in specs if not is_stream(s) and s.partition(":")[0] != "images"]
    return (indexable or specs)[0]
