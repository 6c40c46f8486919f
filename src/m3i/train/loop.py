"""The training loop: data, optimiser, schedules, logging, checkpoints. It knows no target."""

from __future__ import annotations

import contextlib
import logging
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from tqdm import tqdm

from m3i import runtime
from m3i.config import Config, dump_yaml, to_dict
from m3i.data.base import DataError, ImageSource
from m3i.data.webdataset import WebDatasetStream
from m3i.io import atomic_write_text
from m3i.mi.targets import TARGETS, DataInfo, RunContext
from m3i.models.backbone import Backbone
from m3i.models.ema import momentum_at
from m3i.train import sharding
from m3i.train.batches import training_source, training_stream
from m3i.train.checkpoint import (
    check_resumable,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from m3i.train.metrics import MetricsLog
from m3i.train.monitors import TrainingMonitor
from m3i.train.optimise import Optimise
from m3i.train.step import M3IModel

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


def target_run_context(cfg: Config, source: ImageSource | WebDatasetStream) -> RunContext:
    """What the active targets take from the training data (each spec's `prepare`), after
    each has checked that the data has what it needs."""
    data = DataInfo(cfg.data.spec, source)
    given = {"num_classes": len(data.classes)}
    for name, section in cfg.active_targets().items():
        spec = TARGETS[name]
        problem = spec.check_data(section, data)
        if problem:
            raise TrainingError(problem)
        given.update(spec.prepare(section, data))
    return RunContext(**given)


def build_model(cfg: Config, source: ImageSource | WebDatasetStream) -> M3IModel:
    model = M3IModel(cfg, target_run_context(cfg, source))
    if cfg.init:
        model.backbone.load(cfg.init)
        if model.teacher is not None:
            model.teacher.module.load_state_dict(model.backbone.state_dict())
    model.backbone.grad_checkpointing = cfg.train.grad_checkpointing
    return model


def save_run(
    model: M3IModel, optimise: Optimise, cfg: Config, step: int, out_dir: Path, final: bool
) -> None:
    """backbone.safetensors (timm state dict) and a checkpoint (everything to resume), written
    by rank 0 with every rank's RNG state; every rank calls it (sharded states are gathered)."""
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
    model.backbone.save(out_dir / "backbone.safetensors", backbone)
    state = {
        "step": step,
        "final": final,
        "config": to_dict(cfg),
        "model": model_state,
        "optimizer": optimizer_state,
        "scaler": optimise.scaler.state_dict(),
        "rng": rngs,
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
    """Collect SIGTERM/SIGINT instead of dying mid-step (handlers only in the main thread)."""
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


def mean_over_ranks(
    loss: torch.Tensor, monitors: dict[str, torch.Tensor]
) -> tuple[float, dict[str, float]]:
    """The logged loss and monitors: means over ranks (each rank's are over its own batch)."""
    values = torch.stack([loss.detach().float(), *(v.detach().float() for v in monitors.values())])
    if runtime.is_distributed():
        torch.distributed.all_reduce(values)
        values /= runtime.world_size()
    loss_value, *rest = values.tolist()
    return loss_value, dict(zip(monitors, rest, strict=True))


def should_stop(received: list[int]) -> bool:
    """Whether any rank received a stop signal (all ranks agree, so they stop together)."""
    return runtime.any_rank(bool(received))


def train_one(cfg: Config, out_dir: Path, progress: bool = True, resume: bool = False) -> Path:
    """One single-stage run (the process group, if any, stays up for the caller)."""
    device = runtime.setup(cfg.train.device, cfg.train.dist_timeout)
    try:
        return _train(cfg, out_dir, progress, resume, device)
    except RuntimeError as err:
        if not runtime.lost_peer(err):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TrainingError(
            f"rank {runtime.rank()}: a collective failed ({first}): another rank died or did "
            f"not answer within train.dist_timeout={cfg.train.dist_timeout}s; see its log"
        ) from err


def _train(cfg: Config, out_dir: Path, progress: bool, resume: bool, device: torch.device) -> Path:
    main = runtime.rank() == 0
    state = load_checkpoint(out_dir) if resume else None
    if state is not None:
        check_resumable(state["config"], to_dict(cfg))
    seed_everything(cfg.train.seed)  # the same initial weights on every rank
    source = training_source(cfg)
    model = runtime.sync_batch_norm(build_model(cfg, source).to(device), device)
    if cfg.data.verify and isinstance(source, ImageSource):  # corrupt files: now, not mid-run
        source.verify(progress=progress and main)
    monitor = None
    if cfg.monitor.every and main:
        try:
            monitor = TrainingMonitor(cfg, device)
        except DataError as err:
            log.warning("no training monitors: %s", err)
    forward: torch.nn.Module = model
    full = None  # under FSDP, an unsharded copy of the backbone for rank 0's monitors
    if sharding.is_sharded(cfg):
        sharding.shard(model)
        full = Backbone(cfg.model).to(device) if monitor is not None else None
    elif runtime.is_distributed():
        ids = [device.index] if device.type == "cuda" else None
        forward = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    optimizer = create_optimizer_v2(
        model, opt="adamw", lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
    )
    if cfg.train.compile:
        forward = torch.compile(forward)
    optimise = Optimise(model, forward, optimizer, cfg.train, device)
    steps = cfg.train.steps
    scheduler = CosineLRScheduler(  # before loading: it adds initial_lr to the groups
        optimizer,
        t_initial=max(steps, 2),  # steps >= 2 as given; below, t_initial 1 only makes timm warn
        lr_min=cfg.train.min_lr,
        warmup_t=min(cfg.train.warmup_steps, steps),
        warmup_lr_init=cfg.train.min_lr,
        t_in_epochs=False,
    )
    start = 0
    if state is not None:
        if sharding.is_sharded(cfg):
            sharding.load_full_state(model, optimizer, state)
        else:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        optimise.scaler.load_state_dict(state["scaler"])
        start = state["step"]
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.yaml", dump_yaml(cfg))
        for name, target in model.targets.items():
            if TARGETS[name].save is not None:
                TARGETS[name].save(target, out_dir)
    metrics = MetricsLog(out_dir, cfg.monitor.tensorboard, enabled=main, resume_step=start or None)
    stream = training_stream(cfg, source, start, device)
    seed_everything(mask_seed(cfg.train.seed, runtime.rank(), cfg.train.first_batch))
    if state is not None:
        scheduler.step_update(start)
        rngs = state["rng"]
        if len(rngs) == runtime.world_size():
            set_rng_state(rngs[runtime.rank()])
        else:
            log.warning(
                "resuming on %d ranks from %d: RNG streams restart",
                runtime.world_size(),
                len(rngs),
            )
    elif cfg.monitor.every:
        backbone = sharding.monitored_backbone(model, cfg, full)
        if monitor is not None:
            metrics.write({"step": 0, **monitor(backbone)})
    bad_in_a_row, seen, tick = 0, 0, time.perf_counter()
    bar = tqdm(
        range(start + 1, steps + 1),
        initial=start,
        total=steps,
        disable=not (progress and main),
        desc=cfg.preset,
        dynamic_ncols=True,
    )
    model.train()
    with stop_signals() as received, contextlib.closing(metrics):
        for step in bar:
            every = cfg.monitor.every
            monitor_now = bool(every) and (step % every == 0 or step == steps)
            logged = monitor_now or step % cfg.train.log_every == 0 or step == steps
            model.measure_information = logged  # the Gaussian estimates only when logged
            batch = next(stream)
            result = optimise(batch)
            scheduler.step_update(step)
            if result.skipped:
                bad_in_a_row += result.fatal
                record_skip(metrics, step, result.skipped, bad_in_a_row, cfg.train.max_bad_steps)
            else:
                bad_in_a_row = 0
                model.after_optimizer_step()
                momentum = momentum_at(
                    step, steps, cfg.teacher.momentum, cfg.teacher.momentum_final
                )
                model.momentum_update(momentum)
                seen += len(batch) * runtime.world_size()
            if not result.skipped and logged:
                elapsed = time.perf_counter() - tick
                loss, monitors = mean_over_ranks(result.loss, result.monitors)
                record = {
                    "step": step,
                    "loss": loss,
                    "lr": optimizer.param_groups[0]["lr"],
                    "momentum": momentum,
                    "img_per_s": seen / max(elapsed, 1e-9),
                }
                record.update(monitors)
                if monitor_now:
                    backbone = sharding.monitored_backbone(model, cfg, full)
                    if monitor is not None:  # rank 0 only
                        record.update(monitor(backbone))
                metrics.write(record)
                bar.set_postfix(
                    {
                        k.split("/")[-1]: f"{v:.3g}"
                        for k, v in record.items()
                        if k == "loss" or k.startswith("mi/") or k == "monitor/knn_top1"
                    }
                )
                seen, tick = 0, time.perf_counter()
            if should_stop(received):
                save_run(model, optimise, cfg, step, out_dir, final=False)
                raise TrainingStopped(
                    f"stopped by signal at step {step}; checkpoint written; continue with "
                    f"`m3i pretrain --resume {out_dir}`"
                )
            if step % cfg.train.checkpoint_every == 0 and step != steps:
                save_run(model, optimise, cfg, step, out_dir, final=False)
        save_run(model, optimise, cfg, steps, out_dir, final=True)
    if runtime.is_distributed():
        torch.distributed.barrier()  # rank 0's files exist before any rank goes on
    return out_dir
