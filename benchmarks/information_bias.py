"""Bias and spread of the Gaussian-channel information estimate at a training batch's tokens.

Synthetic jointly Gaussian tokens with a closed-form answer: each token at grid position p is
y = mu_p + s + n, s ~ N(0, Sigma_s) (what the input tells), n ~ N(0, Sigma_n) (what it cannot),
with random full-rank Sigma_s, Sigma_n (correlated noise). The optimal predictor is mu_p + s
and I = 0.5 log det(Sigma_s + Sigma_n) - 0.5 log det Sigma_n; a position-only predictor (mu_p)
has I = 0. Each token count is drawn `--repeats` times; the JSON line per case gives the mean
and standard deviation of:

  estimate   m3i.mi.posteriors.gaussian (Wishart bias-corrected log dets)
  plug_in    the same without the correction: 0.5 log det(W_y / dof_y) - 0.5 log det(W_e / (T-1))
  per_dim    the former figure, sum_d 0.5 log(Var_d / MSE_d) (overall mean removed)

and `estimate_ms`, the median time of one `gaussian` call (loss and estimate).

    PYTHONPATH=src python benchmarks/information_bias.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from m3i.mi.posteriors import gaussian

# (name, images, query positions per image, positions on the grid, D) as in the default run
CASES = [
    ("intra_view default (64 images x 32 masked)", 64, 32, 64, 192),
    ("inter_view default (64 images x 64)", 64, 64, 64, 192),
    ("pixels, mae preset (64 images x 48 masked)", 64, 48, 64, 48),
    ("pixels, 64 images x 32 masked", 64, 32, 64, 48),
    ("intra_view, 16 images", 16, 32, 64, 192),
    ("intra_view, 8 images", 8, 32, 64, 192),
    ("tiny test step (4 images x 8 masked of 16, D 192)", 4, 8, 16, 192),
]


def random_covariance(d: int, scale: float, floor: float, g: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return scale * a @ a.t() / d + floor * torch.eye(d, dtype=torch.float64)


def plug_in(prediction: torch.Tensor, target: torch.Tensor, positions: torch.Tensor) -> float:
    """0.5 log det of the unbiased residual covariance minus that of the error covariance."""
    d = target.shape[-1]
    y, p, q = target.reshape(-1, d), prediction.reshape(-1, d), positions.reshape(-1)
    residual = y.clone()
    for position in q.unique():
        rows = q == position
        residual[rows] -= y[rows].mean(0)
    dof = len(y) - len(q.unique())
    error = y - p - (y - p).mean(0)
    cov_y, cov_e = residual.t() @ residual / dof, error.t() @ error / (len(y) - 1)
    return 0.5 * (torch.linalg.slogdet(cov_y)[1] - torch.linalg.slogdet(cov_e)[1]).item()


def per_dim(prediction: torch.Tensor, target: torch.Tensor) -> float:
    d = target.shape[-1]
    y, p = target.reshape(-1, d), prediction.reshape(-1, d)
    return 0.5 * torch.log(y.var(0, unbiased=False) / (y - p).pow(2).mean(0)).sum().item()


def summary(values: list[float]) -> dict[str, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"mean": math.nan, "std": math.nan, "finite": 0}
    mean = sum(finite) / len(finite)
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / max(len(finite) - 1, 1))
    return {"mean": round(mean, 3), "std": round(std, 3), "finite": len(finite)}


def run_case(name: str, n: int, q: int, grid: int, d: int, repeats: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    sigma_s = random_covariance(d, 0.5, 0.0, g)
    sigma_n = random_covariance(d, 0.5, 0.2, g)
    exact = (
        0.5 * (torch.linalg.slogdet(sigma_s + sigma_n)[1] - torch.linalg.slogdet(sigma_n)[1]).item()
    )
    chol_s, chol_n = torch.linalg.cholesky(sigma_s), torch.linalg.cholesky(sigma_n)
    means = 3 * torch.randn(grid, d, generator=g, dtype=torch.float64)
    rows: dict[str, list[float]] = {k: [] for k in ("estimate", "plug_in", "per_dim", "zero")}
    seconds = []
    for _ in range(repeats):
        positions = torch.rand(n, grid, generator=g).argsort(1)[:, :q]
        signal = torch.randn(n, q, d, generator=g, dtype=torch.float64) @ chol_s.t()
        noise = torch.randn(n, q, d, generator=g, dtype=torch.float64) @ chol_n.t()
        target = means[positions] + signal + noise
        optimal = means[positions] + signal
        tick = time.perf_counter()
        rows["estimate"].append(gaussian(optimal, target, positions, grid).mi.item())
        seconds.append(time.perf_counter() - tick)
        rows["plug_in"].append(plug_in(optimal, target, positions))
        rows["per_dim"].append(per_dim(optimal, target))
        rows["zero"].append(gaussian(means[positions], target, positions, grid).mi.item())
    return {
        "case": name,
        "tokens": n * q,
        "D": d,
        "exact": round(exact, 3),
        **{k: summary(v) for k, v in rows.items() if k != "zero"},
        "position_only_exact": 0.0,
        "position_only_estimate": summary(rows["zero"]),
        "estimate_ms": round(1000 * statistics.median(seconds), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for index, case in enumerate(CASES):
        print(json.dumps(run_case(*case, args.repeats, args.seed + index)), flush=True)


if __name__ == "__main__":
    main()
