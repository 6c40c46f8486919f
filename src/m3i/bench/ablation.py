"""`m3i bench ablation`: every pre-training method at equal training FLOPs, evaluated alike.

Each method is pre-trained with the same model, batch size, optimizer and data, and for the
number of steps that gives it the training FLOPs (student forward and backward, EMA teacher
forward, heads, decoder, text encoder; counted on one real step, `ablation_compute`) of M3I's
run of the budget's train.steps, within 5%: methods with cheaper steps take more of them.
The two multi-stage baselines, `multistage` (M3I's own targets, one stage each: M3I but for
the staging) and `multistage_classic` (the classic presets in sequence), give each of their
stages an equal share of those FLOPs, their stages reading one data stream. Every run's warm-up
is the same share of its steps as the budget's. `--equal steps` gives every method the
budget's steps instead (the FLOPs are still counted and reported). The random initialisation
is the baseline. A second table removes one target at a time from M3I (at equal FLOPs too).
Runs of one seed share the backbone's initialisation and the data order, so M3I is compared
with each method seed by seed. `--set` changes every run's config and `--eval-set` every run's
evaluation settings, after the budget's (the `gpu` budget runs on a CPU at a tiny size that
way). Results are written by `m3i.bench.ablation_report`.

Each finished run leaves its record beside its run directory (`RECORD_SUFFIX`), under a key of
what its numbers depend on: its config, tasks, evaluation settings, FLOP plan and the package's
files (`provenance.package_digest`); the record names the git commit it was made at.
`--resume` keeps every finished run whose key is unchanged and runs the rest, so an ablation
that was stopped (or ran out of a machine's time) loses at most the run it was in; without
`--resume` or `--overwrite`, an `--out` holding finished runs is refused before any work.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from m3i.bench.ablation_compute import FlopCounts, StagePlan, check_equal, plan_run, with_steps
from m3i.bench.provenance import device_name
from m3i.config import ConfigError, load_config, validate
from m3i.eval.settings import EvalSettings, load_settings
from m3i.eval.tasks import evaluate
from m3i.io import OutDirError, atomic_write_text
from m3i.provenance import git_commit, package_digest
from m3i.runtime import pick_device
from m3i.train.pretrain import pretrain
from m3i.train.stages import stage_steps
from m3i.train.stopping import TrainingStopped

METHODS = (
    "random", "supervised", "clip", "mae", "data2vec", "siameseim", "multistage",
    "multistage_classic", "m3i",
)  # fmt: skip
MULTISTAGE = ("multistage", "multistage_classic")  # each ends with a text stage
REMOVALS = {  # M3I minus one target
    "m3i-text": "targets.text.weight=0",
    "m3i-category": "targets.category.weight=0",
    "m3i-intra_view": "targets.intra_view.weight=0",
    "m3i-inter_view": "targets.inter_view.weight=0",
}
TINY_MODEL = [
    "model.depth=1", "decoder.dim=32", "decoder.depth=1", "decoder.heads=2",
    "targets.category.hidden_dim=16", "targets.category.embed_dim=8",
    "targets.text.hidden_dim=16", "targets.text.embed_dim=8", "targets.text.width=16",
    "targets.text.depth=1", "targets.text.heads=2", "targets.text.context_length=8",
]  # fmt: skip


RECORD_SUFFIX = ".record.json"  # a finished run's record: DATA/seedN/METHOD.record.json


# the detection probe's 30 epochs of batch 128 cost too much for dozens of runs: 10 epochs of
# batch 32 (a third of the epochs, four times the updates per epoch)
SHORT_DETECT = ["detect.epochs=10", "detect.batch_size=32"]


@dataclass
class Budget:
    """Pre-training overrides, evaluation settings and seeds of one budget."""

    train: list[str]
    evaluation: list[str]
    seeds: dict[str, int]  # data spec -> number of seeds
    dense: bool = True  # segment and detect (on shapes)
    removals: tuple[str, ...] = ("shapes",)  # data specs that also get the M3I-minus-one runs


BUDGETS = {
    "tiny": Budget(  # for tests: seconds per method; 8 steps: every method within 5% of M3I
        train=TINY_MODEL + ["train.steps=8", "train.batch_size=16", "data.num_train=64"],
        evaluation=[
            "num_train=64",
            "num_val=32",
            "linear.epochs=2",
            "segment.epochs=1",
            "detect.epochs=1",
            "linear.lrs=[0.01]",
        ],  # fmt: skip
        seeds={"shapes": 1},
        removals=(),
    ),
    "smoke": Budget(  # CI's end-to-end ablation: quick's plan (both data specs, the removals
        # on shapes, every task) at a 1-block model, a few steps and small probes
        train=["model.depth=1", "train.steps=8", "train.batch_size=16", "data.num_train=256"],
        evaluation=[
            "num_train=256",
            "num_val=128",
            "linear.epochs=5",
            "linear.lrs=[0.01,0.1]",
            "segment.epochs=2",
            "detect.epochs=2",
            "detect.batch_size=32",
        ],  # fmt: skip
        seeds={"shapes": 1, "fashion-mnist": 1},
    ),
    "quick": Budget(  # 11 minutes on 2 CPU cores before multistage_classic and the timm view
        train=["model.depth=2", "train.steps=40", "train.batch_size=32", "data.num_train=2000"],
        evaluation=["num_train=2000", "num_val=500", "segment.epochs=10"] + SHORT_DETECT,
        seeds={"shapes": 1, "fashion-mnist": 1},
    ),
    # docs/results.md's table: the default model, 3 seeds on both datasets (48 trained runs and
    # 6 of random init: 87 min on 2 CPU cores, alone). Equal FLOPs make
    # every method train about as long as M3I, so the trained runs get 80 M3I steps at batch 32
    # (60–100 s of training each), shorter probes, and the minus-one runs are left to `gpu`
    "full": Budget(
        train=["train.steps=80", "train.batch_size=32", "data.num_train=5000"],
        evaluation=[
            "num_train=2000",
            "num_val=1000",
            "segment.epochs=10",
            "detect.epochs=6",
            "detect.batch_size=32",
        ],  # fmt: skip
        seeds={"shapes": 3, "fashion-mnist": 3},
        removals=(),
    ),
    # the GPU table: the default model, batch and schedule for 1,000 M3I steps on the whole
    # training split, evaluated on the whole shapes split (10,000 / 2,000 images) with the
    # default probes; workers only feed the GPU (a view depends on (seed, epoch, index) only)
    "gpu": Budget(
        train=["train.steps=1000", "data.workers=8"],
        evaluation=["num_train=10000", "num_val=2000"],
        seeds={"shapes": 3, "fashion-mnist": 3},
    ),
}


def method_config(
    method: str, data: str, seed: int, budget: Budget, plan: list[StagePlan] | None = None
):
    """The config of one method: its preset, the budget's shared overrides, seed and data; the
    budget's steps, or the steps of `plan` (one entry per stage)."""
    preset = "m3i" if method in REMOVALS or method == "random" else method
    overrides = budget.train + [f"train.seed={seed}", "monitor.every=0", "monitor.final_eval=[]"]
    overrides += ["monitor.tensorboard=false"]
    if method in REMOVALS:
        overrides.append(REMOVALS[method])
    if method == "random":
        overrides.append("train.steps=0")
    cfg = load_config(preset, overrides=overrides, data=data)
    if plan is not None:
        validate(with_steps(cfg, plan))
    return cfg


