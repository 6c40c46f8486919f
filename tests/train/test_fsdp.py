"""FSDP2 (`train.strategy=fsdp`) on 2 gloo processes: the same losses as DDP, the same weights
exported, and a sharded run resumes from its gathered checkpoint."""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from m3i.config import load_config
from m3i.train.loop import pretrain
from tests.tiny import TINY_M3I
from tests.train.test_ddp import free_ports

RUN = TINY_M3I + [
    "train.batch_size=8",
    "train.steps=4",
    "train.log_every=1",
    "train.checkpoint_every=2",
    "train.device=cpu",
    "data.num_train=64",
    "monitor.every=2",  # the rank-0 monitors read a gathered copy of the sharded backbone
    "monitor.knn_train=32",
    "monitor.knn_val=16",
    "monitor.tensorboard=false",
]


def worker(rank: int, ports: list[int], root: Path) -> None:
    torch.set_num_threads(1)
    env = dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    for strategy, port in zip(("ddp", "fsdp"), ports[:2], strict=True):
        os.environ.update(env, MASTER_PORT=str(port))
        cfg = load_config("m3i", overrides=RUN + [f"train.strategy={strategy}"])
        pretrain(cfg, root / strategy, progress=False)
    os.environ.update(env, MASTER_PORT=str(ports[2]))
    more = RUN + ["train.strategy=fsdp", "train.steps=6"]
    pretrain(load_config("m3i", overrides=more), root / "fsdp", progress=False, resume=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fsdp")
    mp.spawn(worker, args=(free_ports(3), root), nprocs=2, join=True)
    return root


def records(run: Path) -> dict[int, dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


def test_fsdp_logs_the_losses_of_ddp(runs):
    ddp, fsdp = records(runs / "ddp"), records(runs / "fsdp")
    for step in (1, 2, 3, 4):
        assert fsdp[step]["loss"] == pytest.approx(ddp[step]["loss"], rel=1e-5, abs=1e-5), step
    assert fsdp[2]["monitor/knn_top1"] == pytest.approx(ddp[2]["monitor/knn_top1"])


def test_fsdp_resumed_from_its_gathered_checkpoint(runs):
    fsdp = records(runs / "fsdp")
    assert sorted(fsdp) == [0, 1, 2, 3, 4, 5, 6]
    state = torch.load(runs / "fsdp" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 6 and len(state["rng"]) == 2
    backbone = load_file(runs / "fsdp" / "backbone.safetensors")
    for key, value in backbone.items():  # a plain, full timm state dict, equal to the model's
        assert torch.equal(value, state["model"][f"backbone.vit.{key}"]), key
