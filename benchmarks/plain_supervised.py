"""The ceiling of a CPU budget: a timm ViT trained on `shapes` with nothing but cross-entropy.

A reference outside the package's training loop for how fast the backbone of the default config
can learn the 10 shapes at all: timm's VisionTransformer (`--model-name`, with the default config's
32 px, 4 px patches and 6 blocks), batch 64 of the training images without augmentation, AdamW
(lr 1e-3, weight decay 0.05) with `--warmup` linear warm-up steps and a cosine schedule to zero,
then DINO's weighted kNN (k 20, temperature 0.07, `m3i.eval.knn`) on the mean of the final
tokens, the same features and protocol as `m3i eval knn`.

    PYTHONPATH=src python benchmarks/plain_supervised.py [--steps 150] [--image-size 32]
        [--patch-size 4] [--num-train 10000] [--num-val 2000] [--seed 0] [--json]

Prints the cross-entropy of the last 10 batches and the kNN top-1 on the val images.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import time

import timm
import torch
import torch.nn.functional as F

from m3i.data.shapes import CLASSES, ShapesDataset
from m3i.data.views import eval_data_config
from m3i.eval.features import image_batches
from m3i.eval.knn import knn_scores, topk_accuracy


def load(split: str, count: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The split's first `count` images as `m3i eval` reads them (normalised), and labels."""
    source = ShapesDataset(split, count, image_size=size)
    batches = list(image_batches(source, eval_data_config(size), 1000))
    return torch.cat([images for images, _ in batches]), torch.cat(
        [labels for _, labels in batches]
    )


def build_model(model_name: str, image_size: int, patch_size: int, depth: int) -> torch.nn.Module:
    """The timm ViT of the default config with a 10-way head on its average-pooled tokens."""
    return timm.create_model(
        model_name,
        num_classes=len(CLASSES),
        img_size=image_size,
        patch_size=patch_size,
        depth=depth,
        global_pool="avg",
        fc_norm=False,
    )


@torch.no_grad()
def features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    pooled = [
        model.forward_head(model.forward_features(chunk), pre_logits=True)
        for chunk in images.split(500)
    ]
    model.train()
    return torch.cat(pooled)


def train_and_probe(
    model_name: str = "vit_tiny_patch16_224",
    steps: int = 150,
    batch: int = 64,
    lr: float = 1e-3,
    warmup: int = 20,
    image_size: int = 32,
    patch_size: int = 4,
    depth: int = 6,
    num_train: int = 10000,
    num_val: int = 2000,
    seed: int = 0,
) -> dict:
    """Train from scratch on `shapes` and return the last 10 batches' cross-entropy and the kNN
    top-1 on the val images."""
    start = time.perf_counter()
    train_x, train_y = load("train", num_train, image_size)
    val_x, val_y = load("val", num_val, image_size)
    torch.manual_seed(seed)
    model = build_model(model_name, image_size, patch_size, depth)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps)),
    )
    generator = torch.Generator().manual_seed(seed)
    losses = []
    trained = time.perf_counter()
    for _ in range(steps):
        index = torch.randint(0, len(train_x), (batch,), generator=generator)
        loss = F.cross_entropy(model(train_x[index]), train_y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    trained = time.perf_counter() - trained
    scores = knn_scores(features(model, train_x), train_y, features(model, val_x), len(CLASSES))
    return {
        "steps": steps,
        "cross_entropy_last_10": sum(losses[-10:]) / len(losses[-10:]),
        "knn_top1": topk_accuracy(scores, val_y)["top1"],
        "train_seconds": round(trained, 1),
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, parameter in inspect.signature(train_and_probe).parameters.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=type(parameter.default), default=parameter.default)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = train_and_probe(**{k: v for k, v in vars(args).items() if k != "json"})
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{args.steps} steps: cross-entropy {result['cross_entropy_last_10']:.3f} (last 10 "
            f"batches), knn top1 {result['knn_top1']:.2f}; {result['train_seconds']} s training"
        )


if __name__ == "__main__":
    main()
