"""The presets' structure against the originals: supervised's head is timm's linear classifier,
CLIP's image head open_clip's timm tower (GAP, a bias-free linear projection), MoCo v3 pools the
class token of student and EMA network as timm's global_pool="token" does, BYOL's and MoCo v3's
MLPs have the published widths, their momentum schedules the papers' formulas."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from open_clip.timm_model import TimmModel
from torch import nn

from m3i.config import load_config
from m3i.data.batch import Batch, collate
from m3i.data.specs import open_source
from m3i.data.views import ViewDataset
from m3i.method import M3IModel
from m3i.mi.targets import RunContext, StepContext, Stream
from m3i.mi.targets.text import TextTarget
from m3i.mi.targets.view_contrast import ViewContrastTarget
from m3i.mi.targets.view_regress import ViewRegressTarget
from m3i.models.backbone import Backbone
from m3i.models.text import train_bpe

SMALL = ["model.img_size=16", "model.patch_size=4", "model.depth=2"]
VIT = dict(img_size=16, patch_size=4, depth=2)  # timm's arguments for the same model


def perturb(module: nn.Module, seed: int, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(scale * torch.randn(param.shape, generator=g))


@torch.no_grad()
def test_supervised_is_timms_linear_classifier_on_the_average_pooled_tokens():
    """timm's VisionTransformer(global_pool="avg", num_classes=C) with our backbone's weights
    and the class embeddings and biases as its head gives our logits, and their loss."""
    torch.manual_seed(0)
    classes = 5
    model = M3IModel(load_config("supervised", overrides=SMALL), RunContext(num_classes=classes))
    target = model.targets["category"]
    perturb(target, seed=1)  # a bias that is not 0
    assert isinstance(target.head, nn.Identity) and target.class_bias.shape == (classes,)
    reference = timm.create_model(
        "vit_tiny_patch16_224", num_classes=classes, global_pool="avg", fc_norm=False, **VIT
    )
    state = {
        **model.backbone.timm_model.state_dict(),
        "head.weight": target.class_embedding,
        "head.bias": target.class_bias,
    }
    reference.load_state_dict(state)
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 3, 4, 3])
    logits = reference.eval()(images)
    tokens = model.backbone(images)
    torch.testing.assert_close(target.logits(tokens.mean(dim=1)), logits)
    stream = Stream(tokens, torch.arange(16).expand(4, 16), torch.arange(4))
    bound = target(StepContext(Batch([], labels), {"a": stream}, 4))
    torch.testing.assert_close(bound.loss, F.cross_entropy(logits, labels))


@torch.no_grad()
def test_clip_image_head_is_open_clips_timm_tower():
    """open_clip's TimmModel(pool="avg", proj="linear", proj_bias=False) of our backbone's
    weights and our projection embeds the images as the clip preset does (unit vectors)."""
    torch.manual_seed(0)
    cfg = load_config("clip", overrides=["model.img_size=224", "model.patch_size=16"])
    cfg.model.depth = None  # open_clip builds the timm model as registered (12 blocks)
    backbone = Backbone(cfg.model).eval()
    tokenizer = train_bpe(["a red circle", "two blue squares"], vocab_size=60)
    target = TextTarget(cfg.targets.text, RunContext(backbone.embed_dim, tokenizer=tokenizer))
    assert isinstance(target.head, nn.Linear) and target.head.bias is None
    tower = TimmModel(
        cfg.model.name, cfg.targets.text.embed_dim, 224, pool="avg", proj="linear", proj_bias=False
    )
    tower.trunk.load_state_dict(backbone.timm_model.state_dict())
    tower.head.proj.weight.copy_(target.head.weight)
    images = torch.randn(2, 3, 224, 224)
    expected = F.normalize(tower.eval()(images), dim=-1)
    torch.testing.assert_close(target.encode_image(backbone.pooled(images)), expected)


@torch.no_grad()
def test_moco_pools_the_class_token_of_student_and_ema_network_as_timm_does():
    """MoCo v3's base and momentum encoders are timm ViTs whose features are the class token
    after the final norm: the moco step reads exactly those, for view 1 (the student's input),
    view 2 (its second pass) and both views through the EMA network (perturbed away from the
    student). Its patch projection is frozen (--stop-grad-conv1)."""
    torch.manual_seed(0)
    source = open_source("shapes", "train", num_samples=4, image_size=16)
    small = ["targets.view_contrast.hidden_dim=16", "targets.view_contrast.embed_dim=8"]
    model = M3IModel(load_config("moco", overrides=SMALL + small), RunContext())
    perturb(model.backbone, seed=2)
    perturb(model.teacher.module, seed=3)
    assert not any(p.requires_grad for p in model.backbone.timm_model.patch_embed.parameters())
    cfg = model.cfg
    batch = collate([ViewDataset(source, cfg.views, 16, seed=0)[i] for i in range(3)])
    ctx = model.encode(batch)

    def token_model(backbone: Backbone) -> nn.Module:
        reference = timm.create_model(
            "vit_tiny_patch16_224", num_classes=0, global_pool="token", **VIT
        )
        reference.load_state_dict(backbone.timm_model.state_dict())
        return reference.eval()

    student, teacher = token_model(model.backbone), token_model(model.teacher.module)
    view1, view2 = (v.image for v in batch.views[:2])
    torch.testing.assert_close(ctx.streams["a"].class_token, student(view1))
    torch.testing.assert_close(ctx.student_class_token["view2"], student(view2))
    torch.testing.assert_close(ctx.teacher_class_token["view1"], teacher(view1))
    torch.testing.assert_close(ctx.teacher_class_token["view2"], teacher(view2))


def test_a_vit_without_a_class_token_is_refused_for_pool_cls():
    cfg = load_config("moco", overrides=[*SMALL, "model.name=vit_base_patch16_gap_224"])
    with pytest.raises(ValueError, match="pools with the class token .* has none"):
        M3IModel(cfg, RunContext())


def linear_sizes(head: nn.Sequential) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in head if isinstance(m, nn.Linear)]


def test_moco_and_byol_heads_have_the_published_widths():
    """MoCo v3 (ViT): mlp_dim 4096, dim 256, a 3-layer projector and 2-layer predictor; BYOL:
    hidden 4096, projection 256, one hidden layer each (embedding width 192 here)."""
    moco = load_config("moco").targets.view_contrast
    byol = load_config("byol").targets.view_regress
    contrast = ViewContrastTarget(moco, RunContext(192))
    assert linear_sizes(contrast.projector) == [(192, 4096), (4096, 4096), (4096, 256)]
    assert linear_sizes(contrast.predictor) == [(256, 4096), (4096, 256)]
    regress = ViewRegressTarget(byol, RunContext(192))
    assert linear_sizes(regress.projector) == [(192, 4096), (4096, 256)]
    assert linear_sizes(regress.predictor) == [(256, 4096), (4096, 256)]
    assert (moco.pool, byol.pool) == ("cls", "mean")


@pytest.mark.parametrize("preset, base", [("byol", 0.996), ("moco", 0.99)])
def test_momentum_schedules_are_the_papers(preset, base):
    """BYOL: tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2; MoCo v3 (adjust_moco_momentum):
    m = 1 - 0.5 (1 + cos(pi k / K)) (1 - moco_m), tau_base 0.996 and moco_m 0.99."""
    teacher, total = load_config(preset).teacher, 1000
    for step in (0, 1, 250, 500, 999, 1000):
        expected = 1 - (1 - base) * (math.cos(math.pi * step / total) + 1) / 2
        assert teacher.momentum_at(step, total) == pytest.approx(expected, abs=1e-12), step
