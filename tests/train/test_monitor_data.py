"""`monitor.data`: the online kNN monitor's own indexable data, for runs whose data has no
labelled splits (a `wds:` stream); refused at config time when it is a stream itself."""

import json
import logging

import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from m3i.cli import main
from m3i.config import ConfigError, load_config
from m3i.data.shapes import ShapesDataset
from m3i.data.webdataset import write_shards
from m3i.train.monitors import TrainingMonitor
from tests.tiny import TINY_M3I
from tests.train.test_monitors import tiny_config

KNN = ["monitor.every=2", "monitor.knn_train=20", "monitor.knn_val=10"]
RUN = [*TINY_M3I, "train.batch_size=8", "train.steps=2", "train.log_every=2"]
RUN += ["monitor.final_eval=[]", "monitor.tensorboard=false", "data.workers=0", *KNN]


def wds_run(tmp_path, *sets: str) -> list[dict]:
    """A 2-step run on `wds:` shards of `shapes`; its metrics.jsonl records."""
    write_shards(ShapesDataset("train", 32, 32), str(tmp_path / "shard-%06d.tar"), 16)
    spec = f"wds:{tmp_path}/shard-{{000000..000001}}.tar"
    run = tmp_path / "run"
    args = ["pretrain", "--quiet", "--data", spec, "--out", str(run)]
    assert main([*args, *[f"--set={s}" for s in [*RUN, *sets]]]) == 0
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_wds_run_with_monitor_data_logs_the_online_knn(tmp_path):
    records = wds_run(tmp_path, "monitor.data=shapes")
    assert [r["step"] for r in records] == [0, 2]
    for record in records:
        assert {"monitor/knn_top1", "monitor/rankme", "monitor/feature_std"} <= set(record)
        # 10 queries: a whole number of them right
        right = record["monitor/knn_top1"] / 10
        assert right == pytest.approx(round(right))


def test_a_wds_run_without_monitor_data_has_no_monitors_and_says_why(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="m3i.train"):
        records = wds_run(tmp_path)
    assert [r["step"] for r in records] == [2]
    assert not any(key.startswith("monitor/") for key in records[0])
    warning = next(m for m in caplog.messages if m.startswith("no training monitors"))
    assert "no indexable train/val splits" in warning and "monitor.data" in warning


def test_monitor_data_that_streams_is_refused_at_config_time():
    with pytest.raises(ConfigError) as err:
        load_config("m3i", overrides=["monitor.data=wds:/data/shard-{000000..000009}.tar"])
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("monitor.data 'wds:") and "must be indexable" in message


def folder(root, split: str, per_class: int) -> None:
    for label in range(2):
        directory = root / split / f"class{label}"
        directory.mkdir(parents=True)
        for index in range(per_class):
            image = Image.new("RGB", (16, 16), (label * 200, index * 40, 0))
            image.save(directory / f"{index}.png")


def test_the_monitor_reads_monitor_data_not_the_runs_data(tmp_path):
    folder(tmp_path, "train", 3)
    folder(tmp_path, "val", 2)
    cfg = tiny_config("data.spec=shapes", f"monitor.data=folder:{tmp_path}")
    monitor = TrainingMonitor(cfg, torch.device("cpu"))
    # torchvision's ImageFolder reads the same layout: the same images, labelled alike
    assert monitor.memory_labels.tolist() == ImageFolder(str(tmp_path / "train")).targets
    assert monitor.query_labels.tolist() == ImageFolder(str(tmp_path / "val")).targets
    assert monitor.num_classes == 2


def test_monitor_data_that_cannot_open_is_a_one_line_config_error(tmp_path):
    folder(tmp_path, "train", 2)  # no val/
    cfg = tiny_config(f"monitor.data=folder:{tmp_path}")
    with pytest.raises(ConfigError) as err:
        TrainingMonitor(cfg, torch.device("cpu"))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("monitor.data: ") and "has no usable val split" in message
