"""FSDP2 (`train.strategy=fsdp`): shard every backbone block, student and EMA teacher alike,
and the rest of the model as one root group, across the ranks of a torchrun launch.

Teacher and student parameters are sharded the same way (dim 0 over all ranks), so the EMA
update is an element-wise lerp of local shards with no communication. Full (unsharded) state
dicts are gathered for checkpoints, the exported backbone and the rank-0 monitors.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

from m3i import runtime
from m3i.config import Config
from m3i.method import M3IModel
from m3i.models.backbone import Backbone
from m3i.models.minilm import LockedMiniLM
from m3i.models.open_clip_text import LockedTextTower

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
BACKBONE = "backbone."  # then the name of its one child, the timm model


def shard(model: M3IModel) -> None:
    """Apply fully_shard to each backbone block, then to the whole model; a locked text tower
    is left whole on every rank (it never trains, so it needs no gathering of gradients)."""
    backbones = [model.backbone] + ([model.teacher.module] if model.teacher is not None else [])
    for backbone in backbones:
        for block in backbone.blocks():
            fully_shard(block)
    towers = (LockedMiniLM, LockedTextTower)
    locked = {p for m in model.modules() if isinstance(m, towers) for p in m.parameters()}
    fully_shard(model, ignored_params=locked)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded model state on rank 0 (empty elsewhere); every rank must call it."""
    return get_model_state_dict(model, options=FULL)


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return get_optimizer_state_dict(model, optimizer, options=FULL)


def load_full_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load an unsharded checkpoint into the sharded model and optimizer (every rank)."""
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, state["model"], options=options)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)


def backbone_state(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The timm backbone's entries of a full M3IModel state dict (`backbone.<child>.` removed:
    a Backbone's only child is its timm model)."""
    return {k.split(".", 2)[2]: v for k, v in model_state.items() if k.startswith(BACKBONE)}


def is_sharded(cfg: Config) -> bool:
    return cfg.train.strategy == "fsdp" and runtime.is_distributed()


def monitored_backbone(model: M3IModel, cfg: Config, full: Backbone | None) -> Backbone:
    """The backbone the monitors read; under FSDP its gathered copy `full` (every rank calls)."""
    if not is_sharded(cfg):
        return model.backbone
    state = full_model_state(model)
    if full is not None:
        full.timm_model.load_state_dict(backbone_state(state))
    return full
