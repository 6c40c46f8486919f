"""`wds:` WebDataset shards written from `shapes`, trained on end to end, and resumed."""

import json

from m3i.cli import main
from m3i.data.shapes import ShapesDataset
from m3i.data.webdataset import write_shards
from tests.tiny import TINY_M3I


def test_pretrain_on_webdataset_shards_and_resume(tmp_path, capsys):
    shards = write_shards(ShapesDataset("train", 48, 32), str(tmp_path / "shard-%06d.tar"), 16)
    assert len(shards) == 3
    spec = f"wds:{tmp_path}/shard-{{000000..000002}}.tar"
    run = tmp_path / "run"
    sets = [*TINY_M3I, "train.batch_size=8", "train.steps=6", "train.log_every=2"]
    sets += ["train.checkpoint_every=3", "monitor.every=0", "data.workers=2"]
    args = ["pretrain", "--quiet", "--data", spec, "--out", str(run)]
    assert main([*args, *[f"--set={s}" for s in sets]]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    assert all(r["loss/category"] > 0 and r["loss/text"] > 0 for r in records)  # cls and txt read
    err = capsys.readouterr().err
    assert "no final evaluation" in err and "no usable val split" in err
    assert (run / "backbone.safetensors").is_file()
    assert main(["pretrain", "--quiet", "--resume", str(run), "--set=train.steps=8"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6, 8]
