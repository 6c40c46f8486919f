"""Measuring a training step: FLOPs (FlopCounterMode), time, the machine's matmul peak."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import flop_counter

from m3i.config import Config
from m3i.data.batch import Batch, View
from m3i.data.shapes import CLASSES
from m3i.train.batches import training_source, training_stream
from m3i.train.build import build_model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_attention_formulas() -> dict[Any, Any]:
    """FLOP formulas for the CPU flash-attention kernel, which FlopCounterMode leaves at 0."""
    aten = torch.ops.aten
    if not hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return {}

    def forward(q, k, v, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return flop_counter.sdpa_flop_count(q, k, v)

    def backward(grad, q, k, v, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return flop_counter.sdpa_backward_flop_count(grad, q, k, v)

    return {
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward,
    }


def count_flops(step: Callable[[], Any]) -> int:
    """Matmul-class FLOPs (mm, bmm, conv, attention) of one call of `step`."""
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=cpu_attention_formulas())
    with counter:
        step()
    return counter.get_total_flops()


def train_step_flops(cfg: Config) -> int:
    """Matmul-class FLOPs of one training step of `cfg`: forward and backward of everything the
    step runs (student, EMA teacher, heads, decoder, text encoder), on the CPU, on the first
    batch of the run's own data stream (real masks, labels and captions). Not the Gaussian
    information estimates: monitors that the loop computes on logged steps only, as on every
    other step. Deterministic: the counts depend on shapes only, and the RNG is seeded inside
    and restored after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        source = training_source(cfg)
        model = build_model(cfg, source).train()
        model.measure_information = False  # as on the steps the loop does not log
        batch = next(training_stream(cfg, source, 0, torch.device("cpu")))
        return count_flops(lambda: model(batch)[0].backward())


def matmul_tflops(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Best TFLOP/s of a large square matmul (repetitions after one warm-up)."""
    size, inner, reps = (8192, 10, 4) if device.type == "cuda" else (1024, 1, 8)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for rep in range(reps):
        sync(device)
        start = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b)
        sync(device)
        if rep:
            best = min(best, (time.perf_counter() - start) / inner)
    return 2 * size**3 / best / 1e12


def time_steps(step: Callable[[], Any], count: int, device: torch.device) -> list[float]:
    """Seconds of each of `count` synchronised calls of `step`."""
    times = []
    for _ in range(count):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def summary(times: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def synthetic_batch(n: int, size: int, captions: list[str], device: torch.device) -> Batch:
    """Two normalised views, random crop boxes (top, left, h, w) and flips, labels, captions."""
    labels, indices = torch.randint(len(CLASSES), (n,)), torch.arange(n)
    views = []
    for _ in (1, 2):
        side = torch.empty(n).uniform_(0.35, 1.0).sqrt()  # area fraction 0.35..1, square crops
        top, left = (torch.rand(n) * (1 - side) for _ in range(2))
        box = torch.stack([top, left, side, side], dim=1)
        views.append(View(torch.randn(n, 3, size, size), box, torch.rand(n) < 0.5))
    captions = [captions[i % len(captions)] for i in range(n)]
    return Batch(views, labels, captions, indices).to(device)