def plan_compute(
    budget: Budget, data: str, methods: list[str], equal: str
) -> tuple[dict[str, list[StagePlan]], int]:
    """The stages (steps, FLOPs per step) of every method on `data`, and the FLOP budget: M3I's
    training FLOPs at the budget's steps. equal="flops": every trained method gets that budget
    within 5%; equal="steps": every method the budget's steps."""
    counts = FlopCounts()
    (m3i,) = plan_run(method_config("m3i", data, 0, budget), counts, None)
    target = m3i.train_flops if equal == "flops" else None
    plans = {m: plan_run(method_config(m, data, 0, budget), counts, target) for m in methods}
    if target is not None:
        check_equal(plans, target, f"budget on {data}")
    return plans, m3i.train_flops


def tasks_for(method: str, data: str, budget: Budget) -> list[str]:
    tasks = ["knn", "linear"]
    if data == "shapes" and budget.dense:
        tasks += ["segment", "detect"]
    text = method in ("clip", "m3i", *MULTISTAGE) or method.startswith("m3i-")
    if text and method != "m3i-text":
        tasks.append("zeroshot")
    return tasks


def final_bounds(run: Path) -> dict[str, float]:
    """The last logged information figure of every target (nats): a lower bound or an
    estimate, as `m3i.mi.targets.information()` says."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if '"mi/' in line]
    return {k[3:]: v for k, v in records[-1].items() if k.startswith("mi/")} if records else {}


def pretrain_and_evaluate(
    cfg, run: Path, data: str, tasks: list[str], settings: EvalSettings, record: bool = True
) -> tuple[dict[str, float], float]:
    """Pre-train `cfg` into `run`, then evaluate `tasks` on `data` (features shared between
    them); ({"task/metric": value}, seconds of pre-training)."""
    start = time.perf_counter()
    pretrain(cfg, run, progress=False, overwrite=True)  # the bench owns its run directories
    train_s = time.perf_counter() - start
    results = evaluate(tasks, run, data, settings, record=record)
    return {f"{r['task']}/{k}": v for r in results for k, v in r["metrics"].items()}, train_s


@dataclass(frozen=True)
class Place:
    """Where the runs of one command go and what their records are keyed by besides each run's
    own settings."""

    out: Path
    device: str  # the name of the device the runs train on (provenance.device_name)
    package: str  # package_digest() when the command started: the code this process runs
    resume: bool = False


def data_dir(data: str) -> str:
    """One folder name per data spec: the spec itself when it is a plain name (shapes,
    fashion-mnist), else its characters outside [A-Za-z0-9._-] replaced and a digest of it
    added (a spec such as fashion-mnist:/some/dir stays one folder and never meets another)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", data).strip("_.")
    if safe == data:
        return data
    return f"{safe}-{hashlib.sha256(data.encode()).hexdigest()[:8]}"


