"""Images/s and model FLOPs utilisation (MFU) of one M3I training step on one device.

One step is what the training loop does per batch, minus data loading and gradient clipping:
forward `model(batch)` (under bf16 autocast with --precision bf16), backward, AdamW step,
`momentum_update(0.996)`. The batch is synthetic and already on the device. Each timed step
is synchronised and timed on its own; the JSON reports their median, min and max.

FLOPs per step are counted by `torch.utils.flop_counter.FlopCounterMode` over one forward and
backward: only the matmul-class ops PyTorch has formulas for (mm, addmm, bmm, conv, attention),
not norms, activations, softmax or the optimiser; the CPU attention kernel, which PyTorch does
not count, is added here with PyTorch's own attention formulas. MFU = FLOPs / median step time /
peak, where the peak is --peak-tflops, else the datasheet dense peak of a known GPU, else the
measured TFLOP/s of a large square matmul in the same dtype (always reported as matmul_tflops).

From the repository root (the package need not be installed):

    # GPU: ViT-B/16 and ViT-L/16 at 224, bf16
    PYTHONPATH=src python3 benchmarks/gpu_mfu.py --batch-size 64
    # CPU, tiny (what tests/benchmarks/test_gpu_mfu.py runs)
    PYTHONPATH=src python3 benchmarks/gpu_mfu.py --device cpu --models vit_tiny_patch16_224 \
        --img-size 32 --patch-size 8 --depth 1 --batch-size 4 --steps 2 --warmup 1

Progress goes to stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from contextlib import nullcontext
from typing import Any

import torch

from m3i.bench.measure import count_flops, matmul_tflops, summary, synthetic_batch, time_steps
from m3i.config import load_config
from m3i.data.shapes import CLASSES, ShapesDataset
from m3i.method import M3IModel
from m3i.mi.targets import RunContext
from m3i.models.text import train_bpe

# dense (no sparsity) peak TFLOP/s by a substring of torch.cuda.get_device_name: (bf16, fp32)
DATASHEET = {
    "H200": (989.0, 67.0),
    "H100 PCIe": (756.0, 51.0),
    "H100": (989.0, 67.0),  # SXM
    "A100": (312.0, 19.5),
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def bench_model(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    depth = "null" if args.depth is None else args.depth
    overrides = [f"model.{k}={v}" for k, v in [("name", name), ("depth", depth)]]
    overrides += [f"model.img_size={args.img_size}", f"model.patch_size={args.patch_size}"]
    overrides += [f"train.batch_size={args.batch_size}"]
    cfg = load_config(args.preset, overrides=overrides)
    if cfg.stages:
        raise SystemExit(f"--preset {args.preset} is multistage; give one of its stages")
    captions = ShapesDataset("train", num_samples=300).captions()
    text = cfg.targets.text
    tokenizer = train_bpe(captions, text.vocab_size) if text.weight else None
    model = (
        M3IModel(cfg, RunContext(num_classes=len(CLASSES), tokenizer=tokenizer)).to(device).train()
    )
    run = torch.compile(model) if args.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    batch = synthetic_batch(args.batch_size, args.img_size, captions, device)
    bf16 = args.precision == "bf16"

    def step(module: torch.nn.Module, update: bool = True) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
            loss, _ = module(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if update:
            optimizer.step()
            model.momentum_update(0.996)

    flops = count_flops(lambda: step(model, update=False))  # eager: forward + backward
    time_steps(lambda: step(run), args.warmup, device)  # warm-up (and compilation)
    timed = summary(time_steps(lambda: step(run), args.steps, device))
    median = timed["median_s"]
    cuda = device.type == "cuda"
    return {
        "model": name,
        "params_m": sum(p.numel() for p in model.backbone.parameters()) / 1e6,
        "gflops_per_step": flops / 1e9,
        "step_s_median": median,
        "step_s_min": timed["min_s"],
        "step_s_max": timed["max_s"],
        "img_per_s": args.batch_size / median,
        "mfu": flops / median / (args.peak_tflops * 1e12),
        "max_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="vit_base_patch16_224,vit_large_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--depth", type=int, default=None, help="default: the model's own")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None)
    parser.add_argument("--preset", default="m3i")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile the M3IModel")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the peak")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but no CUDA device is visible")
    cuda = args.device != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    name = torch.cuda.get_device_name(device) if cuda else f"cpu ({threads} threads)"
    log(f"{name}: measuring {args.precision} matmul TFLOP/s")
    measured = matmul_tflops(device, dtype)
    known = next((key for key in DATASHEET if cuda and key in name), None)
    if args.peak_tflops is not None:
        source = "argument"
    elif known is not None:
        args.peak_tflops = DATASHEET[known][0 if args.precision == "bf16" else 1]
        source = f"datasheet:{known}"
    else:
        args.peak_tflops, source = measured, "measured_matmul"
    results = []
    for model_name in args.models.split(","):
        log(f"{model_name}: batch {args.batch_size}, {args.warmup} + {args.steps} timed steps")
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        try:
            result = bench_model(model_name, args, device)
        except torch.cuda.OutOfMemoryError:
            result = {"model": model_name, "error": f"out of memory at batch {args.batch_size}"}
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        log(json.dumps(result))
        results.append(result)
    report = {
        "device": name,
        "precision": args.precision,
        "batch_size": args.batch_size,
        "img_size": args.img_size,
        "preset": args.preset,
        "compile": args.compile,
        "peak_tflops": args.peak_tflops,
        "peak_source": source,
        "matmul_tflops": measured,
        "models": results,
    }
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
