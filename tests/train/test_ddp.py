"""`pretrain` on 2 gloo processes x batch B trains as 1 process x 2B, and only rank 0 writes."""

import json
import os
import socket
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from m3i.config import load_config
from m3i.train.pretrain import pretrain
from tests.mixture_data import plain_images
from tests.tiny import TINY_M3I

PRESETS = ["clip", "supervised", "mixture"]  # mix.ratio 1.0: no random masks, so the ranks'
# seeds agree. "mixture": clip on shapes and plain images drawn at equal weights (every rank
# reads its own slots of the global batch; the text target learns from the captioned ones)
# byol and moco (mix.ratio 1.0 too) are left out: their heads' BatchNorm normalises per rank on
# CPU ranks (torch's SyncBatchNorm needs a GPU; `runtime.sync_batch_norm` warns), so there
# 2 ranks x B are not 1 process x 2B. Their key gather is checked in tests/test_runtime.py.
B = 8  # per rank


def overrides(batch_size: int) -> list[str]:
    return TINY_M3I + [
        f"train.batch_size={batch_size}",
        "train.steps=3",
        "train.warmup_steps=0",  # the full lr from step 1: later steps show the update
        "train.grad_clip=0",  # a clipped gradient would hide its scale from Adam's moments
        "train.log_every=1",
        "train.checkpoint_every=2",  # an intermediate save gathers every rank's RNG state
        "train.device=cpu",
        "data.num_train=64",
        "monitor.every=0",
        "monitor.tensorboard=false",
    ]


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def config(preset: str, batch_size: int, root: Path):
    if preset != "mixture":
        return load_config(preset, overrides=overrides(batch_size))
    mixture = [f"data.spec=[shapes,images:{root / 'plain'}]", "data.weights=[1,1]"]
    return load_config("clip", overrides=[*overrides(batch_size), *mixture])


def run_dir(root: Path, preset: str, rank: int) -> Path:
    """Each rank gets its own out_dir, so that whatever rank 1 writes is seen."""
    return root / f"ddp-{preset}-rank{rank}"


def worker(rank: int, ports: list[int], root: Path) -> None:
    torch.set_num_threads(1)  # as tests/conftest.py: 2 processes on 2 cores
    for preset, port in zip(PRESETS, ports, strict=True):
        os.environ.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        pretrain(config(preset, B, root), run_dir(root, preset, rank), progress=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Both presets on 2 gloo ranks x B, then on 1 process x 2B (in `single-<preset>`)."""
    root = tmp_path_factory.mktemp("ddp")
    plain_images(root / "plain", 64)
    mp.spawn(worker, args=(free_ports(len(PRESETS)), root), nprocs=2, join=True)
    with pytest.MonkeyPatch.context() as patch:
        for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
            patch.delenv(name, raising=False)
        for preset in PRESETS:
            pretrain(config(preset, 2 * B, root), root / f"single-{preset}", progress=False)
    return root


def losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    return [r["loss"] for r in records]


def files(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*")}


@pytest.mark.parametrize("preset", PRESETS)
def test_two_ranks_log_the_losses_of_one_process_with_the_doubled_batch(runs, preset):
    """Step 1 checks the loss over the global batch; steps 2 and 3, the averaged update."""
    ddp, single = losses(run_dir(runs, preset, 0)), losses(runs / f"single-{preset}")
    assert ddp[0] == pytest.approx(single[0], rel=1e-5, abs=1e-5)
    assert ddp[1:] == pytest.approx(single[1:], rel=1e-4, abs=1e-4)
    assert len(set(single)) == 3  # the steps do change the model


def relative_error(mine: torch.Tensor, reference: torch.Tensor) -> float:
    return ((mine - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("preset", PRESETS)
def test_two_ranks_train_the_weights_and_optimizer_state_of_one_process(runs, preset):
    """Adam's moments check DDP's gradient average (its update is blind to the gradient's scale:
    a sum over ranks instead of a mean would log the same losses)."""
    ddp, single = run_dir(runs, preset, 0), runs / f"single-{preset}"
    load = partial(torch.load, weights_only=True)
    ddp_state, single_state = load(ddp / "checkpoint.pt"), load(single / "checkpoint.pt")
    assert ddp_state["step"] == single_state["step"] == 3 and ddp_state["final"]
    assert len(ddp_state["rng"]) == 2 and len(single_state["rng"]) == 1
    moments = single_state["optimizer"]["state"]
    assert moments.keys() == ddp_state["optimizer"]["state"].keys()
    for index, state in moments.items():
        mine = ddp_state["optimizer"]["state"][index]
        errors = (
            relative_error(mine["exp_avg"], state["exp_avg"]),
            # the root of the second moment has the scale of the gradient
            relative_error(mine["exp_avg_sq"].sqrt(), state["exp_avg_sq"].sqrt()),
        )
        assert max(errors) < 1e-3, (index, errors)
    # Adam moves a weight whose gradient is near its eps by a noise-sensitive fraction of lr, so
    # the weights are compared to the size of the last step's update
    before = load(single / "checkpoints" / "step-00000002.pt")["model"]
    for name, value in single_state["model"].items():
        kept = without_key_bias(name, value)
        update = (value - before[name])[kept].norm()
        assert (ddp_state["model"][name] - value)[kept].norm() <= 0.1 * update, name


def without_key_bias(name: str, value: torch.Tensor) -> torch.Tensor:
    """All entries, but the key third of an attention block's qkv bias: its true gradient is 0
    (q . b_k is the same for every key, and the softmax ignores a constant), so Adam turns its
    rounding noise into steps of about lr that differ between any two summation orders."""
    kept = torch.ones_like(value, dtype=torch.bool)
    if name.endswith("attn.qkv.bias"):
        third = len(value) // 3
        kept[third : 2 * third] = False
    return kept


@pytest.mark.parametrize("preset", PRESETS)
def test_only_rank_0_writes(runs, preset):
    expected = {
        "config.yaml",
        "metrics.jsonl",
        "backbone.safetensors",
        "config.json",  # with model.safetensors: the run as a timm local-dir
        "model.safetensors",
        "provenance.json",
        "checkpoint.pt",
        "checkpoints",
        "checkpoints/step-00000002.pt",
        "checkpoints/step-00000003.pt",
    }
    if preset in ("clip", "mixture"):
        expected.add("tokenizer.json")
    if preset == "mixture":
        expected.add("data_scan.json")  # the plain images, checked by the two ranks in shares
    assert files(run_dir(runs, preset, 0)) == expected
    assert files(runs / f"single-{preset}") == expected
    assert not run_dir(runs, preset, 1).exists()
