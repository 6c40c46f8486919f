"""Image sources read from files: Fashion-MNIST's IDX files, image folders and caption files.

Every source yields :class:`Sample` (uint8 RGB image, label or -1, caption or "") and is opened
from a one-string spec with :func:`m3i.data.specs.open_source`. Bad input raises
:class:`DataError` with a one-line message that names the file or spec and says what would work.
"""

from __future__ import annotations

import gzip
import json
import logging
import random
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from m3i.data.base import DataError, ImageSource, Sample
from m3i.data.images import IMAGE_ERRORS, rgb_tensor

logger = logging.getLogger("m3i.data")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
]  # fmt: skip
_FASHION_NOUNS = [
    "t-shirt", "pair of trousers", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
]  # fmt: skip
_FASHION_TEMPLATES = [
    "a photo of {}", "a grayscale picture of {}", "a low resolution photo of {}",
    "a black and white image of {}", "a product photo of {}", "a small picture of {}",
]  # fmt: skip
MAX_CORRUPT_FRACTION = 0.01  # the default of data.max_corrupt_fraction


def _check_index(index: int, length: int) -> None:
    if not 0 <= index < length:
        raise IndexError(f"index {index} out of range for a source of {length} samples")


def _take(length: int, num_samples: int | None, what: str) -> int:
    """How many of ``length`` items to keep when ``num_samples`` are asked for."""
    if num_samples is None:
        return length
    if not 0 < num_samples <= length:
        raise DataError(f"{what}: num_samples={num_samples} but it holds {length}; use 1..{length}")
    return num_samples


class FashionMNIST(ImageSource):
    """Fashion-MNIST from IDX files (gzipped or not); grey images repeated to RGB, 28x28."""

    def __init__(self, root: str, split: str, num_samples: int | None, name: str) -> None:
        directory = Path(root)
        if not directory.is_dir():
            raise DataError(
                f"{directory}: no such folder; fashion-mnist:DIR needs DIR with the IDX files "
                "train-images-idx3-ubyte[.gz] etc. (Debian package dataset-fashion-mnist)"
            )
        prefix = "train" if split == "train" else "t10k"
        images = _read_idx(_find_idx(directory, f"{prefix}-images", "idx3"), 2051, 3)
        labels_file = _find_idx(directory, f"{prefix}-labels", "idx1")
        labels = _read_idx(labels_file, 2049, 1)
        if len(images) != len(labels) or len(labels) == 0:
            raise DataError(
                f"{labels_file}: {len(labels)} labels for {len(images)} images; "
                "both files must hold the same non-zero number of samples"
            )
        if labels.max() >= len(FASHION_MNIST_CLASSES):
            raise DataError(f"{labels_file}: label {labels.max()} out of range; expected 0..9")
        keep = _take(len(labels), num_samples, name)
        self._images = images[:keep]
        self._labels = labels[:keep]
        self.classes = list(FASHION_MNIST_CLASSES)
        self.name = name

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> Sample:
        _check_index(index, len(self))
        image = torch.from_numpy(self._images[index]).unsqueeze(0).repeat(3, 1, 1)
        return Sample(image, int(self._labels[index]), self._caption(index))

    def _caption(self, index: int) -> str:
        template = _FASHION_TEMPLATES[index % len(_FASHION_TEMPLATES)]
        noun = _FASHION_NOUNS[self._labels[index]]
        article = "an" if noun[0] in "aeiou" else "a"
        return template.format(f"{article} {noun}")

    def captions(self, limit: int | None = None) -> list[str]:
        count = len(self) if limit is None else min(limit, len(self))
        return [self._caption(index) for index in range(count)]

    def labels(self) -> list[int]:
        return self._labels.tolist()


