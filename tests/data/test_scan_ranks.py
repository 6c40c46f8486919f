"""The start-up scans on 2 gloo ranks: rank 0 alone reads the data, every rank gets its result,
and a bad source is the same one-line error on every rank."""

import json
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from m3i.data import scan as scan_module
from m3i.data.base import DataError
from m3i.data.scan import SCAN_FILE, shared_scans
from m3i.data.specs import open_source
from m3i.data.webdataset import WebDatasetStream
from tests.mixture_data import caption_shards, plain_images


def worker(rank: int, root: Path, spec: str, broken: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{root / 'store'}", rank=rank, world_size=2)
    calls = []
    real = scan_module.scan_source
    scan_module.scan_source = lambda *args: calls.append(1) or real(*args)
    stream = WebDatasetStream(spec.partition(":")[2], None, 16, seed=0)
    (scan,) = shared_scans([stream], {"limit": 5, "seed": 0}, root / SCAN_FILE)
    try:
        shared_scans([open_source(broken)], {"limit": 5, "seed": 0}, None, verify=True)
        error = None
    except DataError as err:
        error = str(err)
    result = {"calls": len(calls), "labels": scan.labels, "captions": scan.captions}
    (root / f"rank{rank}.json").write_text(json.dumps({**result, "error": error}))
    dist.destroy_process_group()


def test_rank_0_scans_and_every_rank_gets_the_result(tmp_path):
    spec = caption_shards(tmp_path / "cc", 12, 4)
    plain = plain_images(tmp_path / "plain", 20)
    for path in sorted(plain.rglob("*.png"))[:3]:  # 3 of 20 unreadable: more than 1%
        path.write_bytes(b"not a png")
    mp.spawn(worker, args=(tmp_path, spec, f"images:{plain}"), nprocs=2, join=True)
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert zero["calls"] == 2 and one["calls"] == 0  # the stream and the folder, on rank 0 only
    assert zero["labels"] == one["labels"] and len(zero["labels"]) == 5
    assert zero["captions"] == one["captions"] and len(zero["captions"]) == 5
    assert zero["error"] == one["error"] and "more than data.max_corrupt_fraction" in one["error"]
    assert json.loads((tmp_path / SCAN_FILE).read_text())["sources"][0]["labels"] == [-1] * 5
