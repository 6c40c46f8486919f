"""One optimizer step (`OptimizerStep`): micro-batches, autocast, gradient scaling, clipping,
non-finite skips.

Gradient accumulation (`train.accum_steps`) splits each batch into equal micro-batches and
averages their gradients. Each micro-batch is a complete M3I step of its own: images are mixed
with partners of the same micro-batch, and contrastive targets (text, view_contrast) take their
negatives from the micro-batch (gathered over all ranks), exactly as a run with batch_size /
accum_steps per step would, with the optimizer stepping once per accum_steps of them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from timm.optim import create_optimizer_v2

from m3i import runtime
from m3i.config import TrainConfig
from m3i.data.batch import Batch
from m3i.train.logged_means import finite_mean

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def build_optimizer(
    model: torch.nn.Module, cfg: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    """timm's AdamW (no weight decay on biases, norms and what `model.no_weight_decay()` names)
    with the multi-tensor kernel the device runs best: fused on CUDA (one kernel launch for all
    parameters), foreach (one call per group of tensors, not a Python loop) elsewhere."""
    kernel = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return create_optimizer_v2(
        model, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay, **kernel
    )


@dataclass
class StepResult:
    loss: torch.Tensor  # mean over micro-batches, detached
    monitors: dict[str, torch.Tensor]
    skipped: str | None = None  # why the optimizer did not step
    fatal: bool = True  # whether a skip counts towards train.max_bad_steps


class OptimizerStep:
    """Runs `forward(batch) -> (loss, monitors)` over micro-batches and steps the optimizer."""

    def __init__(
        self,
        model: torch.nn.Module,
        forward: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        cfg: TrainConfig,
        device: torch.device,
    ) -> None:
        self.model, self.forward, self.optimizer, self.cfg = model, forward, optimizer, cfg
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")

    def _autocast(self):
        if self.cfg.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=DTYPES[self.cfg.precision])

    def __call__(self, batch: Batch) -> StepResult:
        parts = batch.split(self.cfg.accum_steps)
        self.optimizer.zero_grad(set_to_none=True)
        losses, monitors = [], {}
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            no_sync = getattr(self.forward, "no_sync", None)
            sync = contextlib.nullcontext() if last or no_sync is None else no_sync()
            with sync:
                with self._autocast():
                    loss, part_monitors = self.forward(part)
                # backward even when non-finite: every rank must join the gradient all-reduce
                self.scaler.scale(loss / len(parts)).backward()
            losses.append(loss.detach())
            for key, value in part_monitors.items():
                monitors.setdefault(key, []).append(value.detach())
        loss = torch.stack(losses).mean()
        monitors = {key: finite_mean(values) for key, values in monitors.items()}
        if runtime.any_rank(not torch.isfinite(loss)):
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(loss, monitors, f"non-finite loss {loss.item()} (on some rank)")
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        if not torch.isfinite(grad_norm):
            if self.scaler.is_enabled():  # fp16 overflow: the scaler skips and lowers its scale
                self.scaler.step(self.optimizer)
                self.scaler.update()
                why = f"fp16 gradient overflow (scale now {self.scaler.get_scale():g})"
                return StepResult(loss, monitors, why, fatal=False)
            return StepResult(loss, monitors, f"non-finite gradient norm {grad_norm.item()}")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return StepResult(loss, monitors)