def _find_idx(directory: Path, stem: str, kind: str) -> Path:
    """The IDX file ``{stem}-{kind}-ubyte`` (or ``{stem}.{kind}-ubyte``), gzipped or not."""
    matches = sorted(directory.glob(f"{stem}[-.]{kind}-ubyte*"))
    if not matches:
        raise DataError(
            f"{directory}: no {stem}-{kind}-ubyte[.gz] file; fashion-mnist:DIR needs the four "
            "IDX files train-images, train-labels, t10k-images, t10k-labels"
        )
    return matches[0]


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX array; ``magic`` is 0x0801 (1-d) or 0x0803 (3-d)."""
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as file:
            data = file.read()
    except (OSError, EOFError) as error:
        message = f"{path}: cannot read ({error}); expected an IDX file, gzipped or not"
        raise DataError(message) from error
    header = 4 + 4 * ndim
    if len(data) < header or int.from_bytes(data[:4], "big") != magic:
        raise DataError(f"{path}: not an unsigned-byte IDX file (magic {magic:#06x} expected)")
    shape = tuple(int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    if len(data) - header != int(np.prod(shape)):
        raise DataError(f"{path}: truncated or padded IDX data for shape {shape}; re-download it")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape).copy()


class ImageFiles(ImageSource):
    """Images read lazily from files; corrupt files are skipped, counted and bounded at
    `max_corrupt_fraction` (1%) of the source."""

    max_corrupt_fraction = MAX_CORRUPT_FRACTION

    def __init__(
        self,
        name: str,
        files: list[Path],
        labels: list[int],
        captions: list[str],
        classes: list[str] | None,
    ) -> None:
        self.name = name
        self.classes = classes
        self._files = files
        self._labels = labels
        self._captions = captions
        self._corrupt: set[int] = set()

    def __len__(self) -> int:
        return len(self._files)

    @property
    def files(self) -> list[Path]:
        """The image file of each sample, in index order."""
        return list(self._files)

    def __getitem__(self, index: int) -> Sample:
        """The sample at ``index``, or the next readable one (wrapping) if that file is corrupt;
        its `skipped` counts the unreadable files passed over."""
        _check_index(index, len(self))
        skipped = 0
        while True:
            if index not in self._corrupt:
                try:
                    image = _decode(self._files[index])
                except IMAGE_ERRORS as error:
                    self._mark_corrupt(index, error)
                else:
                    return Sample(
                        image, self._labels[index], self._captions[index], skipped=skipped
                    )
            index, skipped = (index + 1) % len(self), skipped + 1

    @property
    def num_corrupt(self) -> int:
        return len(self._corrupt)

    def captions(self, limit: int | None = None) -> list[str]:
        found = [caption for caption in self._captions if caption]
        return found if limit is None else found[:limit]

    def labels(self) -> list[int]:
        return list(self._labels)

    def corrupt_indices(self) -> list[int]:
        """The images marked unreadable so far, in index order."""
        return sorted(self._corrupt)

    def unreadable(self, indices: Iterable[int], progress: bool = False) -> list[list]:
        """[index, error] of each image among `indices` whose header or data does not read
        (PIL verify), with a progress bar if `progress`; nothing is marked."""
        found = []
        shown = tqdm(indices, f"checking {self.name}", disable=not progress, unit="image")
        for index in shown:
            try:
                with Image.open(self._files[index]) as image:
                    image.verify()
            except IMAGE_ERRORS as error:
                found.append([index, str(error)])
        return found

    def set_corrupt(self, found: list[list], quiet: bool = False) -> None:
        """Mark the [index, error] images that a check found unreadable (this process's, another
        rank's or a cached one), so that reading passes over them; each named in the log unless
        `quiet`; DataError past max_corrupt_fraction."""
        for index, error in found:
            self._mark_corrupt(index, error, quiet)

    def verify(self, progress: bool = False) -> int:
        """Check every image (`unreadable`) and mark those that do not read; the number of
        corrupt images (DataError past max_corrupt_fraction)."""
        self.set_corrupt(self.unreadable(range(len(self)), progress))
        return self.num_corrupt

    def _mark_corrupt(self, index: int, error: Exception | str, quiet: bool = False) -> None:
        self._corrupt.add(index)
        path = self._files[index]
        if not quiet:
            logger.warning(
                "%s: skipped corrupt image %s (%s); %d of %d corrupt so far",
                self.name, path, error, len(self._corrupt), len(self),
            )  # fmt: skip
        if len(self._corrupt) > self.max_corrupt_fraction * len(self):
            raise DataError(
                f"{path}: unreadable image ({error}); {len(self._corrupt)} of {len(self)} "
                f"images in {self.name} are corrupt, more than data.max_corrupt_fraction="
                f"{self.max_corrupt_fraction:g}; replace or remove them"
            )


def _decode(path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        return rgb_tensor(image)


def open_folder(root: str, split: str, num_samples: int | None, seed: int, name: str) -> ImageFiles:
    """ImageNet layout: ROOT/train/CLASS/*.png and ROOT/val/CLASS/*; classes from train/."""
    layout = "expected PATH/train/CLASS/IMAGE.png and optionally PATH/val/CLASS/IMAGE.png"
    base = Path(root)
    train_dir = base / "train"
    if not train_dir.is_dir():
        missing = base if not base.is_dir() else train_dir
        raise DataError(f"{missing}: no such folder; folder:PATH {layout}")
    classes = sorted(entry.name for entry in train_dir.iterdir() if entry.is_dir())
    split_dir = base / split
    if split == "val" and not split_dir.is_dir():
        raise DataError(f"{name} has no val split: {split_dir} is missing; create it or use train")
    files: list[Path] = []
    labels: list[int] = []
    for class_dir in sorted(entry for entry in split_dir.iterdir() if entry.is_dir()):
        if class_dir.name not in classes:
            raise DataError(f"{class_dir}: class not in {train_dir}; val classes must exist there")
        found = sorted(
            path
            for path in class_dir.iterdir()
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
        )
        files += found
        labels += [classes.index(class_dir.name)] * len(found)
    if not files:
        raise DataError(f"{split_dir}: no images ({', '.join(IMAGE_EXTENSIONS)}); {layout}")
    files, labels = _subset(files, labels, _take(len(files), num_samples, name), seed)
    return ImageFiles(name, files, labels, [""] * len(files), classes)


def _subset(
    files: list[Path], labels: list[int], keep: int, seed: int
) -> tuple[list[Path], list[int]]:
    """`keep` of the files (and their labels), a seeded random subset in file order: files
    grouped by folder would make the first `keep` one folder's."""
    if keep == len(files):
        return files, labels
    chosen = sorted(random.Random(seed).sample(range(len(files)), keep))
    return [files[index] for index in chosen], [labels[index] for index in chosen]


def open_images(root: str, split: str, num_samples: int | None, seed: int, name: str) -> ImageFiles:
    """images:PATH: every image under PATH, recursively, with no label and no caption (the
    plain-image share of a mixture, for the self-supervised targets); a train split only."""
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"{base}: no such folder; images:PATH needs a folder of image files")
    if split != "train":
        raise DataError(
            f"{name} has no {split} split: plain images carry no labels to evaluate on; "
            "evaluate on a labelled spec (folder:PATH with val/, fashion-mnist, shapes)"
        )
    files = sorted(
        path
        for path in base.rglob("*")
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
    )
    if not files:
        raise DataError(
            f"{base}: no images ({', '.join(IMAGE_EXTENSIONS)}) under it; images:PATH reads "
            "every image file under PATH, in any sub-folder"
        )
    files, _ = _subset(files, [-1] * len(files), _take(len(files), num_samples, name), seed)
    return ImageFiles(name, files, [-1] * len(files), [""] * len(files), None)


_LINE_FORMAT = 'each line must be {"image": "a.jpg", "caption": "...", "label": 0 (optional)}'


def _read_jsonl(path: Path) -> list[tuple[Path, str, int, int]]:
    """(image path, caption, label or -1, line number) per non-blank line of a JSONL file."""
    if not path.is_file():
        raise DataError(
            f"{path}: no such file; captions:FILE.jsonl needs a JSONL file; {_LINE_FORMAT}"
        )
    rows = []
    with open(path, "rb") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:  # bad JSON or bad UTF-8
                message = f"{path}:{number}: malformed JSON ({error}); {_LINE_FORMAT}"
                raise DataError(message) from error
            if not (
                isinstance(record, dict)
                and isinstance(record.get("image"), str)
                and isinstance(record.get("caption"), str)
            ):
                raise DataError(f"{path}:{number}: missing image or caption; {_LINE_FORMAT}")
            label = record.get("label")
            if label is not None and (type(label) is not int or label < 0):
                raise DataError(
                    f"{path}:{number}: label {label!r} is not an integer >= 0; "
                    "labels must be 0..C-1, or leave out the key for unlabelled samples"
                )
            image = Path(record["image"])
            image = image if image.is_absolute() else path.parent / image
            rows.append((image, record["caption"], -1 if label is None else label, number))
    if not rows:
        raise DataError(f"{path}: no samples; {_LINE_FORMAT}")
    return rows


def _check_class_count(path: Path, rows: list[tuple[Path, str, int, int]]) -> None:
    """Labels 0..C-1 make C classes: refuse more classes than labelled samples (some class
    would have no sample, and a huge label would allocate a huge class table)."""
    labelled = sum(label >= 0 for _, _, label, _ in rows)
    _, _, label, number = max(rows, key=lambda row: row[2])
    if label >= labelled:
        raise DataError(
            f"{path}:{number}: label {label} makes {label + 1} classes for {labelled} labelled "
            f"samples; number the classes 0..C-1 with C <= {labelled}"
        )


def open_captions(arg: str, split: str, num_samples: int | None, name: str) -> ImageFiles:
    """captions:TRAIN.jsonl[,VAL.jsonl]; classes come from the labels of the train file."""
    paths = [Path(part) for part in arg.split(",")]
    if len(paths) > 2 or not all(part.strip() for part in arg.split(",")):
        raise DataError(f"{name}: expected captions:TRAIN.jsonl or captions:TRAIN.jsonl,VAL.jsonl")
    if split == "val" and len(paths) == 1:
        raise DataError(f"{name} has no val split; use captions:{arg},VAL.jsonl or the train split")
    train_rows = _read_jsonl(paths[0])
    _check_class_count(paths[0], train_rows)
    max_label = max(row[2] for row in train_rows)
    classes = [str(index) for index in range(max_label + 1)] if max_label >= 0 else None
    rows = train_rows
    if split == "val":
        rows = _read_jsonl(paths[1])
        num_classes = 0 if classes is None else len(classes)
        for _, _, label, number in rows:
            if label >= num_classes:
                raise DataError(
                    f"{paths[1]}:{number}: label {label} is out of range for the {num_classes} "
                    f"classes of {paths[0]}; val labels must be 0..{num_classes - 1}"
                )
    rows = rows[: _take(len(rows), num_samples, name)]
    files, captions, labels, _ = (list(column) for column in zip(*rows, strict=True))
    source = ImageFiles(name, files, labels, captions, classes)
    source.numbered_classes = True
    return source
