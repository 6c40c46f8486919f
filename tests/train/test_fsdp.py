"""The m3i preset on 2 gloo processes: FSDP2 (`train.strategy=fsdp`) logs the losses of DDP, a
sharded run resumed from its gathered checkpoint trains the weights of a resumed DDP run, and
the two ranks draw different mix positions."""

import json
import os
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from m3i.config import load_config
from m3i.data import mixing
from m3i.train.pretrain import pretrain
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


# (strategy, steps, resume): 4 steps each, then both resumed to 6
RUNS = [("ddp", 4, False), ("fsdp", 4, False), ("fsdp", 6, True), ("ddp", 6, True)]


def spy_on_mix_positions() -> list[torch.Tensor]:
    """Record image A's positions of every mix drawn in this process, wherever the step
    imported `split_positions` from."""
    original, drawn = mixing.split_positions, []

    def recording(*args, **kwargs):
        pos_a, pos_b = original(*args, **kwargs)
        drawn.append(pos_a.clone())
        return pos_a, pos_b

    for module in list(sys.modules.values()):
        if module.__name__.startswith("m3i") and vars(module).get("split_positions") is original:
            module.split_positions = recording
    return drawn


def worker(rank: int, ports: list[int], root: Path) -> None:
    torch.set_num_threads(1)
    env = dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    drawn = spy_on_mix_positions()
    for (strategy, steps, resume), port in zip(RUNS, ports, strict=True):
        os.environ.update(env, MASTER_PORT=str(port))
        drawn.clear()
        cfg = load_config(
            "m3i", overrides=RUN + [f"train.strategy={strategy}", f"train.steps={steps}"]
        )
        pretrain(cfg, root / strategy, progress=False, resume=resume)
        if not resume:
            torch.save(list(drawn), root / f"{strategy}-masks-rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fsdp")
    mp.spawn(worker, args=(free_ports(len(RUNS)), root), nprocs=2, join=True)
    return root


def records(run: Path) -> dict[int, dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


def test_fsdp_logs_the_losses_of_ddp(runs):
    ddp, fsdp = records(runs / "ddp"), records(runs / "fsdp")
    for step in (1, 2, 3, 4):
        assert fsdp[step]["loss"] == pytest.approx(ddp[step]["loss"], rel=1e-5, abs=1e-5), step
    assert fsdp[2]["monitor/knn_top1"] == pytest.approx(ddp[2]["monitor/knn_top1"])


load = partial(torch.load, weights_only=True)


def assert_close_to_update(
    mine: torch.Tensor, reference: torch.Tensor, before: torch.Tensor, name: str
) -> None:
    """`mine` is within a tenth of the update that took `before` to `reference`."""
    update = (reference - before).norm()
    assert (mine - reference).norm() <= 0.1 * update, (name, (mine - reference).norm(), update)


def test_fsdp_resumed_from_its_gathered_checkpoint_trains_as_resumed_ddp(runs):
    """Steps 5 and 6 after the resume: the losses and the weights of DDP, resumed alike."""
    ddp, fsdp = records(runs / "ddp"), records(runs / "fsdp")
    assert sorted(fsdp) == sorted(ddp) == [0, 1, 2, 3, 4, 5, 6]
    for step in (5, 6):
        assert fsdp[step]["loss"] == pytest.approx(ddp[step]["loss"], rel=1e-5, abs=1e-5), step
    state, reference = load(runs / "fsdp" / "checkpoint.pt"), load(runs / "ddp" / "checkpoint.pt")
    assert state["step"] == reference["step"] == 6 and len(state["rng"]) == 2
    assert state["model"].keys() == reference["model"].keys()
    # Adam moves a weight whose gradient is near its eps by a noise-sensitive fraction of lr
    # (tests/train/test_ddp.py): compare to the size of the two steps' update
    before = load(runs / "ddp" / "checkpoints" / "step-00000004.pt")["model"]
    for name, value in reference["model"].items():
        assert_close_to_update(state["model"][name], value, before[name], name)
    exported = {run: load_file(runs / run / "backbone.safetensors") for run in ("ddp", "fsdp")}
    assert exported["fsdp"].keys() == exported["ddp"].keys()  # plain timm state dicts
    for key, value in exported["ddp"].items():
        assert_close_to_update(exported["fsdp"][key], value, before[f"backbone.vit.{key}"], key)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_ranks_draw_different_mix_positions(runs, strategy):
    """Each rank seeds its own mask RNG: the same step mixes different positions on each."""
    rank0, rank1 = (load(runs / f"{strategy}-masks-rank{rank}.pt") for rank in (0, 1))
    assert len(rank0) == len(rank1) == 4, "one mix per step: did the step stop drawing it?"
    for step, (mine, theirs) in enumerate(zip(rank0, rank1, strict=True), start=1):
        assert mine.shape == theirs.shape, step
        assert not torch.equal(mine, theirs), f"step {step}: both ranks mixed the same positions"


CONVNET = ["model.name=convnext_atto", "model.img_size=32", "model.patch_size=8"]


def convnet_worker(rank: int, ports: list[int], root: Path) -> None:
    torch.set_num_threads(1)
    env = dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    for strategy, port in zip(("ddp", "fsdp"), ports, strict=True):
        os.environ.update(env, MASTER_PORT=str(port))
        overrides = RUN + CONVNET + [f"train.strategy={strategy}", "train.steps=2"]
        pretrain(load_config("m3i", overrides=overrides), root / strategy, progress=False)


def test_fsdp_shards_a_convnet_as_ddp_trains_it(tmp_path):
    """The ConvNet's blocks sharded: the losses of DDP, and an export of the same timm keys."""
    mp.spawn(convnet_worker, args=(free_ports(2), tmp_path), nprocs=2, join=True)
    ddp, fsdp = records(tmp_path / "ddp"), records(tmp_path / "fsdp")
    for step in (1, 2):
        assert fsdp[step]["loss"] == pytest.approx(ddp[step]["loss"], rel=1e-5, abs=1e-5), step
    assert fsdp[2]["monitor/knn_top1"] == pytest.approx(ddp[2]["monitor/knn_top1"])
    exported = {run: load_file(tmp_path / run / "backbone.safetensors") for run in ("ddp", "fsdp")}
    assert exported["fsdp"].keys() == exported["ddp"].keys()
    assert "stages.3.blocks.0.conv_dw.weight" in exported["fsdp"]
    for key, value in exported["ddp"].items():
        torch.testing.assert_close(exported["fsdp"][key], value, atol=1e-4, rtol=1e-3, msg=key)
