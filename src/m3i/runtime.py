"""The runtime floor: device choice, the process group (join, leave, rank, world size), the
collectives (gathers with and without gradient, sums, rank 0's decision), SyncBatchNorm and
intra-op thread settings. It imports nothing of this package; anything may import it."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_functional
from torch import nn

log = logging.getLogger("m3i.runtime")
ModuleT = TypeVar("ModuleT", bound=nn.Module)


class DeviceError(ValueError):
    """The asked-for device is not there; the message is one line saying what would work."""


def pick_device(name: str, key: str = "train.device") -> torch.device:
    """The device called `name` (auto: a GPU when one is visible, else the CPU); `key` is the
    setting that chose it, named in the error when it asks for a missing GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"{key}=cuda but no CUDA device is visible; use {key}=cpu")
    return torch.device(name)


@contextlib.contextmanager
def intra_op_threads(count: int | None) -> Iterator[None]:
    """Run the block with `count` intra-op threads (None: unchanged).

    Augmenting one small image is far slower on several threads than on one, so views made
    in the main process (data.workers=0) are made single-threaded, as DataLoader workers are.
    """
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (same shape on every rank) from all ranks along dim 0, keeping gradients.

    Gradients flow back to each rank's own slice, so a contrastive loss over the global batch
    backpropagates as if it had been computed on one process.
    """
    if world_size() == 1:
        return x
    return torch.cat(dist_functional.all_gather(x.contiguous()), dim=0)


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `x` (same shape on every rank) over all ranks, without gradient."""
    if world_size() == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (same shape on every rank) from all ranks along dim 0, without gradient
    (MoCo's keys: `torch.distributed.all_gather`)."""
    if world_size() == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def sync_batch_norm(model: ModuleT, device: torch.device) -> ModuleT:
    """Under torch.distributed, BatchNorm over the global batch, as BYOL and MoCo v3 train.

    On GPUs every BatchNorm layer becomes torch's SyncBatchNorm (in place; `model` is returned).
    torch's SyncBatchNorm needs a GPU (its forward raises on CPU tensors), so on CPU ranks
    (gloo) BatchNorm stays per rank: each rank normalises with its own batch's statistics, a
    run on R ranks x B differs from one process x R*B, and a warning says so.
    """
    has_batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if world_size() == 1 or not has_batch_norm:
        return model
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    log.warning(
        "BatchNorm normalises per rank on CPU (torch's SyncBatchNorm needs a GPU): these "
        "%d ranks do not train as one process with the %d-fold batch",
        world_size(),
        world_size(),
    )
    return model


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def launched_by_torchrun() -> bool:
    """Whether torchrun (or srun with the same variables) started several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device_name: str, timeout_s: int) -> torch.device:
    """Join the process group when launched by torchrun (NCCL on GPUs, gloo on CPUs) and pick
    this rank's device; a rank that does not hear from the others in `timeout_s` fails."""
    cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if launched_by_torchrun() and not is_distributed():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(
            backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s)
        )
    if cuda:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def teardown() -> None:
    if launched_by_torchrun() and is_distributed():
        dist.destroy_process_group()


def device() -> torch.device:
    """The device collectives run on: this rank's GPU with NCCL, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def from_rank0(value: Any) -> Any:
    """Rank 0's `value` (any picklable object) on every rank, so that all ranks act on one
    decision; the value itself without a process group."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=device())
    return box[0]


def any_rank(flag: bool) -> bool:
    """Whether `flag` holds on any rank, so that all ranks take the same decision."""
    if not is_distributed():
        return flag
    value = torch.tensor([float(flag)], device=device())
    dist.all_reduce(value)
    return bool(value.item())


def lost_peer(err: BaseException) -> bool:
    """Whether an error says another rank dropped its connection or timed out (NCCL's and the
    store's DistError, gloo's transport errors) rather than a bug in this rank's step."""
    text = str(err)
    return is_distributed() and (
        isinstance(err, dist.DistError) or "gloo" in text or "timed out" in text.lower()
    )
