"""Fashion-MNIST, folder: and captions: sources, and their one-line errors."""

import gzip
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from m3i.data.base import DataError
from m3i.data.sources import FASHION_MNIST_DIR
from m3i.data.specs import open_source

FASHION = Path(FASHION_MNIST_DIR)
needs_fashion = pytest.mark.skipif(
    not (FASHION / "train-labels-idx1-ubyte.gz").exists(), reason="dataset-fashion-mnist missing"
)

NOUNS = ["t-shirt", "trousers", "pullover", "dress", "coat"]
NOUNS += ["sandal", "shirt", "sneaker", "bag", "ankle boot"]


def data_error(call, *names: object) -> str:
    """Run ``call``, expect a one-line DataError naming each of ``names``."""
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for name in names:
        assert str(name) in message, message
    return message


def raw_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path) as file:
        return np.frombuffer(file.read(), np.uint8, offset=offset)


def write_idx(path: Path, array: np.ndarray) -> None:
    magic = {1: 0x0801, 3: 0x0803}[array.ndim]
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def save_png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (4, 3)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture(scope="module")
def fashion_train():
    return open_source("fashion-mnist")


@needs_fashion
def test_fashion_mnist_reads_the_debian_files(fashion_train) -> None:
    labels = raw_idx(FASHION / "train-labels-idx1-ubyte.gz", 8)
    images = raw_idx(FASHION / "train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    assert len(fashion_train) == 60000 == len(labels)
    assert len(fashion_train.classes) == 10
    for index in (0, 1, 59999):
        sample = fashion_train[index]
        assert sample.image.dtype == torch.uint8 and sample.image.shape == (3, 28, 28)
        for channel in sample.image:
            assert np.array_equal(channel.numpy(), images[index])
        assert sample.label == labels[index]
        assert sample.caption.endswith(NOUNS[sample.label])
    assert sorted(set(labels.tolist())) == list(range(10))
    val = open_source("fashion-mnist", "val")
    assert len(val) == 10000
    assert val[0].label == raw_idx(FASHION / "t10k-labels-idx1-ubyte.gz", 8)[0]
    assert len(open_source("fashion-mnist", "val", num_samples=10)) == 10


@needs_fashion
def test_fashion_mnist_captions_are_deterministic_templates(fashion_train) -> None:
    captions = fashion_train.captions(limit=12)
    assert captions == [fashion_train[i].caption for i in range(12)]
    assert len(set(captions)) > 1
    assert all(caption.startswith("a ") for caption in captions)


def test_fashion_mnist_reads_hand_written_idx(tmp_path: Path) -> None:
    images = np.arange(2 * 28 * 28).reshape(2, 28, 28) % 251
    for prefix in ("train", "t10k"):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.array([9, 0]))
    source = open_source(f"fashion-mnist:{tmp_path}", "val")
    assert [source[0].label, source[1].label] == [9, 0]
    assert source[1].image[2, 0, :3].tolist() == [784 % 251, 785 % 251, 786 % 251]
    assert source[0].caption.endswith("an ankle boot")
    assert source.name == f"fashion-mnist:{tmp_path}"


def test_fashion_mnist_bad_files(tmp_path: Path) -> None:
    data_error(lambda: open_source(f"fashion-mnist:{tmp_path / 'nope'}"), tmp_path / "nope")
    data_error(lambda: open_source(f"fashion-mnist:{tmp_path}"), tmp_path, "train-images")
    images = tmp_path / "train-images-idx3-ubyte"
    labels = tmp_path / "train-labels-idx1-ubyte"
    write_idx(images, np.zeros((3, 28, 28)))
    write_idx(labels, np.array([1, 2]))
    data_error(lambda: open_source(f"fashion-mnist:{tmp_path}"), labels, "3 images")
    images.write_bytes(b"\x00\x00\x08\x01" + images.read_bytes()[4:])
    data_error(lambda: open_source(f"fashion-mnist:{tmp_path}"), images, "magic")
    write_idx(images, np.zeros((2, 28, 28)))
    images.write_bytes(images.read_bytes()[:-5])
    data_error(lambda: open_source(f"fashion-mnist:{tmp_path}"), images, "truncated")


def make_folder(root: Path, per_class: int = 2) -> None:
    for split in ("train", "val"):
        for label, name in enumerate(["cat", "dog"]):
            for k in range(per_class):
                save_png(root / split / name / f"{k:03d}.png", (label * 100, k, 7))
    (root / "train" / "cat" / "notes.txt").write_text("not an image")


