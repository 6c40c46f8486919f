"""WebDataset shards: written shards are plain WebDataset, streamed items match ViewDataset's."""

import io
import tarfile
from itertools import islice
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from m3i.data.base import DataError, ImageSource, Sample
from m3i.data.shapes import CLASSES, ShapesDataset
from m3i.data.views import ViewConfig, ViewDataset
from m3i.data.webdataset import WebDatasetStream, write_shards

IDENTITY = ViewConfig(scale_min=1.0, flip=0.0, color_jitter=0.0, hue=0.0, grayscale=0.0)
MEAN, STD = (torch.tensor(v)[:, None, None] for v in (ViewConfig.mean, ViewConfig.std))


class Unlabelled(ImageSource):
    """Three square images with no labels or classes; sample 1 has no caption either."""

    classes = None
    name = "unlabelled"

    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int) -> Sample:
        image = torch.full((3, 32, 32), 40 * index, dtype=torch.uint8)
        return Sample(image, -1, "" if index == 1 else f"caption {index}")


@pytest.fixture(scope="module")
def shapes() -> ShapesDataset:
    return ShapesDataset("train", 24, 32)


@pytest.fixture(scope="module")
def shards(shapes: ShapesDataset, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    directory = tmp_path_factory.mktemp("shards")
    return write_shards(shapes, str(directory / "shard-%06d.tar"), 8)


def spec(shards: list[Path], last: int = 2) -> str:
    return f"{shards[0].parent}/shard-{{000000..{last:06d}}}.tar"


def take(stream: WebDatasetStream, count: int) -> list[dict]:
    return list(islice(iter(stream), count))


def test_shards_are_plain_webdataset(shapes: ShapesDataset, shards: list[Path]) -> None:
    directory = shards[0].parent
    assert shards == [directory / f"shard-{k:06d}.tar" for k in range(3)]
    assert sorted(path.name for path in directory.iterdir()) == [
        "classes.txt",
        *(path.name for path in shards),
    ]  # no temporary files left
    with tarfile.open(shards[1]) as tar:
        expected = [f"{index:09d}.{ext}" for index in range(8, 16) for ext in ("cls", "png", "txt")]
        assert tar.getnames() == expected
    samples = list(wds.WebDataset([str(path) for path in shards], shardshuffle=False))
    assert [sample["__key__"] for sample in samples] == [f"{index:09d}" for index in range(24)]
    files = {key for sample in samples for key in sample if not key.startswith("__")}
    assert files == {"cls", "png", "txt"}
    assert (directory / "classes.txt").read_text().splitlines() == CLASSES


def test_decoded_samples_are_the_source_samples(shapes: ShapesDataset, shards: list[Path]) -> None:
    dataset = wds.WebDataset(spec(shards), shardshuffle=False).decode("torchrgb8")
    for sample in dataset:
        source = shapes[int(sample["__key__"])]
        assert torch.equal(sample["png"], source.image)  # PNG is lossless
        assert sample["txt"] == source.caption
        assert sample["cls"] == source.label
    images = [shapes[index].image.float() / 255 for index in range(len(shapes))]
    for item in take(WebDatasetStream(spec(shards), IDENTITY, 32, seed=0), 30):
        view = item["view1"] * STD + MEAN  # the whole image, resized to its own size
        index = next(k for k, image in enumerate(images) if torch.allclose(view, image, atol=1e-6))
        assert (item["caption"], item["label"].item()) == (
            shapes[index].caption,
            shapes[index].label,
        )


def test_items_match_view_dataset(shapes: ShapesDataset, shards: list[Path]) -> None:
    cfg = ViewConfig()
    expected = ViewDataset(shapes, cfg, 16, seed=0)[0]
    item = take(WebDatasetStream(spec(shards), cfg, 16, seed=0), 1)[0]
    assert list(item) == list(expected)
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert (item[key].shape, item[key].dtype) == (value.shape, value.dtype), key
        else:
            assert isinstance(item[key], str) and item[key], key
    for num_workers in (0, 2):
        stream = WebDatasetStream(spec(shards), cfg, 16, seed=0)
        batches = list(islice(DataLoader(stream, batch_size=4, num_workers=num_workers), 4))
        for batch in batches:
            assert batch["view1"].shape == batch["view2"].shape == (4, 3, 16, 16)
            assert batch["box1"].shape == (4, 4) and batch["flip2"].shape == (4,)
            assert batch["label"].dtype == torch.int64 and len(batch["caption"]) == 4
        indices = torch.cat([batch["index"] for batch in batches]).tolist()
        assert sorted(indices) == list(range(16)), num_workers  # unique across workers


def test_stream_depends_on_seed_rank_and_start(shards: list[Path]) -> None:
    def sequence(rank: int, start: int = 0, seed: int = 0) -> list[tuple]:
        stream = WebDatasetStream(spec(shards), ViewConfig(), 8, seed, rank, world_size=2)
        stream.set_start(start)
        return [(item["caption"], item["box1"].tolist()) for item in take(stream, 16)]

    first = sequence(rank=0)
    assert first == sequence(rank=0)
    captions = [caption for caption, _ in first]
    for other in (sequence(rank=1), sequence(rank=0, start=100), sequence(rank=0, seed=1)):
        assert [caption for caption, _ in other] != captions
    stream = WebDatasetStream(spec(shards), ViewConfig(), 8, seed=0, rank=1, world_size=2)
    assert [item["index"].item() for item in take(stream, 3)] == [1, 3, 5]


def test_captions_and_classes(shapes: ShapesDataset, shards: list[Path], tmp_path: Path) -> None:
    stream = WebDatasetStream(spec(shards), IDENTITY, 32, seed=0)
    assert stream.classes == CLASSES
    assert sorted(stream.scan(1000).captions) == sorted(shapes.captions())
    paths = write_shards(Unlabelled(), str(tmp_path / "u-%02d.tar"), 2)
    unlabelled = WebDatasetStream(f"{tmp_path}/u-{{00..01}}.tar", IDENTITY, 32, seed=0)
    assert len(paths) == 2 and unlabelled.classes is None
    assert sorted(unlabelled.scan(1000).captions) == ["caption 0", "caption 2"]
    for item in take(unlabelled, 6):
        level = round((item["view1"] * STD + MEAN)[0, 0, 0].item() * 255 / 40)
        assert item["label"].item() == -1
        assert item["caption"] == ("" if level == 1 else f"caption {level}")


def test_the_scan_reads_the_start_of_every_shard_in_a_seeded_order(
    shapes: ShapesDataset, shards: list[Path], tmp_path: Path
) -> None:
    stream = WebDatasetStream(spec(shards), IDENTITY, 32, seed=0)
    assert sorted(stream.scan(1000).labels) == sorted(shapes.labels())  # all 24: every shard
    starts = [shapes.labels()[8 * k : 8 * k + 2] for k in range(3)]  # 8 samples a shard
    orders = set()
    for seed in range(6):
        scan = stream.scan(6, seed)  # the first 2 of each of the 3 shards, in the seed's order
        assert scan.labels in [a + b + c for a in starts for b in starts for c in starts]
        assert sorted(scan.labels) == sorted(sum(starts, []))
        assert stream.scan(6, seed) == scan  # a function of the seed
        orders.add(tuple(scan.labels))
    assert len(orders) > 1
    assert len(stream.scan(4).labels) == 4  # the bound: 2 + 2 from the first 2 shards drawn
    write_shards(Unlabelled(), str(tmp_path / "u-%02d.tar"), 2)
    unlabelled = WebDatasetStream(f"{tmp_path}/u-{{00..01}}.tar", IDENTITY, 32, seed=0)
    assert unlabelled.scan(1000).labels == [-1, -1, -1]


def test_grayscale_jpeg_becomes_rgb(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.new("L", (32, 32), 128).save(buffer, format="JPEG")
    with wds.TarWriter(str(tmp_path / "g.tar")) as writer:
        writer.write({"__key__": "a", "jpg": buffer.getvalue()})
    item = take(WebDatasetStream(str(tmp_path / "g.tar"), IDENTITY, 32, seed=0), 1)[0]
    assert item["view1"].shape == (3, 32, 32)
    view = item["view1"] * STD + MEAN  # the views' normalisation undone
    torch.testing.assert_close(view[0], view[2], atol=1e-6, rtol=0)
    assert (item["label"].item(), item["caption"]) == (-1, "")


def test_bad_specs_are_one_line_errors(shards: list[Path], tmp_path: Path) -> None:
    cases = {
        f"{tmp_path}/none-{{000000..000009}}.tar": f"{tmp_path}/none-000000.tar",
        spec(shards, last=5): str(shards[0].parent / "shard-000003.tar"),
        f"{tmp_path}/bad-{{0..2.tar": "Unbalanced braces",
        "": "''",
    }
    for spec_arg, named in cases.items():
        with pytest.raises(DataError) as error:
            WebDatasetStream(spec_arg, IDENTITY, 32, seed=0)
        message = str(error.value)
        assert "\n" not in message and named in message, message
        assert "wds:/path/shard-{000000..000099}.tar" in message
    with wds.TarWriter(str(tmp_path / "text.tar")) as writer:
        writer.write({"__key__": "a", "txt": "no image"})
    with pytest.raises(DataError, match=r"text\.tar: sample a has no png or jpg") as error:
        take(WebDatasetStream(str(tmp_path / "text.tar"), IDENTITY, 32, seed=0), 1)
    assert "\n" not in str(error.value)


def test_jpeg_shards_hold_quality_90_jpegs(shapes: ShapesDataset, tmp_path: Path) -> None:
    paths = write_shards(shapes, str(tmp_path / "j-%02d.tar"), 16, image_format="jpg")
    with tarfile.open(paths[0]) as tar:
        assert tar.getnames()[:3] == [f"{0:09d}.{ext}" for ext in ("cls", "jpg", "txt")]
    samples = list(wds.WebDataset([str(path) for path in paths], shardshuffle=False))
    assert len(samples) == len(shapes) and all("png" not in sample for sample in samples)
    for sample in samples[:4]:
        image = shapes[int(sample["__key__"])].image
        expected = io.BytesIO()  # PIL's own JPEG of the image at quality 90
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(expected, "JPEG", quality=90)
        assert sample["jpg"] == expected.getvalue()
    stream = WebDatasetStream(f"{tmp_path}/j-{{00..01}}.tar", IDENTITY, 32, seed=0)
    assert take(stream, 1)[0]["view1"].shape == (3, 32, 32)  # the stream decodes them
    with pytest.raises(ValueError, match="image_format='gif'; use 'png' or 'jpg'"):
        write_shards(shapes, str(tmp_path / "g-%02d.tar"), 16, image_format="gif")
