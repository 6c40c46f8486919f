"""A run's model, built from its config and its training data, and the seeds of its draws. It
knows no target: each target says what it needs from the data (its spec's `prepare`)."""

from __future__ import annotations

import random

import numpy as np
import torch

from m3i.config import Config
from m3i.data.mixture import Mixture
from m3i.data.scan import Source
from m3i.method import M3IModel
from m3i.mi.targets import TARGETS, DataInfo, RunContext
from m3i.train.stopping import TrainingError

MASK_SEED_STRIDE = 1_000_003  # more than any number of ranks


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
