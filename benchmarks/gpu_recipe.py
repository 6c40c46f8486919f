"""The GPU recipe of issue 15, measured in one run of under 10 minutes on one GPU.

What it measures, in this order, with the estimated seconds of each part on an H200 with 16
cores (estimates, not measurements: the step times scale the measured 87 ms of ViT-B/16 at
batch 64 eager; compile times are a guess for Inductor on a 16-core host):
1. start-up: imports, CUDA context, a bf16 matmul for the measured peak                  ~15 s
2. the `vit_b16_m3i` training step of ViT-B/16 at 224 px, bf16, eager, batch 128         ~25 s
3. the same at batch 256                                                                 ~40 s
4. the step of 2 with `model.attention=packed` (A and B in one sequence per sample,
   FlexAttention with a block mask, its kernel compiled on the first step)              ~50 s
5. the same compiled (`torch.compile` of the model, as `train.compile=true`), batch 128 ~150 s
6. `m3i bench data` at 224 px for `shapes` and JPEG `wds:` shards, 0, 2, 8, 16 workers  ~50 s
7. ViT-L/16 at batch 128, eager                                                          ~40 s
8. ViT-B/16 compiled at batch 256                                                       ~150 s
                                                                          in all about 520 s
A part is started only if the seconds gone plus its estimate fit in --budget-s (default 540);
one that does not is listed under "skipped" in the JSON, so the run stays under 10 minutes.

Each step is the training loop's own (`m3i.train.optimizer_step.OptimizerStep`: autocast, backward,
clipping, the fused AdamW of `build_optimizer`, then the EMA update) on a synthetic batch
already on the device. Gradient checkpointing is turned on only when a step runs out of memory
without it. Per configuration: model FLOPs per step (FlopCounterMode, eager, no recomputation),
the first step's seconds (compilation included; for a compiled step, its excess over a timed
step is reported as compile_s_estimate), the median, min and max of the timed steps,
images/s, MFU against the datasheet's dense bf16 peak (989 TFLOP/s on an H200), peak memory and
a torch.profiler table of the top kernels of 2 steps; "best" is the index of the step with the
highest MFU. Every row names its `attention`; a packed row counts the FLOPs of the separate
step (the same useful work: the masked-out attention is not the model's), so packed and separate
MFUs compare as their step times, and "packed_over_separate" is the ratio of their medians at
the same model, batch and compilation. The data part gives, per source, the fewest workers
whose median keeps up with the fastest ViT-B step.

Every result goes into one JSON file, DIR/gpu_recipe.json (DIR: --out, else $OUT, else .),
rewritten after each part, so a run cut short keeps what it measured. From the repository root:

    PYTHONPATH=src python3 benchmarks/gpu_recipe.py              # on the GPU machine
    PYTHONPATH=src python3 benchmarks/gpu_recipe.py --dry-run    # every part on the CPU, tiny

`--dry-run` runs the same code on the CPU at a tiny size: a one-block ViT-Tiny at 32 px, 2 timed
steps, torch.compile with the `eager` backend (Dynamo only, no Inductor code generation).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from gpu_mfu import DATASHEET
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from m3i.bench.data import DataBenchSettings, run_data_bench
from m3i.bench.measure import count_flops, matmul_tflops, summary, synthetic_batch, time_steps
from m3i.config import load_config
from m3i.data.batch import Batch
from m3i.data.shapes import CLASSES, ShapesDataset
from m3i.io import atomic_write_text
from m3i.method import M3IModel
from m3i.mi.targets import RunContext
from m3i.models.text import train_bpe
from m3i.train.optimizer_step import OptimizerStep, build_optimizer

TOP_KERNELS = 15


@dataclass
class Sizes:
    """Everything the dry run shrinks."""

    base: str = "vit_base_patch16_224"
    large: str = "vit_large_patch16_224"
    img_size: int = 224
    patch_size: int = 16
    depth: int | None = None  # None: the model's own
    batches: tuple[int, int] = (128, 256)
    large_batch: int = 128
    warmup: int = 3
    steps: int = 10
    profiled_steps: int = 2
    backend: str = "inductor"
    data_workers: tuple[int, ...] = (0, 2, 8, 16)
    data_batches: int = 4
    data_samples: int = 256
    data_batch: int = 64
    overrides: tuple[str, ...] = ()  # of the vit_b16_m3i preset


DRY_RUN = Sizes(
    base="vit_tiny_patch16_224",
    large="vit_small_patch16_224",
    img_size=32,
    patch_size=8,
    depth=1,
    batches=(4, 8),
    large_batch=4,
    warmup=1,
    steps=2,
    profiled_steps=1,
    backend="eager",
    data_workers=(0, 1),
    data_batches=1,
    data_samples=16,
    data_batch=4,
    overrides=(
        "decoder.dim=32",
        "decoder.depth=1",
        "decoder.heads=2",
        "targets.category.hidden_dim=16",
        "targets.category.embed_dim=8",
        "targets.text.hidden_dim=16",
        "targets.text.embed_dim=8",
        "targets.text.width=16",
        "targets.text.depth=1",
        "targets.text.heads=2",
        "targets.text.context_length=8",
    ),  # fmt: skip
)
# the docstring's estimates, the largest of each kind: a part starts only if it fits the budget
ESTIMATE_S = {"eager": 40, "packed": 50, "compiled": 150, "data": 50}


def log(message: str) -> None:
    print(f"gpu_recipe: {message}", file=sys.stderr, flush=True)


def step_config(model: str, batch: int, attention: str, sizes: Sizes, checkpointing: bool):
    depth = "null" if sizes.depth is None else sizes.depth
    overrides = [f"model.name={model}", f"model.depth={depth}", f"train.batch_size={batch}"]
    overrides.append(f"model.attention={attention}")
    overrides += [f"model.img_size={sizes.img_size}", f"model.patch_size={sizes.patch_size}"]
    overrides += ["train.precision=bf16", f"train.grad_checkpointing={checkpointing}"]
    return load_config("vit_b16_m3i", overrides=[*overrides, *sizes.overrides])


def profile_table(step, device: torch.device, steps: int) -> list[dict[str, Any]]:
    """The top kernels (CUDA) or operators (CPU) of `steps` steps by their own time."""
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    cuda = device.type == "cuda"
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    timed = [e for e in prof.key_averages() if getattr(e, key) > 0]
    kind = DeviceType.CUDA if cuda else DeviceType.CPU  # kernels, not the ops launching them
    events = [e for e in timed if e.device_type == kind] or timed
    total = sum(getattr(e, key) for e in events)
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    return [
        {
            "name": e.key,
            "calls": e.count,
            "ms_per_step": getattr(e, key) / 1e3 / steps,
            "share": getattr(e, key) / total,
        }
        for e in events[:TOP_KERNELS]
    ]


def model_flops(model: M3IModel, batch: Batch, device: torch.device) -> tuple[float, int]:
    """(matmul FLOPs of an eager forward and backward under bf16 autocast, with no
    recomputation and separate attention (a packed step's masked-out scores are not counted);
    the batch size they were counted at). When the whole batch runs out of
    memory they are counted on its first half (quarter, ...) and scaled up: linear in the
    batch but for the contrastive N x N logits, far below 0.1% of the step."""
    n = len(batch.views[0].image)
    checkpointing, model.backbone.grad_checkpointing = model.backbone.grad_checkpointing, False
    attention, model.backbone.attention = model.backbone.attention, "separate"
    try:
        for part in (n, n // 2, n // 4):
            sub = batch.rows(slice(part))
            try:
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    flops = count_flops(lambda sub=sub: model(sub)[0].backward())
                return flops * n / part, part
            except torch.OutOfMemoryError:
                model.zero_grad(set_to_none=True)
        raise torch.OutOfMemoryError(f"counting FLOPs at batch {n // 4}")
    finally:
        model.zero_grad(set_to_none=True)
        model.backbone.grad_checkpointing = checkpointing
        model.backbone.attention = attention


def run_step(cfg, compiled: bool, sizes: Sizes, device: torch.device, peak: float) -> dict:
    """Build the step of `cfg`, count its FLOPs, time it, profile it."""
    torch.manual_seed(0)
    captions = ShapesDataset("train", num_samples=300).captions()
    tokenizer = train_bpe(captions, cfg.targets.text.vocab_size)
    model = (
        M3IModel(cfg, RunContext(num_classes=len(CLASSES), tokenizer=tokenizer)).to(device).train()
    )
    model.measure_information = False  # as on every step the training loop does not log
    batch = synthetic_batch(cfg.train.batch_size, cfg.model.img_size, captions, device)
    flops, counted_at = model_flops(model, batch, device)
    model.backbone.grad_checkpointing = cfg.train.grad_checkpointing
    if compiled:
        torch._dynamo.reset()  # a fresh compilation for every configuration
    forward = torch.compile(model, backend=sizes.backend) if compiled else model
    optimizer = build_optimizer(model, cfg.train, device)
    optimizer_step = OptimizerStep(model, forward, optimizer, cfg.train, device)

    def step() -> None:
        optimizer_step(batch)
        model.after_optimizer_step()
        model.momentum_update(0.996)

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    first = time_steps(step, 1, device)[0]  # compilation included
    time_steps(step, sizes.warmup - 1, device)
    timed = summary(time_steps(step, sizes.steps, device))
    memory = torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None
    return {
        "params_m": sum(p.numel() for p in model.backbone.parameters()) / 1e6,
        "gflop_per_step": flops / 1e9,
        "flops_counted_at_batch": counted_at,
        "first_step_s": first,
        # compilation's seconds, estimated as the first step's excess over a timed one
        "compile_s_estimate": first - timed["median_s"] if compiled else None,
        "step_s_median": timed["median_s"],
        "step_s_min": timed["min_s"],
        "step_s_max": timed["max_s"],
        "img_per_s": cfg.train.batch_size / timed["median_s"],
        "mfu": flops / timed["median_s"] / (peak * 1e12),
        "max_memory_gb": memory,
        "optimizer": "fused" if optimizer.defaults.get("fused") else "foreach",
        "top_kernels": profile_table(step, device, sizes.profiled_steps),
    }


def measure_step(
    model_name: str,
    batch: int,
    compiled: bool,
    attention: str,
    sizes: Sizes,
    device: torch.device,
    peak: float,
) -> dict[str, Any]:
    """One configuration's row; with gradient checkpointing only if it runs out of memory
    without."""
    for checkpointing in (False, True):
        row: dict[str, Any] = {"model": model_name, "batch": batch, "compile": compiled}
        row.update(attention=attention, grad_checkpointing=checkpointing)
        cfg = step_config(model_name, batch, attention, sizes, checkpointing)
        try:
            row.update(run_step(cfg, compiled, sizes, device, peak))
            return row
        except torch.OutOfMemoryError:
            row["error"] = f"out of memory at batch {batch}"
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return row


def measure_data(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """`m3i bench data` on shapes and JPEG wds shards."""
    settings = DataBenchSettings(
        specs=("shapes", "wds"),
        img_size=sizes.img_size,
        batch=sizes.data_batch,
        workers=sizes.data_workers,
        batches=sizes.data_batches,
        samples=sizes.data_samples,
        preset="vit_b16_m3i",
    )
    return run_data_bench(settings, device, log)


def keep_up(data: dict[str, Any], step_img_per_s: float) -> None:
    """Per source of `data`, the fewest workers whose median images/s reaches `step_img_per_s`
    (the fastest base-model step of the whole run; None: none does)."""
    data["keeps_up_with"] = step_img_per_s
    data["fewest_workers_keeping_up"] = {
        spec: min(
            (
                r["workers"]
                for r in data["results"]
                if r["source"] == spec and r["img_per_s"] >= step_img_per_s
            ),
            default=None,
        )
        for spec in dict.fromkeys(r["source"] for r in data["results"])
    }


def peak_tflops(device: torch.device, measured: float) -> tuple[float, str]:
    """The datasheet's dense bf16 peak of a known GPU, else the measured matmul rate."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    known = next((key for key in DATASHEET if key in name), None)
    if known is None:
        return measured, "measured_matmul"
    return DATASHEET[known][0], f"datasheet:{known}"


def plan(sizes: Sizes) -> list[tuple[str, tuple]]:
    """The parts in the order they run: (kind, arguments of measure_step or measure_data)."""
    small, large = sizes.batches
    return [
        ("eager", (sizes.base, small, False, "separate")),
        ("eager", (sizes.base, large, False, "separate")),
        ("packed", (sizes.base, small, False, "packed")),
        ("compiled", (sizes.base, small, True, "separate")),
        ("data", ()),
        ("eager", (sizes.large, sizes.large_batch, False, "separate")),
        ("compiled", (sizes.base, large, True, "separate")),
    ]


def packed_over_separate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each packed row, the ratio of its median step to the separate row's of the same
    model, batch and compilation (when both ran)."""
    key = ("model", "batch", "compile")
    medians = {
        (tuple(r[k] for k in key), r["attention"]): r["step_s_median"]
        for r in rows
        if "step_s_median" in r
    }
    return [
        {**dict(zip(key, config, strict=True)), "ratio": median / medians[(config, "separate")]}
        for (config, attention), median in medians.items()
        if attention == "packed" and (config, "separate") in medians
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="every part on the CPU, tiny")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="default $OUT or .")
    parser.add_argument("--budget-s", type=float, default=540, help="skip parts beyond this")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device is visible; use --dry-run to check the script on the CPU")
    sizes = DRY_RUN if args.dry_run else Sizes()
    device = torch.device("cpu" if args.dry_run else "cuda")
    start = time.perf_counter()
    out = Path(args.out) / "gpu_recipe.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    measured = matmul_tflops(device, torch.bfloat16)
    peak, source = peak_tflops(device, measured)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report: dict[str, Any] = {
        "device": name,
        "torch": torch.__version__,
        "dry_run": args.dry_run,
        "peak_tflops": peak,
        "peak_source": source,
        "matmul_tflops_bf16": measured,
        "budget_s": args.budget_s,
        "steps": [],
        "data": None,
        "skipped": [],
        "best": None,
        "packed_over_separate": [],
    }
    for kind, arguments in plan(sizes):
        elapsed = time.perf_counter() - start
        if elapsed + ESTIMATE_S[kind] > args.budget_s:
            report["skipped"].append(f"{kind} {arguments}: {elapsed:.0f} s gone of the budget")
            continue
        log(f"{kind} {arguments} at {elapsed:.0f} s")
        if kind == "data":
            report["data"] = measure_data(sizes, device)
        else:
            report["steps"].append(measure_step(*arguments, sizes, device, peak))
            report["packed_over_separate"] = packed_over_separate(report["steps"])
            log(json.dumps({k: v for k, v in report["steps"][-1].items() if k != "top_kernels"}))
        if report["data"] is not None:  # against the fastest step so far, compiled ones included
            done = [r["img_per_s"] for r in report["steps"] if r["model"] == sizes.base]
            keep_up(report["data"], max(done, default=0.0))
        mfus = [row.get("mfu", -1.0) for row in report["steps"]]
        report["best"] = max(range(len(mfus)), key=mfus.__getitem__) if mfus else None
        report["wall_s"] = time.perf_counter() - start
        atomic_write_text(out, json.dumps(report, indent=1))
    log(f"done in {time.perf_counter() - start:.0f} s")
    print(out)


if __name__ == "__main__":
    main()
