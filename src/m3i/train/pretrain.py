"""`m3i pretrain`: check the run directory, join the process group, run one stage or several."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from m3i import runtime
from m3i.config import Config
from m3i.train import rundir
from m3i.train.metrics import require_wandb
from m3i.train.stages import run_stages, stage_configs
from m3i.train.stopping import TrainingError
from m3i.train.trainer import train_one


def pretrain(
    cfg: Config,
    out_dir: str | Path,
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    started: Callable[[], None] | None = None,
) -> Path:
    """Run a pre-training config into out_dir (continuing its checkpoint when `resume`; a new or
    empty directory otherwise, or one holding only a run that `overwrite` removes); under
    torchrun, join the process group for the whole run, stages included. `started` is called on
    rank 0 once out_dir is accepted, before any work."""
    out_dir = Path(out_dir)
    if cfg.stages and resume:
        raise TrainingError("--resume of a multistage run is not supported; resume its stage")
    if cfg.stages:
        stage_configs(cfg)  # a stage that cannot run is refused here, before any work
    if cfg.monitor.wandb:
        require_wandb()  # a one-line error, before any work, when wandb is not installed
    runtime.pick_device(cfg.train.device)  # a clear error for cuda without a GPU
    runtime.setup(cfg.train.device, cfg.train.dist_timeout)
    created = not out_dir.exists()
    try:
        rundir.prepare(out_dir, resume, overwrite)
        if started is not None and runtime.rank() == 0:
            started()
        if cfg.stages:
            return run_stages(cfg, out_dir, progress)
        return train_one(cfg, out_dir, progress, resume)
    except BaseException:
        if created and runtime.rank() == 0:
            rundir.remove_if_empty(out_dir)
        raise
    finally:
        runtime.teardown()
