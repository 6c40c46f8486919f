"""Full fine-tuning steps every weight with the BEiT layer-wise learning-rate decay."""

import pytest
import timm
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from m3i.data.specs import open_source
from m3i.eval.finetune import finetune
from m3i.eval.settings import FinetuneSettings

DEPTH, DECAY = 2, 0.5


def layer_id(name: str) -> int:
    """The layer of a ViT parameter as BEiT numbers them: the embeddings 0, block i i + 1, the
    head DEPTH + 1. timm (`VisionTransformer.group_matcher`) puts the final norm with the last
    block (BEiT and MAE put it with the head)."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    if name.startswith("norm."):
        return DEPTH
    assert name.startswith("head."), name
    return DEPTH + 1


def test_finetune_learning_rates_follow_layer_decay():
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=16,
        patch_size=4,
        depth=DEPTH,
        num_classes=10,
    )
    names = {id(p): n for n, p in model.named_parameters()}
    first_step: dict[str, float] = {}

    def record(optimizer, args, kwargs):
        if not first_step:
            for group in optimizer.param_groups:
                first_step.update({names[id(p)]: group["lr"] for p in group["params"]})

    train = open_source("shapes", "train", num_samples=16, image_size=16)  # 2 steps
    val = open_source("shapes", "val", num_samples=8, image_size=16)
    settings = FinetuneSettings(epochs=1, batch_size=8, layer_decay=DECAY, drop_path=0.0)
    handle = register_optimizer_step_pre_hook(record)
    try:
        finetune(model, train, val, settings)
    finally:
        handle.remove()
    assert first_step.keys() == set(names.values())  # every weight is fine-tuned
    head_lr = first_step["head.weight"]
    assert head_lr > 0
    for name, lr in first_step.items():
        expected = DECAY ** (DEPTH + 1 - layer_id(name))
        assert lr / head_lr == pytest.approx(expected, rel=1e-6), name
