"""The trainer: `setup` builds a run (data, model, optimiser, schedule, resume state, metrics,
monitor) and `Trainer.run` steps it to the end. It knows no target."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.scheduler import CosineLRScheduler
from tqdm import tqdm

from m3i import runtime
from m3i.config import Config, dump_yaml, to_dict
from m3i.data.base import DataError
from m3i.data.batch import Batch
from m3i.data.stream import SourceDraws
from m3i.errors import first_line
from m3i.io import atomic_write_text
from m3i.method import M3IModel
from m3i.mi.targets import TARGETS
from m3i.models.backbone import Backbone
from m3i.models.pretrained import init_state
from m3i.provenance import run_start
from m3i.train import sharding
from m3i.train.batches import training_source, training_stream, verify_files
from m3i.train.build import build_model, mask_seed, seed_everything
from m3i.train.checkpoint import check_resumable, load_checkpoint, save_run, set_rng_state
from m3i.train.input_rate import watch_input_rate
from m3i.train.logged_means import mean_over_ranks
from m3i.train.metrics import MetricsLog, open_wandb
from m3i.train.monitors import TrainingMonitor
from m3i.train.optimizer_step import OptimizerStep, StepResult, build_optimizer
from m3i.train.stopping import (
    TrainingError,
    TrainingStopped,
    record_skip,
    should_stop,
    stop_signals,
)

log = logging.getLogger("m3i.train")


@dataclass
class Trainer:
    """A run set up to step: what `setup` built and `run` uses."""

    cfg: Config
    out_dir: Path
    model: M3IModel
    optimizer_step: OptimizerStep
    scheduler: CosineLRScheduler
    stream: Iterator[Batch]  # this rank's batches from step start + 1 on
    draws: SourceDraws  # which source each sample of every global batch is drawn from
    drawn_before: np.ndarray  # samples drawn from each source before step 1 (earlier stages)
    skipped: int  # unreadable samples skipped (all ranks, before a resume included), counted
    metrics: MetricsLog
    monitor: TrainingMonitor | None  # rank 0's collapse monitors and online kNN, if any
    full: Backbone | None  # under FSDP, an unsharded copy of the backbone for the monitors
    start: int  # the steps already done (resumed from a checkpoint), else 0
    progress: bool
    skipped_here: int = 0  # this rank's skips not yet in `skipped`

    def count_skipped(self) -> int:
        """`skipped` with every rank's skips since the last count (all ranks call it)."""
        here = torch.tensor(self.skipped_here, device=runtime.device())  # NCCL: a GPU tensor
        self.skipped += int(runtime.sum_over_ranks(here))
        self.skipped_here = 0
        return self.skipped

    def run(self) -> Path:
        """Step from `start` to train.steps: steps, schedules, logs, checkpoints, signals."""
        cfg, model, steps = self.cfg, self.model, self.cfg.train.steps
        bar = tqdm(
            range(self.start + 1, steps + 1),
            initial=self.start,
            total=steps,
            disable=not (self.progress and runtime.rank() == 0),
            desc=cfg.preset,
            dynamic_ncols=True,
        )
        bad_in_a_row, seen, tick = 0, 0, time.perf_counter()
        model.train()
        with stop_signals() as received, self.metrics:
            for step in bar:
                every = cfg.monitor.every
                monitor_now = bool(every) and (step % every == 0 or step == steps)
                logged = monitor_now or step % cfg.train.log_every == 0 or step == steps
                model.measure_information = logged  # the Gaussian estimates only when logged
                batch = next(self.stream)
                self.skipped_here += batch.skipped
                result = self.optimizer_step(batch)
                self.scheduler.step_update(step)
                if result.skipped:
                    bad_in_a_row += result.fatal
                    limit = cfg.train.max_bad_steps
                    record_skip(self.metrics, step, result.skipped, bad_in_a_row, limit)
                else:
                    bad_in_a_row = 0
                    model.after_optimizer_step()
                    momentum = cfg.teacher.momentum_at(step, steps)
                    model.momentum_update(momentum)
                    seen += len(batch) * runtime.world_size()
                if not result.skipped and logged:
                    speed = seen / max(time.perf_counter() - tick, 1e-9)
                    bar.set_postfix(self.log(step, result, momentum, speed, monitor_now))
                    seen, tick = 0, time.perf_counter()
                if should_stop(received):
                    self.save(step, final=False)
                    raise TrainingStopped(
                        f"stopped by signal at step {step}; checkpoint written; continue with "
                        f"`m3i pretrain --resume {self.out_dir}`"
                    )
                if step % cfg.train.checkpoint_every == 0 and step != steps:
                    self.save(step, final=False)
            self.save(steps, final=True)
        if runtime.is_distributed():
            torch.distributed.barrier()  # rank 0's files exist before any rank goes on
        return self.out_dir

    def save(self, step: int, final: bool) -> None:
        """The run's files at `step` (every rank calls it)."""
        skipped = self.count_skipped()
        save_run(self.model, self.optimizer_step, self.cfg, step, self.out_dir, final, skipped)

    def data_record(self, step: int) -> dict[str, int]:
        """`data/samples/K`: samples drawn from source K by steps 1..step (all ranks);
        `data/skipped`: unreadable samples skipped so far (every rank calls it)."""
        drawn = self.draws.counts_before(self.cfg.train.first_batch + step) - self.drawn_before
        record = {f"data/samples/{k}": int(n) for k, n in enumerate(drawn)}
        return {**record, "data/skipped": self.count_skipped()}

    def log(
        self, step: int, result: StepResult, momentum: float, img_per_s: float, monitor_now: bool
    ) -> dict[str, str]:
        """Write a step's record (means over ranks; the monitors' figures when due); return
        the progress bar's short form of it."""
        loss, monitors = mean_over_ranks(result.loss, result.monitors)
        record: dict[str, Any] = {
            "step": step,
            "loss": loss,
            "lr": self.optimizer_step.optimizer.param_groups[0]["lr"],
            "momentum": momentum,
            "img_per_s": img_per_s,
        }
        record.update(monitors)
        record.update(self.data_record(step))
        if monitor_now:
            backbone = sharding.monitored_backbone(self.model, self.cfg, self.full)
            if self.monitor is not None:  # rank 0 only
                record.update(self.monitor(backbone))
        self.metrics.write(record)
        return {
            k.split("/")[-1]: f"{v:.3g}"
            for k, v in record.items()
            if k == "loss" or k.startswith("mi/") or k == "monitor/knn_top1"
        }


