"""`m3i bench data`: images/s of each source against the workers, at a tiny size."""

import json
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from m3i.bench.data import DataBenchSettings, run_data_bench, time_stream, write_generated
from m3i.cli import main
from m3i.data.shapes import CLASSES
from m3i.data.views import ViewConfig
from m3i.data.webdataset import WebDatasetStream
from m3i.train.input_rate import usable_cores

CPU = torch.device("cpu")
TINY = ["--img-size", "16", "--batch", "4", "--batches", "2", "--repeats", "2", "--samples", "8"]


def test_json_times_every_source_with_every_usable_worker_count(capsys):
    assert main(["bench", "data", *TINY, "--workers", "0,1,4096", "--json"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out.strip().splitlines()[-1])
    assert (report["img_size"], report["device"], report["cores"]) == (16, "cpu", usable_cores())
    assert report["skipped_workers"] == [4096]  # above the cores: named, not run
    assert [(r["source"], r["workers"]) for r in report["results"]] == [
        (source, workers) for source in ("shapes", "folder", "wds") for workers in (0, 1)
    ]
    for row in report["results"]:
        assert 0 < row["img_per_s_min"] <= row["img_per_s"] <= row["img_per_s_max"], row
    assert report["generated"] == {"samples": 8, "format": "jpg"}
    assert "skipped worker counts above the" in err and "4096" in err  # the table


def test_generated_data_is_jpeg_folders_and_jpeg_shards(tmp_path: Path):
    specs = write_generated(tmp_path, 24, 10)
    files = sorted((tmp_path / "folder" / "train").glob("*/*.jpg"))
    assert len(files) == 10 and {path.parent.name for path in files} <= set(CLASSES)
    for path in files[:3]:
        with Image.open(path) as image:
            assert (image.format, image.size, image.mode) == ("JPEG", (24, 24), "RGB")
    assert specs["folder"] == f"folder:{tmp_path / 'folder'}"
    assert specs["wds"].startswith("wds:")
    stream = WebDatasetStream(specs["wds"][4:], ViewConfig(), 24, seed=0)
    names = sorted(stream.classes[label] for label in stream.scan(len(files)).labels)
    assert names == sorted(path.parent.name for path in files)  # the folder's images, relabelled


def test_a_stream_of_known_pace_times_at_its_rate():
    def paced(seconds: float):
        while True:
            time.sleep(seconds)
            yield None

    timed = time_stream(paced(0.02), batch_size=4, warmup=1, batches_per_timing=5, repeats=3,
                        device=CPU)  # fmt: skip
    # 4 images every 20 ms: 200 img/s at most (a sleep never ends early), a little less here
    assert 0.8 * 200 < timed["img_per_s_min"] <= timed["img_per_s"] <= timed["img_per_s_max"]
    assert timed["img_per_s_max"] <= 200
    assert 0.02 <= timed["startup_s"] < 0.1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "0,x"], "--workers '0,x': give counts"),
        (["--workers", "-1"], "give counts >= 0"),
        (["--batch", "0"], "--batch 0: must be >= 1"),
        (["--data", "imagenet"], "--data 'imagenet': unknown source"),
        (["--data", "folder:/no/such/dir"], "/no/such/dir"),
        (["--set", "views.flop=0"], "views.flop"),
    ],
)
def test_bad_input_is_one_line_before_any_work(capsys, args, message):
    assert main(["bench", "data", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert "writing" not in err  # nothing generated


def test_settings_default_to_shapes_folder_and_wds():
    assert DataBenchSettings().specs == ("shapes", "folder", "wds")
    report_args = DataBenchSettings(specs=("shapes",), img_size=16, batch=2, workers=(0,),
                                    batches=1, repeats=1)  # fmt: skip
    report = run_data_bench(report_args, CPU, log=lambda message: None)
    assert report["generated"] is None and len(report["results"]) == 1
