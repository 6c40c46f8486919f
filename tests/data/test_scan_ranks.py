"""The start-up scans on 2 gloo ranks: rank 0 alone reads a stream's sample, each rank checks
its share of the image files, every rank gets the whole result, and a bad source is the same
one-line error on every rank."""

import json
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from m3i.data.base import DataError
from m3i.data.scan import SCAN_FILE, ScanCache, scan_key, shared_stream_scans, shared_verify
from m3i.data.sources import ImageFiles
from m3i.data.specs import open_source
from m3i.data.webdataset import WebDatasetStream
from tests.mixture_data import caption_shards, plain_images


def worker(rank: int, root: Path, spec: str, plain: str, broken: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{root / 'store'}", rank=rank, world_size=2)
    calls, checked = [], []
    scan, unreadable = WebDatasetStream.scan, ImageFiles.unreadable
    WebDatasetStream.scan = lambda self, *args: calls.append(1) or scan(self, *args)
    ImageFiles.unreadable = lambda self, indices, *args: (
        checked.extend(indices) or unreadable(self, indices, *args)
    )
    stream = WebDatasetStream(spec.partition(":")[2], None, 16, seed=0)
    cache = ScanCache(root / SCAN_FILE, scan_key([stream], {"limit": 5}))
    (sample,) = shared_stream_scans([stream], cache, 5, 0)
    images = open_source(plain)
    shared_verify([images], ScanCache(None, {}))
    try:
        shared_verify([open_source(broken)], ScanCache(None, {}))
        error = None
    except DataError as err:
        error = str(err)
    result = {"calls": len(calls), "labels": sample.labels, "captions": sample.captions}
    result |= {"checked": checked[: len(images) // 2], "corrupt": images.corrupt_indices()}
    (root / f"rank{rank}.json").write_text(json.dumps({**result, "error": error}))
    dist.destroy_process_group()


def test_rank_0_scans_each_rank_checks_its_share_and_every_rank_gets_the_result(tmp_path):
    spec = caption_shards(tmp_path / "cc", 12, 4)
    plain = plain_images(tmp_path / "plain", 200)
    sorted(plain.rglob("*.png"))[7].write_bytes(b"not a png")  # 1 of 200: allowed
    broken = plain_images(tmp_path / "broken", 20)
    for path in sorted(broken.rglob("*.png"))[:3]:  # 3 of 20 unreadable: more than 1%
        path.write_bytes(b"not a png")
    args = (tmp_path, spec, f"images:{plain}", f"images:{broken}")
    mp.spawn(worker, args=args, nprocs=2, join=True)
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert zero["calls"] == 1 and one["calls"] == 0  # the stream's sample: rank 0 only
    assert zero["labels"] == one["labels"] and len(zero["labels"]) == 5
    assert zero["captions"] == one["captions"] and len(zero["captions"]) == 5
    assert zero["checked"] == list(range(0, 200, 2)) and one["checked"] == list(range(1, 200, 2))
    assert zero["corrupt"] == one["corrupt"] == [7]  # found by rank 1, known to both
    assert zero["error"] == one["error"] and "more than data.max_corrupt_fraction" in one["error"]