def training_monitor(cfg: Config, device: torch.device) -> TrainingMonitor | None:
    """Rank 0's monitors when monitor.every asks for them and the data allows (else a warning)."""
    if not cfg.monitor.every or runtime.rank() != 0:
        return None
    try:
        return TrainingMonitor(cfg, device)
    except DataError as err:
        log.warning("no training monitors: %s; or give them monitor.data", err)
        return None


def distribute(
    model: M3IModel, cfg: Config, device: torch.device, monitored: bool
) -> tuple[torch.nn.Module, Backbone | None]:
    """The module the step calls (sharded in place under FSDP, DDP-wrapped under torchrun) and,
    under FSDP with monitors, an unsharded backbone for them."""
    if sharding.is_sharded(cfg):
        sharding.shard(model)
        return model, Backbone(cfg.model).to(device) if monitored else None
    if runtime.is_distributed():
        ids = [device.index] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids), None
    return model, None


def cosine_schedule(optimizer: torch.optim.Optimizer, cfg: Config) -> CosineLRScheduler:
    """Warm-up from train.min_lr to train.lr, then a cosine back to min_lr, stepped per step."""
    steps = cfg.train.steps
    return CosineLRScheduler(
        optimizer,
        t_initial=max(steps, 2),  # steps >= 2 as given; below, t_initial 1 only makes timm warn
        lr_min=cfg.train.min_lr,
        warmup_t=min(cfg.train.warmup_steps, steps),
        warmup_lr_init=cfg.train.min_lr,
        t_in_epochs=False,
    )


def load_state(
    state: dict[str, Any], model: M3IModel, optimizer_step: OptimizerStep, cfg: Config
) -> int:
    """Model, optimiser and gradient scaler from a checkpoint; the step it was taken at."""
    if sharding.is_sharded(cfg):
        sharding.load_full_state(model, optimizer_step.optimizer, state)
    else:
        model.load_state_dict(state["model"])
        optimizer_step.optimizer.load_state_dict(state["optimizer"])
    optimizer_step.scaler.load_state_dict(state["scaler"])
    return state["step"]


