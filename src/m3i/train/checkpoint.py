"""Checkpoints that a killed run resumes from exactly: write, keep the last K, find, check.

A checkpoint holds the model (with its EMA teacher and EMA projectors), the optimizer, the
gradient scaler, the step, the config and every RNG state. The position in the data stream is
a function of the step (batches are drawn from seeded permutations), so the step restores it.
Files are written to a temporary name and renamed: `checkpoints/step-00000800.pt`, and
`checkpoint.pt` as a hard link to the newest one.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m3i import runtime
from m3i.config import Config, ConfigError, flat_keys, to_dict
from m3i.io import atomic_torch_save, atomic_write
from m3i.method import M3IModel
from m3i.models.timm_dir import save_backbone_files
from m3i.train import sharding
from m3i.train.optimizer_step import OptimizerStep

log = logging.getLogger("m3i.train")
HISTORY = "checkpoints"
LATEST = "checkpoint.pt"
# keys a resumed run may change: the step budget and how the run is logged, saved and fed
RESUMABLE = (
    "train.steps",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.device",
    "train.dist_timeout",
    "data.workers",
    "data.verify",
    "data.max_corrupt_fraction",
    "monitor.",
)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit the config; the message is one line."""


def rng_state() -> dict[str, Any]:
    """Every RNG the step draws from, as tensors and plain values (weights_only-loadable)."""
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": [torch.from_numpy(numpy_state[1].astype(np.int64)), *map(float, numpy_state[2:])],
        "python": list(random.getstate()[1]) + [random.getstate()[2]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(
        ("MT19937", keys.numpy().astype(np.uint32), int(pos), int(has_gauss), gauss)
    )
    *internal, gauss_next = state["python"]
    random.setstate((3, tuple(int(v) for v in internal), gauss_next))


def history(out_dir: Path) -> list[Path]:
    """The kept checkpoints, oldest first."""
    return sorted((out_dir / HISTORY).glob("step-*.pt"))


def save_checkpoint(state: dict[str, Any], out_dir: Path, keep: int) -> Path:
    """Write checkpoints/step-N.pt, point checkpoint.pt at it, delete all but the last `keep`."""
    path = out_dir / HISTORY / f"step-{state['step']:08d}.pt"
    atomic_torch_save(state, path)

    def link(tmp: str) -> None:
        os.unlink(tmp)
        os.link(path, tmp)

    atomic_write(out_dir / LATEST, link)
    for old in history(out_dir)[:-keep]:
        old.unlink()
    return path


def _read(path: Path) -> tuple[dict[str, Any] | None, str]:
    """A checkpoint's state (weights_only: nothing arbitrary unpickled), or None and why not."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True), ""
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        return None, f"{path} is corrupt or truncated ({type(err).__name__})"


def load_checkpoint(out_dir: Path) -> dict[str, Any]:
    """The newest intact checkpoint of a run directory: checkpoint.pt, else (when a kill left it
    missing or half-written) the newest readable checkpoints/step-N.pt, said in one line."""
    latest = out_dir / LATEST
    older = list(reversed(history(out_dir)))
    if latest.is_file():
        older = [p for p in older if not p.samefile(latest)]
        state, why = _read(latest)
        if state is not None:
            return state
        problems = [why]
    else:
        problems = [f"{latest} is missing"]
    for path in older:
        state, why = _read(path)
        if state is not None:
            if runtime.rank() == 0:
                log.warning("%s; resuming from %s, the newest intact checkpoint", problems[0], path)
            return state
        problems.append(why)
    if not older and not latest.is_file():
        raise CheckpointError(
            f"{out_dir} has no checkpoint to resume from (no {LATEST}, nothing in {HISTORY}/); "
            "start it again with --overwrite"
        )
    raise CheckpointError(
        f"{'; '.join(problems)}; no intact checkpoint is kept: start the run again with --overwrite"
    )


def check_resumable(saved: dict[str, Any], new: dict[str, Any]) -> None:
    """Refuse to resume under a config that changed anything but the step budget and logging.
    A key added to the schema since the checkpoint was written counts as its default there."""
    old, now = flat_keys(to_dict(Config())) | flat_keys(saved), flat_keys(new)
    changed = sorted(
        key
        for key in old.keys() | now.keys()
        if old.get(key) != now.get(key) and not key.startswith(RESUMABLE)
    )
    if changed:
        raise ConfigError(
            f"cannot resume: the config changed {', '.join(changed)} since the checkpoint; "
            "only train.steps and logging/checkpoint/monitor settings may change"
        )


def save_run(
    model: M3IModel,
    optimizer_step: OptimizerStep,
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
    optimizer = optimizer_step.optimizer
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
        "scaler": optimizer_step.scaler.state_dict(),
        "rng": rngs,
        "data_skipped": skipped,
    }
    save_checkpoint(state, out_dir, cfg.train.keep_checkpoints)
