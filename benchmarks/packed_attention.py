"""model.attention=packed against separate: the M3I training step's seconds, timed interleaved in
one process on one synthetic batch (forward, backward, AdamW, EMA update; the training loop's
own `OptimizerStep`), the two models built from the same seed (the same weights).

    PYTHONPATH=src python3 benchmarks/packed_attention.py                 # the m3i preset
    PYTHONPATH=src python3 benchmarks/packed_attention.py --set train.batch_size=128 ...

Prints one JSON object: per attention the median, min and max of all timed steps
(`--repeats` interleaved rounds of `--steps` steps after one warm-up step each) and the steps'
seconds in the order timed, and the ratio of the medians, packed / separate.
"""

from __future__ import annotations

import argparse
import json

import torch

from m3i.bench.measure import summary, synthetic_batch, time_steps
from m3i.config import load_config
from m3i.data.shapes import CLASSES, ShapesDataset
from m3i.method import M3IModel
from m3i.mi.targets import RunContext
from m3i.models.packed import packed_kernel
from m3i.models.text import train_bpe
from m3i.train.optimizer_step import OptimizerStep, build_optimizer

ATTENTIONS = ("separate", "packed")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="m3i")
    parser.add_argument("--set", action="append", default=[], help="a config override")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    captions = ShapesDataset("train", num_samples=300).captions()
    cfg = load_config(args.preset, overrides=args.set)
    tokenizer = train_bpe(captions, cfg.targets.text.vocab_size)
    torch.manual_seed(1)
    batch = synthetic_batch(cfg.train.batch_size, cfg.model.img_size, captions, device)
    steps = {}
    for attention in ATTENTIONS:
        cfg = load_config(args.preset, overrides=[*args.set, f"model.attention={attention}"])
        torch.manual_seed(0)
        context = RunContext(num_classes=len(CLASSES), tokenizer=tokenizer)
        model = M3IModel(cfg, context).to(device).train()
        model.measure_information = False
        optimizer = build_optimizer(model, cfg.train, device)
        optimizer_step = OptimizerStep(model, model, optimizer, cfg.train, device)

        def step(model=model, optimizer_step=optimizer_step) -> None:
            optimizer_step(batch)
            model.after_optimizer_step()
            model.momentum_update(0.996)

        steps[attention] = step
    times: dict[str, list[float]] = {attention: [] for attention in ATTENTIONS}
    for _ in range(args.repeats):
        for attention, step in steps.items():
            time_steps(step, 1, device)  # warm-up: caches, allocator, a compiled kernel
            times[attention] += time_steps(step, args.steps, device)
    result = {
        attention: {**summary(values), "times_s": [round(t, 3) for t in values]}
        for attention, values in times.items()
    }
    report = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "packed_kernel": packed_kernel(device),
        "model": cfg.model.name,
        "depth": cfg.model.depth,
        "img_size": cfg.model.img_size,
        "patch_size": cfg.model.patch_size,
        "batch": cfg.train.batch_size,
        "timed_steps": args.repeats * args.steps,
        **result,
        "packed_over_separate": result["packed"]["median_s"] / result["separate"]["median_s"],
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
