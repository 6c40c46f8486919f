"""Contrastive targets use the global batch: 2 gloo processes x B equal 1 process x 2B."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from m3i.mi.posteriors import nt_xent, symmetric_infonce
from m3i.train.distributed import gather_with_grad


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def features(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(6, 8, generator=g), dim=-1), F.normalize(
        torch.randn(6, 8, generator=g), dim=-1
    )


def losses(a, b):
    return symmetric_infonce(10.0 * a @ b.t()).loss, nt_xent(a, b, 0.2).loss


def worker(rank: int, port: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    a, b = features()
    local_a = a[3 * rank : 3 * rank + 3].clone().requires_grad_(True)
    local_b = b[3 * rank : 3 * rank + 3].clone().requires_grad_(True)
    clip, ntx = losses(gather_with_grad(local_a), gather_with_grad(local_b))
    (clip + ntx).backward()
    results[rank] = (clip.item(), ntx.item(), local_a.grad.clone(), local_b.grad.clone())
    dist.destroy_process_group()


def test_two_processes_equal_one_process_with_the_doubled_batch():
    a, b = features()
    a.requires_grad_(True)
    b.requires_grad_(True)
    clip, ntx = losses(a, b)
    (clip + ntx).backward()
    results = mp.Manager().dict()
    mp.spawn(worker, args=(free_port(), results), nprocs=2, join=True)
    for rank in range(2):
        rank_clip, rank_ntx, grad_a, grad_b = results[rank]
        assert abs(rank_clip - clip.item()) < 1e-5 and abs(rank_ntx - ntx.item()) < 1e-5
        # each rank backpropagates the global loss; DDP's gradient average divides by 2
        rows = slice(3 * rank, 3 * rank + 3)
        torch.testing.assert_close(grad_a / 2, a.grad[rows], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(grad_b / 2, b.grad[rows], atol=1e-6, rtol=1e-5)