def write_run_files(model: M3IModel, cfg: Config, out_dir: Path) -> None:
    """config.yaml and what each target saves for a later reader (e.g. tokenizer.json)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "config.yaml", dump_yaml(cfg))
    for name, target in model.targets.items():
        if TARGETS[name].save is not None:
            TARGETS[name].save(target, out_dir)


def record_start(out_dir: Path, resume: bool) -> None:
    """provenance.json: {"starts": [...]}, this start's m3i.provenance.run_start appended to
    the earlier ones of a resumed run (rewritten whole, atomically)."""
    path, starts = out_dir / "provenance.json", []
    if resume and path.is_file():
        try:
            starts = list(json.loads(path.read_text())["starts"])
        except (ValueError, KeyError, TypeError) as err:
            raise TrainingError(
                f"{path} is not a run provenance ({type(err).__name__}: {err}); delete it to resume"
            ) from None
    starts.append(run_start(runtime.world_size()))
    atomic_write_text(path, json.dumps({"starts": starts}, indent=1) + "\n")


def setup(
    cfg: Config, out_dir: Path, progress: bool, resume: bool, device: torch.device
) -> Trainer:
    """Build a run, or rebuild it from its checkpoint (`resume`), with every rank's RNG where
    the run left it."""
    main = runtime.rank() == 0
    state = load_checkpoint(out_dir) if resume else None
    if state is not None:
        check_resumable(state["config"], to_dict(cfg))
    seed_everything(cfg.train.seed)  # the same initial weights on every rank
    init = init_state(cfg.init, cfg.model) if cfg.init and state is None else None
    mixture = training_source(cfg, out_dir)  # the streams' scans, made once
    if main and len(mixture.sources) > 1:
        log.info("data: %s", mixture.describe())
    model = runtime.sync_batch_norm(build_model(cfg, mixture, init).to(device), device)
    verify_files(cfg, mixture, out_dir, progress=progress and main)  # after the data checks
    monitor = training_monitor(cfg, device)
    forward, full = distribute(model, cfg, device, monitored=monitor is not None)
    optimizer = build_optimizer(model, cfg.train, device)
    if cfg.train.compile:
        forward = torch.compile(forward)
    optimizer_step = OptimizerStep(model, forward, optimizer, cfg.train, device)
    scheduler = cosine_schedule(optimizer, cfg)  # before loading: it adds initial_lr to groups
    start = load_state(state, model, optimizer_step, cfg) if state is not None else 0
    if main:
        write_run_files(model, cfg, out_dir)
        record_start(out_dir, resume)
    wandb = open_wandb(out_dir, cfg.monitor, to_dict(cfg)) if main and cfg.monitor.wandb else None
    metrics = MetricsLog(out_dir, cfg.monitor.tensorboard, main, start or None, wandb)
    with metrics.closed_on_failure():
        batches = training_stream(cfg, mixture, start, device)
        stream: Iterator[Batch] = batches
        if main:  # one warning line if the input cannot keep up with the step
            stream = watch_input_rate(batches, cfg.train.batch_size, cfg.data.workers)
        skipped = state.get("data_skipped", 0) if state is not None else 0
        seed_everything(mask_seed(cfg.train.seed, runtime.rank(), cfg.train.first_batch))
        if state is not None:
            scheduler.step_update(start)
            rngs = state["rng"]
            if len(rngs) == runtime.world_size():
                set_rng_state(rngs[runtime.rank()])
            else:
                log.warning("resuming on %d ranks from %d: RNG streams restart",
                            runtime.world_size(), len(rngs))  # fmt: skip
        elif cfg.monitor.every:
            backbone = sharding.monitored_backbone(model, cfg, full)
            if monitor is not None:
                metrics.write({"step": 0, **monitor(backbone)})
    return Trainer(
        cfg, out_dir, model, optimizer_step, scheduler, stream, batches.draws,
        batches.draws.counts_before(cfg.train.first_batch), skipped, metrics,
        monitor, full, start, progress,
    )  # fmt: skip


def train_one(cfg: Config, out_dir: Path, progress: bool = True, resume: bool = False) -> Path:
    """One single-stage run (the process group, if any, stays up for the caller)."""
    device = runtime.setup(cfg.train.device, cfg.train.dist_timeout)
    try:
        return setup(cfg, out_dir, progress, resume, device).run()
    except RuntimeError as err:
        if not runtime.lost_peer(err):
            raise
        first = first_line(err)
        raise TrainingError(
            f"rank {runtime.rank()}: a collective failed ({first}): another rank died or did "
            f"not answer within train.dist_timeout={cfg.train.dist_timeout}s; see its log"
        ) from err