def test_folder_reads_imagenet_layout(tmp_path: Path) -> None:
    make_folder(tmp_path)
    save_png(tmp_path / "train" / "dog" / "extra.JPG", (1, 2, 3))
    source = open_source(f"folder:{tmp_path}")
    assert source.classes == ["cat", "dog"]
    assert len(source) == 5
    assert [source[i].label for i in range(5)] == [0, 0, 1, 1, 1]
    sample = source[3]
    assert sample.image.shape == (3, 3, 4) and sample.image.dtype == torch.uint8
    assert sample.image[:, 0, 0].tolist() == [100, 1, 7]
    assert sample.caption == "" and source.captions() == []
    val = open_source(f"folder:{tmp_path}", "val")
    assert len(val) == 4 and val.classes == ["cat", "dog"]
    subset = open_source(f"folder:{tmp_path}", num_samples=3, seed=1)
    assert len(subset) == 3
    assert [subset[i].label for i in range(3)] == [
        open_source(f"folder:{tmp_path}", num_samples=3, seed=1)[i].label for i in range(3)
    ]


def test_folder_bad_input(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    data_error(lambda: open_source(f"folder:{missing}"), missing)
    (tmp_path / "train" / "cat").mkdir(parents=True)
    data_error(lambda: open_source(f"folder:{tmp_path}"), tmp_path / "train", "no images")
    save_png(tmp_path / "train" / "cat" / "a.png", (0, 0, 0))
    data_error(lambda: open_source(f"folder:{tmp_path}", "val"), tmp_path / "val", "no val split")
    save_png(tmp_path / "val" / "cow" / "a.png", (0, 0, 0))
    data_error(lambda: open_source(f"folder:{tmp_path}", "val"), tmp_path / "val" / "cow")
    data_error(lambda: open_source(f"folder:{tmp_path}", num_samples=5), "num_samples=5")


def test_corrupt_images_are_skipped_counted_and_bounded(tmp_path: Path, caplog) -> None:
    make_folder(tmp_path, per_class=50)
    last = tmp_path / "train" / "dog" / "049.png"
    last.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    source = open_source(f"folder:{tmp_path}")
    assert len(source) == 100
    with caplog.at_level(logging.WARNING, logger="m3i.data"):
        sample = source[99]
    assert sample.image[:, 0, 0].tolist() == [0, 0, 7]  # wrapped around to cat/000.png
    assert source.num_corrupt == 1 and "049.png" in caplog.text
    source[99]
    assert source.num_corrupt == 1  # counted once
    broken = tmp_path / "train" / "cat" / "010.png"
    broken.write_bytes(b"definitely not a png")
    data_error(lambda: source[10], broken, "more than data.max_corrupt_fraction=0.01")  # 2 of 100

    data_error(
        open_source(f"folder:{tmp_path}").verify, last, "more than data.max_corrupt_fraction=0.01"
    )
    save_png(last, (100, 49, 7))
    checked = open_source(f"folder:{tmp_path}")
    assert checked.verify() == 1 == checked.num_corrupt
    assert checked[10].image[:, 0, 0].tolist() == [0, 11, 7]  # skipped to cat/011.png


def write_jsonl(path: Path, rows: list) -> None:
    path.write_text(
        "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)
    )


def test_captions_jsonl(tmp_path: Path) -> None:
    save_png(tmp_path / "img" / "a.png", (10, 20, 30))
    save_png(tmp_path / "elsewhere" / "b.png", (40, 50, 60))
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    absolute = str(tmp_path / "elsewhere" / "b.png")
    write_jsonl(
        train,
        [
            {"image": "img/a.png", "caption": "a dark square", "label": 2},
            "",
            {"image": absolute, "caption": ""},
            {"image": "img/a.png", "caption": "", "label": 0},
            {"image": "img/a.png", "caption": "", "label": 0},
        ],
    )
    write_jsonl(val, [{"image": "img/a.png", "caption": "again", "label": 1}])
    source = open_source(f"captions:{train}")
    assert len(source) == 4 and source.classes == ["0", "1", "2"]  # class 1 has no sample
    assert (source[0].label, source[0].caption) == (2, "a dark square")
    assert source[0].image[:, 0, 0].tolist() == [10, 20, 30]
    assert (source[1].label, source[1].image[:, 0, 0].tolist()) == (-1, [40, 50, 60])
    assert source.captions() == ["a dark square"]
    val_source = open_source(f"captions:{train},{val}", "val")
    assert val_source.classes == ["0", "1", "2"] and val_source[0].caption == "again"
    write_jsonl(val, [{"image": "img/a.png", "caption": "x"}])
    write_jsonl(train, [{"image": "img/a.png", "caption": "x"}])
    assert open_source(f"captions:{train}").classes is None


def test_captions_bad_input(tmp_path: Path) -> None:
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    missing = tmp_path / "missing.jsonl"
    data_error(lambda: open_source(f"captions:{missing}"), missing)
    write_jsonl(train, [])
    data_error(lambda: open_source(f"captions:{train}"), train, "no samples")
    write_jsonl(train, [{"image": "a.png", "caption": "ok", "label": 1}, "{not json"])
    data_error(lambda: open_source(f"captions:{train}"), f"{train}:2", "malformed")
    write_jsonl(train, [{"image": "a.png"}])
    data_error(lambda: open_source(f"captions:{train}"), f"{train}:1", "caption")
    write_jsonl(train, [{"image": "a.png", "caption": "ok", "label": -3}])
    data_error(lambda: open_source(f"captions:{train}"), f"{train}:1", "-3")
    write_jsonl(train, [{"image": "a.png", "caption": "ok", "label": "cat"}])
    data_error(lambda: open_source(f"captions:{train}"), f"{train}:1", "cat")
    write_jsonl(
        train,
        [{"image": "a.png", "caption": "ok", "label": 1}, {"image": "a.png", "caption": "ok"}],
    )
    data_error(lambda: open_source(f"captions:{train}"), f"{train}:1", "label 1", "C <= 1")
    write_jsonl(train, [{"image": "a.png", "caption": "ok", "label": k} for k in (1, 0)])
    write_jsonl(
        val, [{"image": "a.png", "caption": "ok"}, {"image": "a.png", "caption": "", "label": 2}]
    )
    data_error(lambda: open_source(f"captions:{train},{val}", "val"), f"{val}:2", "out of range")
    data_error(lambda: open_source(f"captions:{train}", "val"), train, "no val split")
    data_error(lambda: open_source(f"captions:{train},{val},{val}"), "TRAIN.jsonl,VAL.jsonl")


def test_captions_corrupt_image_rule(tmp_path: Path) -> None:
    train = tmp_path / "train.jsonl"
    save_png(tmp_path / "good.png", (1, 2, 3))
    write_jsonl(
        train, [{"image": "good.png", "caption": "g"}, {"image": "gone.png", "caption": "x"}]
    )
    source = open_source(f"captions:{train}")
    data_error(lambda: source[1], tmp_path / "gone.png", "more than data.max_corrupt_fraction=0.01")
    data_error(open_source(f"captions:{train}").verify, tmp_path / "gone.png")


def test_unknown_spec_and_split() -> None:
    message = data_error(lambda: open_source("imagenet:/data"), "imagenet:/data")
    assert all(name in message for name in ("shapes", "fashion-mnist", "folder:", "captions:"))
    data_error(lambda: open_source("shapes", "test"), "'test'", "'val'")
    data_error(lambda: open_source("folder:"), "folder:PATH")


def test_16_bit_png_and_cmyk_jpeg_files_read_right(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / "train" / name).mkdir(parents=True)
    grey16 = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)  # 16-bit grey: / 257
    Image.fromarray(grey16).save(tmp_path / "train" / "a" / "grey16.png")
    Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(tmp_path / "train" / "b" / "cyan.jpg")
    source = open_source(f"folder:{tmp_path}")
    assert source[0].image[:, 0].T.tolist() == [[0] * 3, [1] * 3, [128] * 3, [255] * 3]
    cyan = source[1].image.reshape(3, -1).float().mean(dim=1)  # lossy: within 3 levels
    assert torch.allclose(cyan, torch.tensor([0.0, 255.0, 255.0]), atol=3), cyan


def test_verify_shows_a_progress_bar(tmp_path: Path, capsys) -> None:
    make_folder(tmp_path)
    assert open_source(f"folder:{tmp_path}").verify(progress=True) == 0
    assert f"checking folder:{tmp_path}" in capsys.readouterr().err
