"""The ablation's compute: training FLOPs per step of each method, and the steps that give
every method the training FLOPs of M3I's run.

A step's FLOPs are counted once per distinct model (one real step's forward and backward on the
budget's data, `m3i.bench.measure.train_step_flops`) and cached: they depend on the model, the
targets, the mix, the batch size and the data, never on the seed or the step count.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from m3i.bench.measure import train_step_flops
from m3i.config import Config, to_dict
from m3i.train.stages import stage_configs, stage_steps

TOLERANCE = 0.05  # every trained run's FLOPs are within this share of M3I's
FLOP_SECTIONS = ("model", "mix", "teacher", "decoder", "targets", "data")


@dataclass
class StagePlan:
    """One stage of a run (a single-stage run has one): its preset, steps and FLOPs per step."""

    preset: str
    steps: int
    flops_per_step: int

    @property
    def train_flops(self) -> int:
        return self.steps * self.flops_per_step

    def record(self) -> dict[str, int | str]:
        return {**asdict(self), "train_flops": self.train_flops}


class FlopCounts:
    """FLOPs per training step of a config, counted once per distinct model and data."""

    def __init__(self) -> None:
        self.counted: dict[str, int] = {}

    def per_step(self, cfg: Config) -> int:
        values = to_dict(cfg)
        shape = {k: values[k] for k in FLOP_SECTIONS}
        shape["train"] = {k: values["train"][k] for k in ("batch_size", "grad_checkpointing")}
        key = json.dumps(shape, sort_keys=True)
        if key not in self.counted:
            self.counted[key] = train_step_flops(cfg)
        return self.counted[key]

    def stages(self, cfg: Config) -> list[tuple[str, int]]:
        """(preset, FLOPs per step) of each stage of `cfg` (one for a single-stage run)."""
        configs = stage_configs(cfg) if cfg.stages else [cfg]
        return [(c.preset, self.per_step(c)) for c in configs]


def matched_steps(budget_flops: int, flops_per_step: list[int]) -> list[int]:
    """Steps of each stage that give each stage an equal share of `budget_flops`; each stage's
    rounding is carried into the next, so the total is within half a step of the last stage."""
    steps, spent = [], 0
    for done, per_step in enumerate(flops_per_step, start=1):
        target = budget_flops * done / len(flops_per_step)
        steps.append(max(0, round((target - spent) / per_step)))
        spent += steps[-1] * per_step
    return steps


def plan_run(cfg: Config, counts: FlopCounts, budget_flops: int | None) -> list[StagePlan]:
    """The stages of the run `cfg` at equal FLOPs (`budget_flops` for the whole run), or at
    its own steps (`budget_flops` None); a run of 0 steps stays untrained."""
    stages = counts.stages(cfg)
    if budget_flops is None or cfg.train.steps == 0:
        steps = stage_steps(cfg) if cfg.stages else [cfg.train.steps]
    else:
        steps = matched_steps(budget_flops, [flops for _, flops in stages])
    return [StagePlan(preset, n, flops) for (preset, flops), n in zip(stages, steps, strict=True)]


def with_steps(cfg: Config, plan: list[StagePlan]) -> Config:
    """`cfg` training for the plan's steps; the warm-up keeps its share of the run
    (round(train.warmup_steps * steps / train.steps)), so every schedule has the same shape."""
    total = sum(stage.steps for stage in plan)
    if cfg.train.steps:
        cfg.train.warmup_steps = round(cfg.train.warmup_steps * total / cfg.train.steps)
    cfg.train.steps = total
    if cfg.stages:
        cfg.stage_steps = [stage.steps for stage in plan]
    return cfg


def check_equal(plans: dict[str, list[StagePlan]], budget_flops: int, where: str) -> None:
    """ValueError if a trained run's FLOPs are more than TOLERANCE away from `budget_flops`."""
    for method, plan in plans.items():
        flops = sum(stage.train_flops for stage in plan)
        if flops and abs(flops / budget_flops - 1) > TOLERANCE:
            raise ValueError(
                f"{where}: {method}'s {[s.steps for s in plan]} steps train "
                f"{flops / 1e9:.3g} GFLOP, more than {TOLERANCE:.0%} from M3I's "
                f"{budget_flops / 1e9:.3g}; give the budget more train.steps"
            )
