"""Full fine-tuning of a pre-trained backbone for classification (the BEiT/MAE recipe, small):
layer-wise learning-rate decay from timm's optimizer factory, label smoothing, drop path."""

from __future__ import annotations

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn

from m3i.data.base import ImageSource
from m3i.data.stream import batches
from m3i.data.views import EVAL_CROP_PCT, ViewConfig, ViewDataset, eval_data_config
from m3i.eval.features import image_batches
from m3i.eval.knn import topk_accuracy
from m3i.eval.settings import FinetuneSettings
from m3i.models.backbone import input_size


def finetune(
    model: nn.Module,
    train: ImageSource,
    val: ImageSource,
    settings: FinetuneSettings,
    seed: int = 0,
    device: torch.device | str = "cpu",
    crop_pct: float = EVAL_CROP_PCT,
) -> dict[str, float]:
    """Train every weight of `model` (with a fresh classifier head) on augmented train views;
    return val `top1`/`top5` in percent, on timm's eval views at `crop_pct`."""
    torch.manual_seed(seed)
    model.to(device).train()
    size = input_size(model)
    views = ViewConfig(scale_min=settings.scale_min, color_jitter=0.0, hue=0.0)
    dataset = ViewDataset(train, views, size, seed=seed, num_views=1)
    batch_size = min(settings.batch_size, len(dataset))
    per_epoch = max(len(dataset) // batch_size, 1)
    steps = settings.epochs * per_epoch
    optimizer = create_optimizer_v2(
        model,
        opt="adamw",
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        layer_decay=settings.layer_decay,
    )
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=steps,
        lr_min=settings.min_lr,
        warmup_t=int(settings.warmup_epochs * per_epoch),
        warmup_lr_init=settings.min_lr,
        t_in_epochs=False,
    )
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
    stream = batches(dataset, batch_size, seed, 0, torch.device(device))
    for step in range(steps):
        batch = next(stream)
        loss = loss_fn(model(batch.views[0].image), batch.labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step_update(step + 1)
    model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for images, batch_labels in image_batches(val, eval_data_config(size, crop_pct), 256):
            logits.append(model(images.to(device)).float().cpu())
            labels.append(batch_labels)
    return topk_accuracy(torch.cat(logits), torch.cat(labels))
