"""What a mixture buys: M3I on labelled + plain + captioned sources against supervised training
on the labelled share alone, at equal training FLOPs (docs/mixtures.md).

The data is Fashion-MNIST's training set, split once with `--data-seed`:
- `labelled/`: `--labelled` (10%) of each class's images (a seeded draw), with their labels,
  as an ImageNet-layout folder; its val/ holds the 10,000 test images;
- `plain/`: the other 90%, as plain images (`images:`);
- `captioned.jsonl`: the same 90% again, each with its class-name caption (the `fashion-mnist`
  source's: one of six templates around the class noun) and no label (`captions:`).

`m3i` trains on the three together (`--data` three times, the default weights: the sources'
sizes); `supervised` trains on `folder:labelled` alone for the training FLOPs of M3I's run
(each config's FLOPs per step counted by `m3i.bench.ablation_compute.FlopCounts`). Every run
uses the package defaults otherwise; both are evaluated alike on `fashion-mnist` (kNN and the
linear probe on 10,000 train and 2,000 test images, the final evaluation's sizes).

    PYTHONPATH=src python benchmarks/mixture_study.py --out runs/mixture-study
        [--steps 200] [--seeds 3] [--labelled 0.1] [--data-seed 0]

Writes the data under OUT/data, one run directory per method and seed, and OUT/results.md and
OUT/results.json. A finished run (its eval.jsonl holds both results) is kept on a re-run.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from PIL import Image

from m3i.bench.ablation_compute import FlopCounts
from m3i.config import Config, load_config
from m3i.data.sources import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, FashionMNIST
from m3i.eval.settings import EvalSettings
from m3i.eval.tasks import evaluate_each, record_result
from m3i.train.pretrain import pretrain

TASKS = ("knn", "linear")


def _save(image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)


def class_folder(name: str) -> str:
    return name.replace("/", "-")


def write_study_data(
    root: Path,
    labelled: float,
    seed: int,
    limit: int | None = None,
    fashion: str = FASHION_MNIST_DIR,
) -> dict[str, str]:
    """The three sources under `root` (module docstring; `limit`: of the first images of each
    split only); their specs. Written once: a root that holds `done` is reused."""
    specs = {
        "labelled": f"folder:{root / 'labelled'}",
        "plain": f"images:{root / 'plain'}",
        "captioned": f"captions:{root / 'captioned.jsonl'}",
    }
    if (root / "done").exists():
        return specs
    train = FashionMNIST(fashion, "train", limit, "fashion-mnist")
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(train.labels()):
        by_class.setdefault(label, []).append(index)
    rng = random.Random(seed)
    keep = set()
    for indices in by_class.values():
        keep.update(rng.sample(indices, round(labelled * len(indices))))
    lines = []
    for index in range(len(train)):
        sample = train[index]
        name = class_folder(FASHION_MNIST_CLASSES[sample.label])
        if index in keep:
            _save(sample.image, root / "labelled" / "train" / name / f"{index:05d}.png")
            continue
        _save(sample.image, root / "plain" / f"{index:05d}.png")
        lines.append(json.dumps({"image": f"plain/{index:05d}.png", "caption": sample.caption}))
    (root / "captioned.jsonl").write_text("\n".join(lines) + "\n")
    test = FashionMNIST(fashion, "val", limit, "fashion-mnist")
    for index in range(len(test)):
        sample = test[index]
        name = class_folder(FASHION_MNIST_CLASSES[sample.label])
        _save(sample.image, root / "labelled" / "val" / name / f"{index:05d}.png")
    (root / "done").write_text("")
    return specs


def configs(specs: dict, steps: int, seed: int) -> dict[str, Config]:
    """Both methods' configs, supervised not yet at M3I's FLOPs."""
    common = [f"train.seed={seed}", "data.verify=false", "monitor.final_eval=[]"]
    m3i = load_config(
        "m3i",
        overrides=[*common, f"train.steps={steps}"],
        data=[specs["labelled"], specs["plain"], specs["captioned"]],
    )
    supervised = load_config("supervised", overrides=common, data=specs["labelled"])
    return {"m3i": m3i, "supervised": supervised}


def equal_flops(runs: dict[str, Config], counts: FlopCounts) -> dict[str, dict]:
    """Give supervised the training FLOPs of M3I's run; each run's steps and FLOPs."""
    budget = counts.per_step(runs["m3i"]) * runs["m3i"].train.steps
    plan = {}
    for method, cfg in runs.items():
        per_step = counts.per_step(cfg)
        if method != "m3i":
            warmup_share = cfg.train.warmup_steps / cfg.train.steps
            cfg.train.steps = round(budget / per_step)
            cfg.train.warmup_steps = round(warmup_share * cfg.train.steps)
        plan[method] = {
            "steps": cfg.train.steps,
            "gflop_per_step": per_step / 1e9,
            "train_gflop": per_step * cfg.train.steps / 1e9,
        }
    return plan


def finished(run: Path) -> dict[str, dict] | None:
    path = run / "eval.jsonl"
    if not path.is_file():
        return None
    results = {r["task"]: r["metrics"] for r in map(json.loads, path.read_text().splitlines())}
    return results if set(TASKS) <= results.keys() else None


def run_and_evaluate(cfg: Config, run: Path) -> dict[str, dict]:
    if finished(run) is not None:
        return finished(run)
    pretrain(cfg, run, progress=False, overwrite=run.exists())
    settings = EvalSettings(num_train=10000, num_val=2000, device=cfg.train.device)
    for result in evaluate_each(list(TASKS), run, "fashion-mnist", settings):
        record_result(result)
    return finished(run)


def table(results: dict, plan: dict, seeds: int) -> str:
    lines = ["| method | steps | train GFLOP | metric | " + " | ".join(
        f"seed {s}" for s in range(seeds)) + " | mean |",
        "|---|---|---|---|" + "---|" * (seeds + 1)]  # fmt: skip
    for method in ("m3i", "supervised"):
        for task, metric in (("knn", "top1"), ("linear", "top1")):
            values = [results[method][s][task][metric] for s in range(seeds)]
            cells = " | ".join(f"{v:.2f}" for v in values)
            lines.append(
                f"| {method} | {plan[method]['steps']} | {plan[method]['train_gflop']:.0f} | "
                f"{task}/{metric} | {cells} | {statistics.mean(values):.2f} |"
            )
    for task in ("knn", "linear"):
        diffs = [results["m3i"][s][task]["top1"] - results["supervised"][s][task]["top1"]
                 for s in range(seeds)]  # fmt: skip
        cells = " | ".join(f"{d:+.2f}" for d in diffs)
        mean = statistics.mean(diffs)
        lines.append(f"| m3i − supervised | | | {task}/top1 | {cells} | {mean:+.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/mixture-study")
    parser.add_argument("--steps", type=int, default=200, help="M3I's steps (the default's)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--labelled", type=float, default=0.1, help="share of images labelled")
    parser.add_argument("--data-seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    start = time.perf_counter()
    specs = write_study_data(out / "data", args.labelled, args.data_seed)
    counts, results, plan = FlopCounts(), {"m3i": {}, "supervised": {}}, {}
    for seed in range(args.seeds):
        runs = configs(specs, args.steps, seed)
        plan = equal_flops(runs, counts)
        for method, cfg in runs.items():
            results[method][seed] = run_and_evaluate(cfg, out / f"{method}-seed{seed}")
            print(f"{method} seed {seed}: {results[method][seed]}", flush=True)
    report = {"args": vars(args), "plan": plan, "results": results,
              "wall_s": time.perf_counter() - start}  # fmt: skip
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    text = table(results, plan, args.seeds)
    (out / "results.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
