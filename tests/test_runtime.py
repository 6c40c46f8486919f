"""The runtime floor. Contrastive targets use the global batch: 2 gloo processes x B equal
1 process x 2B; BatchNorm under torch.distributed: SyncBatchNorm on GPUs, per rank (with a
warning) on CPUs; the device choice and the thread setting."""

import logging
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from m3i.mi.posteriors import symmetric_infonce
from m3i.mi.targets import RunContext
from m3i.mi.targets.view_contrast import ViewContrastTarget, ViewContrastTargetConfig
from m3i.models.ema import MomentumTeacher
from m3i.runtime import (
    DeviceError,
    gather_with_grad,
    intra_op_threads,
    pick_device,
    sync_batch_norm,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def features(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(6, 8, generator=g), dim=-1), F.normalize(
        torch.randn(6, 8, generator=g), dim=-1
    )


def moco() -> ViewContrastTarget:
    cfg = ViewContrastTargetConfig(weight=1.0, embed_dim=8, hidden_dim=8, temperature=0.2)
    return ViewContrastTarget(cfg, RunContext(8))


def projector_and_teacher() -> nn.ModuleDict:
    student = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()  # modes must survive
    return nn.ModuleDict(
        {"student": student, "teacher": MomentumTeacher(student, batch_statistics=True)}
    )


def batch_norm_conversions() -> tuple[list[str], str, list[tuple[str, bool]], bool]:
    """On CPU: what stays and what is logged; as for a GPU: what each BatchNorm becomes."""
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("m3i.runtime").addHandler(handler)
    on_cpu = sync_batch_norm(projector_and_teacher(), torch.device("cpu"))
    cpu_types = [type(m).__name__ for m in on_cpu.modules() if "Norm" in type(m).__name__]
    model = projector_and_teacher()
    weight = model["student"][1].weight
    on_gpu = sync_batch_norm(model, torch.device("cuda"))  # converts; nothing runs on a GPU
    gpu = [(type(m).__name__, m.training) for m in on_gpu.modules() if "Norm" in type(m).__name__]
    return cpu_types, " ".join(messages), gpu, on_gpu["student"][1].weight is weight


def worker(rank: int, port: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    a, b = features()
    local_a = a[3 * rank : 3 * rank + 3].clone().requires_grad_(True)
    local_b = b[3 * rank : 3 * rank + 3].clone().requires_grad_(True)
    clip = symmetric_infonce(10.0 * gather_with_grad(local_a) @ gather_with_grad(local_b).t())
    # MoCo v3: this rank's queries against the keys of both ranks, gathered without gradient
    contrast = moco().direction(local_a, local_b, torch.arange(3), True)
    (clip.loss + contrast.loss).backward()
    results[rank] = (
        clip.loss.item(),
        contrast.loss.item(),
        contrast.mi.item(),
        local_a.grad.clone(),
        local_b.grad.clone(),
        batch_norm_conversions(),
    )
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks() -> dict:
    results = mp.Manager().dict()
    mp.spawn(worker, args=(free_port(), results), nprocs=2, join=True)
    return dict(results)


def test_two_processes_equal_one_process_with_the_doubled_batch(ranks):
    a, b = features()
    a.requires_grad_(True)
    b.requires_grad_(True)
    clip = symmetric_infonce(10.0 * a @ b.t()).loss
    contrast = moco().direction(a, b.detach(), torch.arange(6), True)
    (clip + contrast.loss).backward()
    # each rank's MoCo loss is the mean over its own queries: the ranks' mean is the global one
    assert abs(sum(ranks[r][1] for r in range(2)) / 2 - contrast.loss.item()) < 1e-5
    assert abs(sum(ranks[r][2] for r in range(2)) / 2 - contrast.mi.item()) < 1e-5
    ce = [ranks[r][1] / 0.4 for r in range(2)]  # K = 6 keys on each rank
    assert all(abs(ranks[r][2] - (math.log(6) - ce[r])) < 1e-5 for r in range(2))
    for rank in range(2):
        rank_clip, _, _, grad_a, grad_b, _ = ranks[rank]
        assert abs(rank_clip - clip.item()) < 1e-5
        # each rank backpropagates the global CLIP loss and its own MoCo queries; DDP's gradient
        # average divides by 2; no MoCo gradient reaches the keys (b's gradient is CLIP's)
        rows = slice(3 * rank, 3 * rank + 3)
        torch.testing.assert_close(grad_a / 2, a.grad[rows], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(grad_b / 2, b.grad[rows], atol=1e-6, rtol=1e-5)


def test_batch_norm_is_synchronised_on_gpus_and_per_rank_with_a_warning_on_cpus(ranks):
    cpu_types, warning, gpu, same_weight = ranks[0][5]
    assert cpu_types == ["BatchNorm1d", "BatchNorm1d"]  # torch's SyncBatchNorm needs a GPU
    assert "per rank" in warning and "SyncBatchNorm" in warning
    # the EMA copy's BatchNorm keeps normalising with (now global) batch statistics
    assert gpu == [("SyncBatchNorm", False), ("SyncBatchNorm", True)]
    assert same_weight  # the optimizer's parameters are the ones the SyncBatchNorm uses


def test_pick_device_names_the_setting_that_asked_for_a_missing_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    assert pick_device("cpu", "device") == torch.device("cpu")
    with pytest.raises(DeviceError) as raised:
        pick_device("cuda", "--device")
    assert str(raised.value) == "--device=cuda but no CUDA device is visible; use --device=cpu"


def test_intra_op_threads_holds_inside_the_block_and_restores_after():
    before = torch.get_num_threads()
    with intra_op_threads(before + 1):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before
    with intra_op_threads(None):
        assert torch.get_num_threads() == before
    with pytest.raises(KeyError), intra_op_threads(before + 1):
        raise KeyError("the block fails")
    assert torch.get_num_threads() == before
