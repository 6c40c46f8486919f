"""benchmarks/gpu_mfu.py runs on the CPU at tiny sizes and prints one sensible JSON line."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(img_size=32, patch_size=8, depth=1, batch_size=4, dim=192)  # vit_tiny, one block
MODEL_KEYS = {
    "model",
    "params_m",
    "gflops_per_step",
    "step_s_median",
    "step_s_min",
    "step_s_max",
    "img_per_s",
    "mfu",
    "max_memory_gb",
}


def backbone_forward_flops(img_size: int, patch_size: int, depth: int, dim: int) -> int:
    """Matmul FLOPs of one image through a ViT by hand: patch embedding, then per block
    qkv + proj + MLP (12 dim^2 weights) on every token and the two attention products."""
    patches = (img_size // patch_size) ** 2
    tokens = patches + 1  # the class token
    embed = 2 * 3 * patch_size**2 * dim * patches
    block = 2 * 12 * dim * dim * tokens + 4 * tokens * tokens * dim
    return embed + depth * block


def test_cpu_tiny_run_prints_one_json_line():
    command = [sys.executable, "benchmarks/gpu_mfu.py", "--device", "cpu"]
    command += ["--models", "vit_tiny_patch16_224", "--img-size", str(TINY["img_size"])]
    command += ["--patch-size", str(TINY["patch_size"]), "--depth", str(TINY["depth"])]
    command += ["--batch-size", str(TINY["batch_size"]), "--steps", "2", "--warmup", "1"]
    command += ["--precision", "fp32"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout  # progress goes to stderr
    report = json.loads(lines[-1])
    assert {"device", "precision", "batch_size", "img_size", "preset"} <= report.keys()
    assert {"peak_tflops", "peak_source", "matmul_tflops", "models"} <= report.keys()
    assert report["precision"] == "fp32" and report["batch_size"] == TINY["batch_size"]
    assert report["peak_source"] == "measured_matmul"
    assert report["peak_tflops"] == report["matmul_tflops"] > 0
    (result,) = report["models"]
    assert result.keys() == MODEL_KEYS, result
    assert result["model"] == "vit_tiny_patch16_224"
    assert result["max_memory_gb"] is None
    assert 0.3 < result["params_m"] < 0.7  # one block of width 192 plus the patch embedding
    # The teacher alone runs the backbone forward on both views, so that is a lower bound;
    # student forward + backward, decoder, text encoder and heads stay well within 20x of it.
    keys = ("img_size", "patch_size", "depth", "dim")
    views = 2 * TINY["batch_size"] * backbone_forward_flops(*(TINY[k] for k in keys))
    assert views < result["gflops_per_step"] * 1e9 < 20 * views
    assert 0 < result["step_s_min"] <= result["step_s_median"] <= result["step_s_max"]
    assert result["img_per_s"] > 0
    assert 0 < result["mfu"] < 1
