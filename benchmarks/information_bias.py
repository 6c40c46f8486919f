"""Bias and spread of the Gaussian-channel information estimate at a training batch's tokens.

Synthetic jointly Gaussian tokens with a closed-form answer: each token at grid position p is
y = mu_p + s + n, s ~ N(0, Sigma_s) (what the input tells), n ~ N(0, Sigma_n) (what it cannot),
with random full-rank Sigma_s, Sigma_n (correlated noise). The optimal predictor is mu_p + s
and I = 0.5 log det(Sigma_s + Sigma_n) - 0.5 log det Sigma_n; a position-only predictor (mu_p)
has I = 0. Each token count is drawn `--repeats` times; the JSON line per case gives the mean
and standard deviation of:

  estimate   m3i.mi.posteriors.gaussian (Wishart bias-corrected log dets)
  plug_in    the same without the correction: 0.5 log det(W_y / dof_y) - 0.5 log det(W_e / (T-1))
  jackknife  the estimate with images= (each image's tokens left out in turn), and its
             standard error `jackknife_se`
  per_dim    the former figure, sum_d 0.5 log(Var_d / MSE_d) (overall mean removed)

and `estimate_ms`, the median time of one `gaussian` call (loss and estimate). Then the
`CLUSTERED` cases (`clustered_tokens`: every token of an image shares a rank-r part g) give
the bias of the plain estimate and of the jackknife over images, the jackknife's standard
error and the time of each, over `--repeats` draws.

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
# (rank of the image-level part g, its scale, what g is: signal the predictor knows, or error)
CLUSTERED = [
    (16, 1.0, "signal"),
    (32, 3.0, "signal"),
    (64, 3.0, "signal"),
    (16, 1.0, "error"),
    (32, 3.0, "error"),
    (64, 3.0, "error"),
]


def random_covariance(d: int, scale: float, floor: float, g: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return scale * a @ a.t() / d + floor * torch.eye(d, dtype=torch.float64)


def clustered_tokens(
    images: int, rank: int, scale: float, shared: str, seed: int, sample_seed: int | None = None
) -> dict:
    """Tokens that share their image (issue 25): y = mu_p + g_image + s + n at every one of 64
    positions of each image, D = 192, g = `scale` times a random rank-`rank` orthonormal
    loading of N(0, I) image factors; s, n as in `run_case`. shared="signal": the optimal
    predictor knows g (mu_p + g + s); "error": it does not (mu_p + s), and g is part of every
    error of the image. `seed` draws the covariances (and `sample_seed`, default `seed`, the
    tokens)."""
    positions, d = 64, 192
    g = torch.Generator().manual_seed(seed)
    sigma_s, sigma_n = random_covariance(d, 1, 0.0, g), random_covariance(d, 1, 0.3, g)
    loading = scale * torch.linalg.qr(torch.randn(d, rank, generator=g, dtype=torch.float64))[0]
    sigma_g = loading @ loading.t()
    error = sigma_n + (sigma_g if shared == "error" else 0)
    exact = 0.5 * (torch.logdet(sigma_s + sigma_n + sigma_g) - torch.logdet(error)).item()
    means = 3 * torch.randn(positions, d, generator=g, dtype=torch.float64)
    if sample_seed is not None:
        g = torch.Generator().manual_seed(sample_seed)
    where = torch.arange(positions).expand(images, positions)
    signal = torch.randn(images, positions, d, generator=g, dtype=torch.float64)
    signal = signal @ torch.linalg.cholesky(sigma_s).t()
    noise = torch.randn(images, positions, d, generator=g, dtype=torch.float64)
    noise = noise @ torch.linalg.cholesky(sigma_n).t()
    content = (torch.randn(images, rank, generator=g, dtype=torch.float64) @ loading.t())[:, None]
    known = means[where] + signal + (content if shared == "signal" else 0)
    return {
        "target": means[where] + signal + noise + content,
        "optimal": known,
        "positions": where,
        "images": torch.arange(images)[:, None].expand(images, positions),
        "exact": exact,
    }


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
    names = ("estimate", "jackknife", "jackknife_se", "plug_in", "per_dim", "zero")
    rows: dict[str, list[float]] = {k: [] for k in names}
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
        images = torch.arange(n)[:, None].expand(n, q)
        jackknife = gaussian(optimal, target, positions, grid, images=images)
        rows["jackknife"].append(jackknife.mi.item())
        rows["jackknife_se"].append(jackknife.se.item())
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


def run_clustered(rank: int, scale: float, shared: str, repeats: int, images: int = 64) -> dict:
    """Bias of the plain estimate and of the jackknife over images, on `repeats` draws of
    `clustered_tokens` (covariances and tokens from seed 0, 1, ...), and the time of each."""
    rows: dict[str, list[float]] = {"plain": [], "jackknife": [], "jackknife_se": []}
    seconds: dict[str, list[float]] = {"plain": [], "jackknife": []}
    for seed in range(repeats):
        t = clustered_tokens(images, rank, scale, shared, seed)
        args = (t["optimal"], t["target"], t["positions"], 64)
        tick = time.perf_counter()
        plain = gaussian(*args).mi.item()
        middle = time.perf_counter()
        jackknife = gaussian(*args, images=t["images"])
        seconds["plain"].append(middle - tick)
        seconds["jackknife"].append(time.perf_counter() - middle)
        rows["plain"].append(plain - t["exact"])
        rows["jackknife"].append(jackknife.mi.item() - t["exact"])
        rows["jackknife_se"].append(jackknife.se.item())
    return {
        "case": f"{images} images, g rank {rank}, scale {scale}, shared {shared}",
        "exact_first_draw": round(clustered_tokens(2, rank, scale, shared, 0)["exact"], 2),
        **{f"{k}_bias" if k != "jackknife_se" else k: summary(v) for k, v in rows.items()},
        **{f"{k}_ms": round(1000 * statistics.median(v), 1) for k, v in seconds.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=64, help="images of the CLUSTERED cases")
    parser.add_argument("--clustered-only", action="store_true")
    args = parser.parse_args()
    for index, case in enumerate([] if args.clustered_only else CASES):
        print(json.dumps(run_case(*case, args.repeats, args.seed + index)), flush=True)
    for case in CLUSTERED:
        print(json.dumps(run_clustered(*case, args.repeats, args.images)), flush=True)


if __name__ == "__main__":
    main()
