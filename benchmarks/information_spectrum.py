"""Where a run's Gaussian-channel figures come from: the target spectrum against the error.

Loads RUN_DIR's newest checkpoint, draws training batches (view seed 1) and prints, per dense
target (intra_view, inter_view) and batch: the plain figure, the logged `mi/<target>` (the
jackknife over images) with its standard error `mi_se/<target>`, the MSE, the residual
target variance per dimension (after the per-position means of the batch), how many principal
directions of the residual targets hold 99% of their variance, the same figure computed on
the projection of targets and predictions onto those directions only, and the two smallest
residual variances (principal directions).

    PYTHONPATH=src python benchmarks/information_spectrum.py RUN_DIR [--batches 2]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from m3i.config import config_from_dict
from m3i.data.stream import batches
from m3i.data.views import ViewDataset
from m3i.mi.gaussian_channel import gaussian_information
from m3i.mi.targets.base import row_images
from m3i.train.batches import training_source
from m3i.train.build import build_model
from m3i.train.checkpoint import load_checkpoint


def spectrum(prediction: torch.Tensor, target: torch.Tensor, positions: torch.Tensor, grid: int):
    d = target.shape[-1]
    y, q = target.reshape(-1, d).double(), positions.reshape(-1)
    means = torch.zeros(grid, d, dtype=torch.float64).index_add_(0, q, y)
    means /= torch.bincount(q, minlength=grid).clamp_min(1)[:, None]
    residual, error = y - means[q], y - prediction.reshape(-1, d).double()
    variance, axes = torch.linalg.eigh(residual.t() @ residual / len(y))
    variance, axes = variance.flip(0), axes.flip(1)
    top = int((variance.cumsum(0) / variance.sum() < 0.99).sum()) + 1
    main_axes = axes[:, :top].to(target.dtype)
    jackknife = gaussian_information(prediction, target, positions, grid, row_images(positions))
    on_main_axes, _ = gaussian_information(
        prediction @ main_axes, target @ main_axes, positions, grid
    )
    return {
        "figure": round(gaussian_information(prediction, target, positions, grid)[0].item(), 2),
        "jackknife_and_se": [round(v.item(), 2) for v in jackknife],
        "mse": round(error.pow(2).mean().item(), 4),
        "residual_variance_per_dim": round(residual.pow(2).mean().item(), 4),
        "directions_for_99pct": top,
        "figure_on_those": round(on_main_axes.item(), 2),
        "smallest_variances": [float(f"{v:.3g}") for v in variance[-2:].flip(0)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--batches", type=int, default=2)
    args = parser.parse_args()
    state = load_checkpoint(args.run)
    cfg = config_from_dict(state["config"])
    mixture = training_source(cfg)
    model = build_model(cfg, mixture)
    model.load_state_dict(state["model"])
    dataset = ViewDataset(mixture.sources[0], cfg.views, cfg.model.img_size, seed=1)
    stream = batches(dataset, cfg.train.batch_size, 1, 0, torch.device("cpu"), 0)
    torch.manual_seed(1)
    with torch.no_grad():
        for index in range(args.batches):
            ctx = model.encode(next(stream))
            for name, target in model.targets.items():
                if name in ("intra_view", "inter_view"):
                    tokens, positions = target.target_tokens(ctx), target.query_positions(ctx)
                    grid = ctx.teacher_dense[target.teacher].shape[1]
                    prediction = target.head(ctx.decoded[target.queries])
                    row = spectrum(prediction, tokens, positions, grid)
                    print(json.dumps({"target": name, "batch": index, **row}), flush=True)


if __name__ == "__main__":
    main()
