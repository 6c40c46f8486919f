"""Which target drives the backbone: the gradient each target's weighted loss sends into the
backbone, alone, on one real training batch.

Adam normalises each parameter's step by the running size of its *total* gradient, so a target
whose gradient into the backbone is far smaller than another's barely moves the shared weights
however low its loss could go. For every active target this prints the L2 norm of
d(weight * loss) / d(backbone parameters) (all backbone parameters as one vector), its share of
the sum of the norms, and the cosine between it and the sum of the others' gradients; and,
as a check, the norm of the total loss's gradient (the targets' gradients add up to it).

    PYTHONPATH=src python benchmarks/target_gradients.py [--preset m3i] [--set key=value ...]
        [--batch 64] [--seed 0] [--json]

Measured at initialisation by default; `--init RUN/backbone.safetensors` measures a trained
backbone (the heads are then fresh, as they are at step 0).
"""

from __future__ import annotations

import argparse
import json

import torch

from m3i.config import load_config
from m3i.data.batch import collate
from m3i.data.specs import open_source
from m3i.data.views import ViewDataset
from m3i.train.build import build_model


def backbone_gradient(model: torch.nn.Module, loss: torch.Tensor) -> torch.Tensor:
    """d loss / d backbone parameters, flattened into one vector (zeros where none flows)."""
    params = list(model.backbone.parameters())
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    pairs = zip(grads, params, strict=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in pairs])


def target_gradients(preset: str, overrides: list[str], batch_size: int, seed: int) -> dict:
    """{"targets": {name: {"norm", "share", "cosine_to_rest"}}, "total_norm", "sum_norm"} for
    one batch of `batch_size` training views of the config's data."""
    cfg = load_config(preset, overrides=overrides)
    source = open_source(cfg.data.spec, "train", num_samples=cfg.data.num_train)
    torch.manual_seed(seed)
    model = build_model(cfg, source).train()
    views = ViewDataset(source, cfg.views, cfg.model.img_size, seed=seed)
    batch = collate([views[i] for i in range(batch_size)])
    torch.manual_seed(seed + 1)
    ctx = model.encode(batch)
    grads, total = {}, torch.zeros(())
    for name, target in model.targets.items():
        loss = target.weight * target(ctx).loss
        grads[name] = backbone_gradient(model, loss)
        total = total + loss
    summed = torch.stack(list(grads.values())).sum(dim=0)
    norms = {name: g.norm().item() for name, g in grads.items()}
    return {
        "targets": {
            name: {
                "norm": norms[name],
                "share": norms[name] / sum(norms.values()),
                "cosine_to_rest": torch.nn.functional.cosine_similarity(
                    g, summed - g, dim=0
                ).item(),
            }
            for name, g in grads.items()
        },
        "total_norm": backbone_gradient(model, total).norm().item(),
        "sum_norm": summed.norm().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="m3i")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--init", default="", help="a backbone.safetensors to measure")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    overrides = args.set + ([f"init={args.init}"] if args.init else [])
    result = target_gradients(args.preset, overrides, args.batch, args.seed)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{'target':14s} {'grad norm':>10s} {'share':>7s} {'cos(rest)':>10s}")
    for name, row in result["targets"].items():
        print(f"{name:14s} {row['norm']:10.4g} {row['share']:7.1%} {row['cosine_to_rest']:10.3f}")
    print(f"total loss: grad norm {result['total_norm']:.4g} (sum of the above: "
          f"{result['sum_norm']:.4g})")  # fmt: skip


if __name__ == "__main__":
    main()
