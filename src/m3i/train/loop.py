"""The training loop: data, optimiser, schedules, logging, checkpoints. It knows no target."""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from tqdm import tqdm

from m3i.config import Config, dump_yaml, to_dict
from m3i.data.sources import ImageSource, open_source
from m3i.data.views import ViewConfig, ViewDataset
from m3i.io import atomic_torch_save, atomic_write_text
from m3i.models.ema import momentum_at
from m3i.models.text import load_tokenizer, train_bpe
from m3i.train.metrics import MetricsLog
from m3i.train.monitors import TrainingMonitor
from m3i.train.step import M3IModel

log = logging.getLogger("m3i.train")


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite losses in a row)."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def view_config(cfg: Config) -> ViewConfig:
    v = cfg.views
    return ViewConfig(
        size=cfg.model.img_size,
        scale=(v.scale_min, v.scale_max),
        flip=v.flip,
        color_jitter=v.color_jitter,
        hue=v.hue,
        grayscale=v.grayscale,
    )


def build_tokenizer(cfg: Config, source: ImageSource, out_dir: Path):
    """Train (or load) the text tokenizer and save it with the run as tokenizer.json."""
    text = cfg.targets.text
    if text.tokenizer == "bpe":
        captions = source.captions()
        if not captions:
            raise TrainingError(
                f"targets.text needs captions, and data {cfg.data.spec!r} has none; "
                "set targets.text.weight=0 or use data with captions (shapes, captions:FILE)"
            )
        tokenizer = train_bpe(captions, text.vocab_size)
    else:
        tokenizer = load_tokenizer(text.tokenizer)
    atomic_write_text(out_dir / "tokenizer.json", tokenizer.to_str())
    return tokenizer


def build_model(cfg: Config, source: ImageSource, out_dir: Path) -> M3IModel:
    num_classes = len(source.classes) if source.classes else 0
    if cfg.targets.category.weight != 0 and num_classes == 0:
        raise TrainingError(
            f"targets.category needs labels, and data {cfg.data.spec!r} has none; "
            "set targets.category.weight=0 or use labelled data"
        )
    tokenizer = build_tokenizer(cfg, source, out_dir) if cfg.targets.text.weight != 0 else None
    model = M3IModel(cfg, num_classes=num_classes, tokenizer=tokenizer)
    if cfg.init:
        model.backbone.vit.load_state_dict(load_file(cfg.init))
        if model.teacher is not None:
            model.teacher.module.load_state_dict(model.backbone.state_dict())
    return model


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


def batches(
    dataset: ViewDataset, batch_size: int, seed: int, workers: int, device: torch.device
) -> Iterator[dict[str, Any]]:
    """An endless stream of batches: a fresh seeded shuffle each epoch."""
    batch_size = min(batch_size, len(dataset))
    threads = 1 if workers == 0 else None
    epoch = 0
    while True:
        dataset.epoch = epoch
        order = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        loader = iter(
            torch.utils.data.DataLoader(
                dataset,
                batch_size=batch_size,
                sampler=torch.utils.data.RandomSampler(dataset, generator=order),
                drop_last=True,
                num_workers=workers,
            )
        )
        while True:
            with intra_op_threads(threads):
                batch = next(loader, None)
            if batch is None:
                break
            yield {
                k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in batch.items()
            }
        epoch += 1


def save_run(
    model: M3IModel, optimizer: torch.optim.Optimizer, cfg: Config, step: int, out_dir: Path
) -> None:
    """backbone.safetensors (timm state dict) and checkpoint.pt (everything to resume)."""
    model.backbone.save(out_dir / "backbone.safetensors")
    state = {
        "step": step,
        "config": to_dict(cfg),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng_cpu": torch.get_rng_state(),
    }
    atomic_torch_save(state, out_dir / "checkpoint.pt")


def optimise(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor, grad_clip: float
) -> str | None:
    """Backward, clip and step; returns why the step was skipped (non-finite), else None."""
    if not torch.isfinite(loss):
        return f"non-finite loss {loss.item()}"
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clip = grad_clip if grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    if not torch.isfinite(grad_norm):
        return f"non-finite gradient norm {grad_norm.item()}"
    optimizer.step()
    return None


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


def pretrain(cfg: Config, out_dir: str | Path, progress: bool = True) -> Path:
    """Run a pre-training config into out_dir; returns out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.stages:
        from m3i.train.stages import run_stages

        return run_stages(cfg, out_dir, progress)
    seed_everything(cfg.train.seed)
    device = pick_device(cfg.train.device)
    source = open_source(
        cfg.data.spec,
        "train",
        num_samples=cfg.data.num_train,
        image_size=cfg.data.image_size,
        seed=cfg.data.seed,
    )
    model = build_model(cfg, source, out_dir).to(device)
    monitor = TrainingMonitor(cfg, device) if cfg.monitor.every else None
    atomic_write_text(out_dir / "config.yaml", dump_yaml(cfg))
    metrics = MetricsLog(out_dir, cfg.monitor.tensorboard)
    optimizer = create_optimizer_v2(
        model, opt="adamw", lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
    )
    steps = cfg.train.steps
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=max(steps, 1),
        lr_min=cfg.train.min_lr,
        warmup_t=min(cfg.train.warmup_steps, steps),
        warmup_lr_init=cfg.train.min_lr,
        t_in_epochs=False,
    )
    dataset = ViewDataset(source, view_config(cfg), seed=cfg.train.seed)
    stream = batches(dataset, cfg.train.batch_size, cfg.train.seed, cfg.data.workers, device)
    if monitor is not None:
        metrics.write({"step": 0, **monitor(model.backbone)})
    bad_in_a_row, seen, tick = 0, 0, time.perf_counter()
    bar = tqdm(range(1, steps + 1), disable=not progress, desc=cfg.preset, dynamic_ncols=True)
    model.train()
    for step in bar:
        batch = next(stream)
        loss, monitors = model(batch)
        skipped = optimise(model, optimizer, loss, cfg.train.grad_clip)
        scheduler.step_update(step)
        if skipped:
            bad_in_a_row += 1
            record_skip(metrics, step, skipped, bad_in_a_row, cfg.train.max_bad_steps)
            continue
        bad_in_a_row = 0
        momentum = momentum_at(step, steps, cfg.teacher.momentum, cfg.teacher.momentum_final)
        model.momentum_update(momentum)
        seen += batch["view1"].shape[0]
        monitor_now = monitor is not None and (step % cfg.monitor.every == 0 or step == steps)
        if monitor_now or step % cfg.train.log_every == 0 or step == steps:
            elapsed = time.perf_counter() - tick
            record = {
                "step": step,
                "loss": loss.item(),
                "lr": optimizer.param_groups[0]["lr"],
                "momentum": momentum,
                "img_per_s": seen / max(elapsed, 1e-9),
            }
            record.update({k: v.item() for k, v in monitors.items()})
            if monitor_now:
                record.update(monitor(model.backbone))
            metrics.write(record)
            bar.set_postfix(
                {
                    k.split("/")[-1]: f"{v:.3g}"
                    for k, v in record.items()
                    if k == "loss" or k.startswith("mi/") or k == "monitor/knn_top1"
                }
            )
            seen, tick = 0, time.perf_counter()
        if step % cfg.train.checkpoint_every == 0 and step != steps:
            save_run(model, optimizer, cfg, step, out_dir)
    save_run(model, optimizer, cfg, steps, out_dir)
    metrics.close()
    return out_dir
