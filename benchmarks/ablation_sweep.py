"""Tuning sweep for `m3i bench ablation`, on training-side data only.

Each variant is pre-trained with the ablation budget's model, batch, schedule and steps (the
budget's steps for every variant: equal steps, whereas `m3i bench ablation` gives each method
the steps that match M3I's training FLOPs; add `train.steps=N` to a variant to compare at equal
FLOPs) with its own overrides, then evaluated (knn, linear, segment) on an independently
generated `shapes` set (`data_seed`, default 1). Pre-training reads the train split of data
seed 0; the val split of data seed 0, the one the ablation table reports, is never read.

    PYTHONPATH=src python benchmarks/ablation_sweep.py [--budget full] [--device cuda] \
        m3i m3i+seed1:train.seed=1 m3i+category2:targets.category.weight=2 supervised

A variant is NAME[:key=value,...]; the method (preset) is NAME up to the first '+' or '@'.
One JSON line per variant goes to stdout and to OUT/sweep.jsonl.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from m3i.bench.ablation import BUDGETS, METHODS, method_config, pretrain_and_evaluate, tasks_for
from m3i.config import apply_overrides
from m3i.eval.settings import load_settings

TASKS = ("knn", "linear", "segment")


def parse_variant(text: str) -> tuple[str, str, list[str]]:
    """'name[:k=v,k=v]' -> (name, method, overrides)."""
    name, _, rest = text.partition(":")
    method = re.split(r"[+@]", name)[0]
    if method not in METHODS or method == "random":
        raise SystemExit(f"ablation_sweep: {text!r}: the method must be one of {METHODS[1:]}")
    return name, method, [o for o in rest.split(",") if o]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--budget", default="full", choices=sorted(BUDGETS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=0, help="data loader workers")
    parser.add_argument("--data-seed", type=int, default=1, help="the evaluation's shapes set")
    parser.add_argument("--out", default="runs/ablation_sweep")
    args = parser.parse_args()
    if args.data_seed == 0:
        raise SystemExit("ablation_sweep: --data-seed 0 is the reported val split; use another")
    budget, out = BUDGETS[args.budget], Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for text in args.variants:
        name, method, overrides = parse_variant(text)
        start = time.perf_counter()
        cfg = method_config(method, "shapes", 0, budget)
        apply_overrides(
            cfg, [*overrides, f"train.device={args.device}", f"data.workers={args.workers}"]
        )
        settings = load_settings(
            budget.evaluation + [f"data_seed={args.data_seed}", f"device={args.device}"]
        )
        tasks = [t for t in tasks_for(method, "shapes", budget) if t in TASKS]
        metrics, _ = pretrain_and_evaluate(cfg, out / name, "shapes", tasks, settings, record=False)
        record = {
            "name": name,
            "overrides": overrides,
            "metrics": {k: round(v, 2) for k, v in metrics.items()},
            "seconds": round(time.perf_counter() - start),
        }
        line = json.dumps(record)
        print(line, flush=True)
        with open(out / "sweep.jsonl", "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
