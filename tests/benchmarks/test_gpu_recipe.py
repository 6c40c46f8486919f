"""benchmarks/gpu_recipe.py --dry-run runs every part of the GPU recipe on the CPU, tiny, and
writes one consistent JSON file."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.benchmarks.test_gpu_mfu import backbone_forward_flops

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_measures_every_part_into_one_json_file(tmp_path):
    command = [sys.executable, "benchmarks/gpu_recipe.py", "--dry-run", "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "gpu_recipe.json")
    report = json.loads((tmp_path / "gpu_recipe.json").read_text())
    assert report["dry_run"] is True and report["skipped"] == []
    assert report["peak_source"] == "measured_matmul"  # no datasheet for a CPU
    assert report["peak_tflops"] == report["matmul_tflops_bf16"] > 0
    configs = [(r["model"], r["batch"], r["compile"], r["attention"]) for r in report["steps"]]
    assert configs == [
        ("vit_tiny_patch16_224", 4, False, "separate"),
        ("vit_tiny_patch16_224", 8, False, "separate"),
        ("vit_tiny_patch16_224", 4, False, "packed"),
        ("vit_tiny_patch16_224", 4, True, "separate"),
        ("vit_small_patch16_224", 4, False, "separate"),
        ("vit_tiny_patch16_224", 8, True, "separate"),
    ]
    separate, packed = report["steps"][0], report["steps"][2]
    # the same useful FLOPs: the packed step's masked-out attention is not counted
    assert packed["gflop_per_step"] == separate["gflop_per_step"]
    assert report["packed_over_separate"] == [
        {
            "model": "vit_tiny_patch16_224",
            "batch": 4,
            "compile": False,
            "ratio": packed["step_s_median"] / separate["step_s_median"],
        }
    ]
    for row in report["steps"]:
        assert "error" not in row and row["grad_checkpointing"] is False, row
        assert row["step_s_min"] <= row["step_s_median"] <= row["step_s_max"]
        assert row["img_per_s"] == pytest.approx(row["batch"] / row["step_s_median"])
        flops = row["gflop_per_step"] * 1e9
        assert row["mfu"] == pytest.approx(
            flops / row["step_s_median"] / 1e12 / report["peak_tflops"]
        )
        assert row["optimizer"] == "foreach" and row["max_memory_gb"] is None  # on the CPU
        excess = row["first_step_s"] - row["step_s_median"] if row["compile"] else None
        assert row["compile_s_estimate"] == excess
        kernels = row["top_kernels"]
        assert 0 < len(kernels) <= 15 and sum(k["share"] for k in kernels) <= 1 + 1e-9
        shares = [k["share"] for k in kernels]
        assert shares == sorted(shares, reverse=True)
    tiny = report["steps"][0]
    # the teacher's forward of both views alone: a lower bound (by hand); the whole step is
    # student forward + backward, decoder, text tower and heads on top, well within 20x of it
    teacher = 2 * tiny["batch"] * backbone_forward_flops(32, 8, 1, 192)
    assert teacher < tiny["gflop_per_step"] * 1e9 < 20 * teacher
    best = max(range(len(report["steps"])), key=lambda i: report["steps"][i]["mfu"])
    assert report["best"] == best
    data = report["data"]
    assert [(r["source"], r["workers"]) for r in data["results"]] == [
        (source, workers) for source in ("shapes", "wds") for workers in (0, 1)
    ]
    assert data["img_size"] == 32 and data["generated"]["format"] == "jpg"
    # against the fastest base step of the whole run, the compiled ones timed after the data part
    # included (the script recomputes it after every part)
    fastest = max(r["img_per_s"] for r in report["steps"] if r["model"] == "vit_tiny_patch16_224")
    assert data["keeps_up_with"] == fastest
    for source, fewest in data["fewest_workers_keeping_up"].items():
        rates = {r["workers"]: r["img_per_s"] for r in data["results"] if r["source"] == source}
        keeping = [w for w, rate in rates.items() if rate >= fastest]
        assert fewest == (min(keeping) if keeping else None)


def test_without_a_gpu_the_real_run_refuses_in_one_line():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_recipe.py"], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "no CUDA device is visible; use --dry-run" in done.stderr.strip().splitlines()[-1]
