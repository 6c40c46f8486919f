"""Small sources on disk, each with one modality, to mix: an ImageNet-style labelled folder,
a folder of plain images, a captions JSONL without labels, and CC3M-style jpg/txt shards."""

import io
import json
import tarfile
from pathlib import Path

from PIL import Image

from m3i.data.shapes import ShapesDataset


def _png(sample, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sample.image.permute(1, 2, 0).numpy()).save(path)


def labelled_folder(root: Path, per_split: dict[str, int], seed: int = 0) -> Path:
    """ROOT/{train,val}/CLASS/NNN.png from shapes (its class names)."""
    for split, count in per_split.items():
        shapes = ShapesDataset("train" if split == "train" else "val", count, 32, seed)
        for index in range(count):
            sample = shapes[index]
            _png(sample, root / split / shapes.classes[sample.label] / f"{index:03d}.png")
    return root


def plain_images(root: Path, count: int, seed: int = 1) -> Path:
    """`count` shapes images as PNGs under ROOT, half of them one sub-folder deeper."""
    shapes = ShapesDataset("train", count, 32, seed)
    for index in range(count):
        deeper = root / "a" / "b" if index % 2 else root
        _png(shapes[index], deeper / f"{index:03d}.png")
    return root


def captions_file(root: Path, count: int, seed: int = 2) -> Path:
    """ROOT/captions.jsonl: `count` shapes images with their captions and no label."""
    shapes = ShapesDataset("train", count, 32, seed)
    lines = []
    for index in range(count):
        sample = shapes[index]
        _png(sample, root / "images" / f"{index:03d}.png")
        lines.append(json.dumps({"image": f"images/{index:03d}.png", "caption": sample.caption}))
    path = root / "captions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def caption_shards(
    root: Path, count: int, per_shard: int, truncated: tuple[int, ...] = (), seed: int = 3
) -> str:
    """CC3M-style shards (KEY.jpg and KEY.txt, no label), the images at `truncated` cut short;
    returns the wds: spec."""
    root.mkdir(parents=True, exist_ok=True)
    shapes = ShapesDataset("train", count, 32, seed)
    shards = (count + per_shard - 1) // per_shard
    for shard in range(shards):
        with tarfile.open(root / f"cc-{shard:04d}.tar", "w") as tar:
            for index in range(shard * per_shard, min(count, (shard + 1) * per_shard)):
                sample = shapes[index]
                buffer = io.BytesIO()
                Image.fromarray(sample.image.permute(1, 2, 0).numpy()).save(buffer, "JPEG")
                image = buffer.getvalue()
                if index in truncated:
                    image = image[: len(image) // 3]
                for suffix, data in (("jpg", image), ("txt", sample.caption.encode())):
                    info = tarfile.TarInfo(f"{index:06d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return f"wds:{root}/cc-{{0000..{shards - 1:04d}}}.tar"
