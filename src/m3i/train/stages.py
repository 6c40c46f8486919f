"""Multi-stage pre-training: a sequence of stages, each from the last backbone.

A stage is a single-stage preset (`data2vec`) or `PRESET:TARGET` (`m3i:intra_view`): that
preset with every target's weight but TARGET's set to 0, all else (target definitions, mix,
teacher, decoder) the preset's own. `multistage` runs M3I's four targets so, one stage each:
it differs from M3I only in staging; `multistage_classic` runs the classic presets in sequence.

What each stage takes from the multistage run:
- `views`, `data`, `train` and `monitor`, and the backbone (`model.name`, `img_size`,
  `patch_size`, `depth`: one backbone passes from stage to stage): the run's, as they are, except
  `train.steps` (the stage's own: `stage_steps[i]`, or an equal split of train.steps with the
  remainder to the last stage), `train.warmup_steps` (scaled with the stage's length:
  round(train.warmup_steps * stage steps / train.steps)) and `train.first_batch`.
- One data stream across the stages: stage i starts at the global batch number where stage
  i - 1 ended (`train.first_batch`), so the stages read the batches a single run of
  train.steps reads, in the same order, and none replays another's; each stage also draws its
  own masks (the loop seeds them from the first batch). A `wds:` stream is reseeded at each
  stage's first batch, as a resumed run's is.
- `targets`, `mix`, `teacher`, `decoder` (the objective's heads, e.g. SiameseIM's projector
  and predictor) and the other `model` keys (e.g. MoCo v3's and SiameseIM's
  `freeze_patch_embed`): each stage's own, plus every key of these sections that the run
  sets to a value other than the default (e.g. `teacher.momentum`, `mix.isolate`,
  `targets.text.width`, `decoder.dim`), which reaches every stage (a stage whose targets do
  not read it ignores it). Keys that say which objective a stage is, `targets.<name>.weight` and
  `mix.ratio`, differ from stage to stage: setting them on a multistage run is refused
  (choose the stages' presets with `stages`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from m3i import runtime
from m3i.config import (
    Config,
    ConfigError,
    config_from_dict,
    dump_yaml,
    flat_keys,
    preset_values,
    to_dict,
)
from m3i.io import append_jsonl, atomic_copy, atomic_write_text
from m3i.mi.targets import TARGETS
from m3i.models.timm_dir import TIMM_DIR_FILES
from m3i.train.trainer import train_one

SHARED_SECTIONS = ("views", "data", "train", "monitor")
BACKBONE_KEYS = ("name", "img_size", "patch_size", "depth")  # of `model`, shared as well
# from each stage's preset, plus the run's changes
STAGE_SECTIONS = ("targets", "mix", "teacher", "decoder", "model")


def _is_per_stage(key: str) -> bool:
    """Keys that say which objective a stage is: each stage's preset sets its own."""
    return key == "mix.ratio" or (key.startswith("targets.") and key.endswith(".weight"))


def stage_overrides(cfg: Config) -> dict[str, Any]:
    """The run's keys of STAGE_SECTIONS that differ from the defaults, which every stage gets;
    ConfigError for a per-stage key (a target's weight, mix.ratio)."""
    defaults = flat_keys({s: v for s, v in to_dict(Config()).items() if s in STAGE_SECTIONS})
    run = flat_keys({s: v for s, v in to_dict(cfg).items() if s in STAGE_SECTIONS})
    changed = {key: value for key, value in run.items() if value != defaults[key]}
    for key in changed:
        if _is_per_stage(key):
            raise ConfigError(
                f"{key} cannot be set on a multistage run: each stage takes it from its own "
                f"preset; choose the presets with stages=[...] (now {cfg.stages})"
            )
    return changed


def _set(values: dict[str, Any], key: str, value: Any) -> None:
    *sections, name = key.split(".")
    for section in sections:
        values = values.setdefault(section, {})
    values[name] = value


def stage_values(stage: str) -> dict[str, Any]:
    """The preset values of one stage: `PRESET` as it is, or `PRESET:TARGET`, that preset with
    every target's weight but TARGET's set to 0 (the stage's name is its `preset`)."""
    name, _, target = stage.partition(":")
    values = preset_values(name)
    if target:
        targets = values.setdefault("targets", {})
        for other in TARGETS:
            if other != target:
                targets.setdefault(other, {})["weight"] = 0.0
        values.update(preset=stage, description=f"{name} with its {target} target alone")
    return values


def stage_steps(cfg: Config) -> list[int]:
    """Steps of each stage: `stage_steps`, or an equal split of train.steps (the remainder to
    the last stage)."""
    if cfg.stage_steps:
        return list(cfg.stage_steps)
    share, rest = divmod(cfg.train.steps, len(cfg.stages))
    return [share] * (len(cfg.stages) - 1) + [share + rest]


def stage_configs(cfg: Config) -> list[Config]:
    """The config of each stage (see the module docstring for what it takes from `cfg`); a
    stage that cannot run is a one-line ConfigError naming it."""
    overrides = stage_overrides(cfg)
    shared = {k: v for k, v in to_dict(cfg).items() if k in SHARED_SECTIONS}
    total, first = cfg.train.steps, cfg.train.first_batch
    configs = []
    for index, (name, steps) in enumerate(zip(cfg.stages, stage_steps(cfg), strict=True)):
        values = stage_values(name)
        values.update(copy.deepcopy(shared))
        for key, value in overrides.items():
            _set(values, key, value)
        values.setdefault("model", {}).update({k: getattr(cfg.model, k) for k in BACKBONE_KEYS})
        warmup = round(cfg.train.warmup_steps * steps / total) if total else 0
        values["train"].update(steps=steps, warmup_steps=warmup, first_batch=first)
        values["init"] = cfg.init
        try:
            configs.append(config_from_dict(values))
        except ConfigError as err:
            raise ConfigError(f"stage {index} ({name}) cannot run: {err}") from None
        first += steps
    return configs


def stage_dir_name(index: int, stage: str) -> str:
    """The run folder of a stage under stages/: its index and name (`1-m3i-inter_view`)."""
    return f"{index}-{stage.replace(':', '-')}"


def run_stages(cfg: Config, out_dir: Path, progress: bool = True) -> Path:
    """Run the stages under out_dir/stages/, then publish the last backbone as the run's."""
    configs = stage_configs(cfg)  # bad overrides fail here, before anything is written
    main = runtime.rank() == 0  # under torchrun only rank 0 writes
    out_dir.mkdir(parents=True, exist_ok=True)
    if main:
        atomic_write_text(out_dir / "config.yaml", dump_yaml(cfg))
        atomic_write_text(out_dir / "metrics.jsonl", "")
    offset, previous = 0, None
    for index, stage_cfg in enumerate(configs):
        if previous is not None:
            stage_cfg.init = str(previous / "backbone.safetensors")
        stage_dir = out_dir / "stages" / stage_dir_name(index, stage_cfg.preset)
        train_one(stage_cfg, stage_dir, progress)
        for line in (stage_dir / "metrics.jsonl").read_text().splitlines() if main else []:
            record = json.loads(line)
            record.update(step=record["step"] + offset, stage=stage_cfg.preset)
            append_jsonl(out_dir / "metrics.jsonl", record)
        offset += stage_cfg.train.steps
        previous = stage_dir
    for name in ("backbone.safetensors", *TIMM_DIR_FILES, "checkpoint.pt", "tokenizer.json"):
        if main and (previous / name).exists():
            atomic_copy(previous / name, out_dir / name)
    return out_dir
