"""The pieces of a training run that `m3i.train.trainer` assembles: seeding, the model from the
data, saving, skipped steps, stop signals, logged means. It knows no target."""

from __future__ import annotations

import contextlib
import logging
import random
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from m3i import runtime
from m3i.config import Config, to_dict
from m3i.data.mixture import Mixture
from m3i.data.scan import Source
from m3i.method import M3IModel
from m3i.mi.targets import TARGETS, DataInfo, RunContext
from m3i.models.timm_dir import save_backbone_files
from m3i.train import sharding
from m3i.train.checkpoint import (
    rng_state,
    save_checkpoint,
)
from m3i.train.metrics import MetricsLog
from m3i.train.optimise import Optimise

log = logging.getLogger("m3i.train")
MASK_SEED_STRIDE = 1_000_003  # more than any number of ranks


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite losses in a row)."""


class TrainingStopped(TrainingError):
    """SIGTERM (or SIGINT) arrived: the run saved a checkpoint at the end of its step."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def mask_seed(seed: int, rank: int, first_batch: int) -> int:
    """The seed of a rank's own draws (masks) in a run whose stream starts at global batch
    `first_batch`: each rank, and each stage of a multistage run, draws its own."""
    return seed + rank + MASK_SEED_STRIDE * first_batch


def target_run_context(cfg: Config, source: Mixture | Source) -> RunContext:
    """What the active targets take from the training data (a mixture, or one source: each
    spec's `prepare`), after each has checked that the data has what it needs."""
    mixture = source if isinstance(source, Mixture) else Mixture([source], [])
    data = DataInfo(cfg.data.spec, mixture)
    given = {"num_classes": len(data.classes)}
    for name, section in cfg.active_targets().items():
        spec = TARGETS[name]
        problem = spec.check_data(section, data)
        if problem:
            raise TrainingError(problem)
        given.update(spec.prepare(section, data))
    return RunContext(**given)


def build_model(
    cfg: Config, source: Mixture | Source, init: dict[str, torch.Tensor] | None = None
) -> M3IModel:
    """The model, its backbone (and teacher) starting from `init` (`init_state(cfg.init)`)."""
    model = M3IModel(cfg, target_run_context(cfg, source))
    if init is not None:
        model.backbone.timm_model.load_state_dict(init)
        if model.teacher is not None:
            model.teacher.module.load_state_dict(model.backbone.state_dict())
    model.backbone.grad_checkpointing = cfg.train.grad_checkpointing
    return model


def save_run(
    model: M3IModel,
    optimise: Optimise,
    cfg: Config,
    step: int,
    out_dir: Path,
    final: bool,
    skipped: int = 0,
) -> None:
    """The backbone's files (backbone.safetensors, a plain timm state dict, and the timm
    local-dir files: models/timm_dir.py) and a checkpoint (everything to resume, and the
    unreadable samples `skipped` so far), written by rank 0 with every rank's RNG state; every
    rank calls it (sharded states are gathered)."""
    rngs = [None] * runtime.world_size()
    if runtime.is_distributed():
        torch.distributed.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    sharded = sharding.is_sharded(cfg)
    model_state = sharding.full_model_state(model) if sharded else model.state_dict()
    optimizer = optimise.optimizer
    optimizer_state = (
        sharding.full_optimizer_state(model, optimizer) if sharded else optimizer.state_dict()
    )
    if runtime.rank() != 0:
        return
    backbone = sharding.backbone_state(model_state) if sharded else None
    save_backbone_files(model.backbone, out_dir, backbone)
    state = {
        "step": step,
        "final": final,
        "config": to_dict(cfg),
        "model": model_state,
        "optimizer": optimizer_state,
        "scaler": optimise.scaler.state_dict(),
        "rng": rngs,
        "data_skipped": skipped,
    }
    save_checkpoint(state, out_dir, cfg.train.keep_checkpoints)


def record_skip(metrics: MetricsLog, step: int, why: str, bad_in_a_row: int, max_bad: int) -> None:
    """Log a skipped step; stop the run after `max_bad` in a row."""
    metrics.write({"step": step, "skipped": why})
    log.warning("step %d skipped: %s", step, why)
    if bad_in_a_row >= max_bad:
        last = metrics.path.parent / "checkpoint.pt"
        where = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint yet"
        raise TrainingError(
            f"{bad_in_a_row} non-finite losses or gradients in a row (last at step {step}: "
            f"{why}); lower train.lr or check the data; {where}"
        )


@contextlib.contextmanager
def stop_signals() -> Iterator[list[int]]:
    """Collect SIGTERM/SIGINT instead of dying mid-step (handlers only in the main thread). A
    signal that is still unanswered when the block ends without an exception (it came after the
    loop's last look, e.g. during the final save) is sent again once the old handlers are back,
    so that it stops the process as it would have without the block."""
    received: list[int] = []
    before = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            before[sig] = signal.signal(sig, lambda number, _: received.append(number))
    try:
        yield received
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    if received:  # reached only when the block ended without an exception
        signal.raise_signal(received[0])


def mean_over_ranks(
    loss: torch.Tensor, monitors: dict[str, torch.Tensor]
) -> tuple[float, dict[str, float]]:
    """The logged loss and monitors: means over ranks (each rank's are over its own batch) of
    the ranks where they are finite (a target with no sample on a rank has a NaN figure there;
    NaN where no rank has one)."""
    values = torch.stack([loss.detach().float(), *(v.detach().float() for v in monitors.values())])
    finite = torch.isfinite(values)
    sums = torch.stack([torch.where(finite, values, 0.0), finite.float()])
    if runtime.is_distributed():
        torch.distributed.all_reduce(sums)
    loss_value, *rest = (sums[0] / sums[1]).tolist()
    return loss_value, dict(zip(monitors, rest, strict=True))


def should_stop(received: list[int]) -> bool:
    """Whether any rank received a stop signal (all ranks agree, so they stop together)."""
    return runtime.any_rank(bool(received))
