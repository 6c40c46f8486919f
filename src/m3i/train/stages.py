"""Multi-stage pre-training: a sequence of single-stage presets, each from the last backbone."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from m3i.config import Config, config_from_dict, dump_yaml, preset_values, to_dict
from m3i.io import append_jsonl, atomic_copy, atomic_write_text
from m3i.train import distributed

SHARED_SECTIONS = ("model", "views", "decoder", "data", "train", "monitor")


def stage_configs(cfg: Config) -> list[Config]:
    """Each stage: its preset's targets, mix and teacher; the run's model, data, views, decoder
    and train settings; an equal share of train.steps (the remainder goes to the last stage)."""
    shared = {k: v for k, v in to_dict(cfg).items() if k in SHARED_SECTIONS}
    share, rest = divmod(cfg.train.steps, len(cfg.stages))
    configs = []
    for index, name in enumerate(cfg.stages):
        values = preset_values(name)
        values.update(copy.deepcopy(shared))
        values["train"]["steps"] = share + (rest if index == len(cfg.stages) - 1 else 0)
        values["init"] = cfg.init
        configs.append(config_from_dict(values))
    return configs


def run_stages(cfg: Config, out_dir: Path, progress: bool = True) -> Path:
    """Run the stages under out_dir/stages/, then publish the last backbone as the run's."""
    from m3i.train.loop import train_one

    main = distributed.rank() == 0  # under torchrun only rank 0 writes
    out_dir.mkdir(parents=True, exist_ok=True)
    if main:
        atomic_write_text(out_dir / "config.yaml", dump_yaml(cfg))
        atomic_write_text(out_dir / "metrics.jsonl", "")
    offset, previous = 0, None
    for index, stage_cfg in enumerate(stage_configs(cfg)):
        if previous is not None:
            stage_cfg.init = str(previous / "backbone.safetensors")
        stage_dir = out_dir / "stages" / f"{index}-{stage_cfg.preset}"
        train_one(stage_cfg, stage_dir, progress)
        for line in (stage_dir / "metrics.jsonl").read_text().splitlines() if main else []:
            record = json.loads(line)
            record.update(step=record["step"] + offset, stage=stage_cfg.preset)
            append_jsonl(out_dir / "metrics.jsonl", record)
        offset += stage_cfg.train.steps
        previous = stage_dir
    for name in ("backbone.safetensors", "checkpoint.pt", "tokenizer.json"):
        if main and (previous / name).exists():
            atomic_copy(previous / name, out_dir / name)
    return out_dir