def run_key(cfg, tasks: list[str], settings: EvalSettings, plan: list[StagePlan], place) -> str:
    """A digest of everything a run's record depends on: its resolved config, its tasks, its
    evaluation settings, its FLOP plan, the device, torch's version and the package's files."""
    inputs = {
        "config": asdict(cfg),
        "tasks": tasks,
        "evaluation": asdict(settings),
        "plan": [asdict(stage) for stage in plan],
        "device": place.device,
        "torch": torch.__version__,
        "package": place.package,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def kept_record(path: Path, key: str) -> dict | None:
    """The record saved at `path` when it was made under `key`, else None."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved["record"] if isinstance(saved, dict) and saved.get("key") == key else None


def run_one(
    method: str, data: str, seed: int, budget: Budget, plan: list[StagePlan], place: Place, log
) -> tuple[dict, bool]:
    """Pre-train (for the steps of `plan`) and evaluate one (method, data, seed), or with
    `place.resume` keep its finished record when it was made under the same key; (its record
    for results.json, whether it was kept)."""
    run = place.out / data_dir(data) / f"seed{seed}" / method
    cfg = method_config(method, data, seed, budget, plan)
    settings = load_settings(budget.evaluation + [f"data_seed={cfg.data.seed}"])
    tasks = tasks_for(method, data, budget)
    key = run_key(cfg, tasks, settings, plan, place)
    saved = run.with_name(run.name + RECORD_SUFFIX)
    if place.resume and (kept := kept_record(saved, key)) is not None:
        log(f"{data} seed {seed} {method}: kept from {saved.name} (same config, settings, files)")
        return kept, True
    saved.unlink(missing_ok=True)  # a stale record never outlives the run that replaces it
    start = time.perf_counter()
    metrics, train_s = pretrain_and_evaluate(cfg, run, data, tasks, settings)
    metrics = {k: v for k, v in metrics.items() if not k.endswith("/holdout_top1")}
    seconds = time.perf_counter() - start
    summary = "  ".join(f"{k} {v:.3g}" for k, v in metrics.items())
    log(f"{data} seed {seed} {method} ({seconds:.0f} s): {summary}")
    images = cfg.train.steps * cfg.train.batch_size
    trained = stage_steps(cfg) if cfg.stages else [cfg.train.steps]
    ran = [  # the steps the run's config trained, at the plan's FLOPs per step
        StagePlan(stage.preset, steps, stage.flops_per_step)
        for stage, steps in zip(plan, trained, strict=True)
    ]
    record = {
        "method": method,
        "data": data,
        "seed": seed,
        "metrics": metrics,
        "mi": final_bounds(run),
        "train_s": train_s,
        "img_per_s": images / train_s if images else None,
        "steps": cfg.train.steps,
        "train_flops": sum(stage.train_flops for stage in ran),
        "commit": git_commit(),
    }
    if cfg.stages:
        record["stages"] = [stage.record() for stage in ran]
    else:
        record["flops_per_step"] = ran[0].flops_per_step
    if package_digest() != place.package:  # the files no longer say which code made this run
        log(f"the package's files changed during this command: {saved.name} is not written")
    else:
        atomic_write_text(saved, json.dumps({"key": key, "record": record}, indent=1) + "\n")
    return record, False


def with_overrides(budget: Budget, train: list[str], evaluation: list[str]) -> Budget:
    """`budget` with `train` config overrides (e.g. model.name=convnext_atto) after its own, and
    `evaluation` settings (e.g. num_train=64) after its own, both checked (ConfigError)."""
    if any(text.split("=", 1)[0].strip() == "data_seed" for text in evaluation):
        raise ConfigError(
            "--eval-set data_seed: each run is evaluated on its own data.seed; set data.seed "
            "with --set"
        )
    budget = replace(
        budget, train=[*budget.train, *train], evaluation=[*budget.evaluation, *evaluation]
    )
    load_settings(budget.evaluation)
    return budget


def finished_runs(out: Path) -> list[Path]:
    """The records of finished runs under `out` (DATA/seedN/METHOD.record.json)."""
    return sorted(out.glob(f"*/seed*/*{RECORD_SUFFIX}"))  # data_dir() makes one folder per spec


def run_ablation(
    budget_name: str,
    out: Path,
    data: list[str] | None,
    seeds: int | None,
    log,
    equal: str = "flops",
    overrides: list[str] | None = None,
    eval_overrides: list[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> dict:
    """Every method on every data spec and seed of the budget, at equal training FLOPs
    (`equal="flops"`) or steps; {"equal", "flop_budget": {data: FLOPs}, "device": the name of
    the device the runs trained on, "kept": the commit of each finished run `resume` kept,
    "runs": [records]}. `overrides` (config) and `eval_overrides` (evaluation settings) follow the
    budget's in every run. An `out` that holds finished runs needs `resume` (keep those whose
    key is unchanged) or `overwrite` (run them all again); an OutDirError otherwise."""
    if resume and overwrite:
        raise ConfigError("--resume keeps finished runs and --overwrite runs them again: give one")
    finished = finished_runs(out)
    if finished and not (resume or overwrite):
        raise OutDirError(
            f"--out {out} holds {len(finished)} finished ablation runs; continue with --resume "
            "(keeps those made with the same settings and package files), run them all again with "
            "--overwrite, or give another --out"
        )
    budget = with_overrides(BUDGETS[budget_name], overrides or [], eval_overrides or [])
    seeds_of = {spec: seeds or count for spec, count in budget.seeds.items()}
    if data:
        seeds_of = {spec: seeds or budget.seeds.get(spec, 1) for spec in data}
    first = method_config("m3i", next(iter(seeds_of)), 0, budget)
    device = device_name(pick_device(first.train.device))
    plans, flop_budget = {}, {}
    for spec in seeds_of:  # every data spec is read (and every config checked) before any run
        methods = list(METHODS) + (list(REMOVALS) if spec in budget.removals else [])
        plans[spec], flop_budget[spec] = plan_compute(budget, spec, methods, equal)
        steps = "  ".join(f"{m} {sum(s.steps for s in p)}" for m, p in plans[spec].items())
        log(f"{spec}: {flop_budget[spec] / 1e9:.4g} GFLOP of training per run; steps: {steps}")
    place = Place(out, device, package_digest(), resume)
    if overwrite:  # none of the old records may outlive this command, finished or stopped
        for path in finished:
            path.unlink()
    hint = "the same command with --resume" + (" in place of --overwrite" if overwrite else "")
    runs, kept = [], []
    for spec, count in seeds_of.items():
        for seed in range(count):
            for method, plan in plans[spec].items():
                where = f"{spec} seed {seed} {method}"
                try:
                    record, was_kept = run_one(method, spec, seed, budget, plan, place, log)
                except TrainingStopped:
                    raise TrainingStopped(
                        f"stopped by signal in {where}; the runs finished before it are kept: "
                        f"continue with {hint}"
                    ) from None
                except KeyboardInterrupt:
                    log(f"interrupted in {where}; the runs finished before it are kept: "
                        f"continue with {hint}")  # fmt: skip
                    raise
                runs.append(record)
                if was_kept:
                    kept.append(record.get("commit", "unknown"))
    return {"equal": equal, "flop_budget": flop_budget, "device": device, "kept": kept,
            "runs": runs}  # fmt: skip
