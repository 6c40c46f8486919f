"""BYOL and MoCo v3 (the pooled-view targets) against lightly's heads and loss and against MoCo
v3's Algorithm 1 written out, on tiny batches."""

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules.heads import (
    BYOLPredictionHead,
    BYOLProjectionHead,
    MoCoProjectionHead,
    ProjectionHead,
)
from torch import nn

from m3i.config import ConfigError, load_config
from m3i.data.batch import Batch
from m3i.mi.posteriors import gaussian
from m3i.mi.targets import RunContext, StepContext, Stream
from m3i.mi.targets.view_contrast import ViewContrastTarget, ViewContrastTargetConfig
from m3i.mi.targets.view_regress import ViewRegressTarget, ViewRegressTargetConfig

ENC, HIDDEN, OUT, TAU = 12, 16, 8, 0.2


def moco_target(pool: str = "mean") -> ViewContrastTarget:
    torch.manual_seed(0)
    cfg = ViewContrastTargetConfig(
        weight=1.0, embed_dim=OUT, hidden_dim=HIDDEN, temperature=TAU, pool=pool
    )
    return perturbed(ViewContrastTarget(cfg, RunContext(ENC)))


def byol_target(pool: str = "mean") -> ViewRegressTarget:
    torch.manual_seed(0)
    cfg = ViewRegressTargetConfig(weight=1.0, embed_dim=OUT, hidden_dim=HIDDEN, pool=pool)
    return perturbed(ViewRegressTarget(cfg, RunContext(ENC)))


def perturbed(target):
    """Non-trivial BatchNorm affine parameters, and an EMA projector unlike the online one."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in [*target.projector, *target.predictor, *target.teacher_projector.module]:
            if isinstance(module, nn.BatchNorm1d) and module.affine:
                module.weight.add_(0.3 * torch.randn(module.weight.shape, generator=g))
                module.bias.add_(0.3 * torch.randn(module.bias.shape, generator=g))
        for param in target.teacher_projector.module.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=g))
    return target.train()


def load_into(reference: ProjectionHead, ours: nn.Sequential) -> ProjectionHead:
    """Copy our weights into a lightly head of the same layout (our Linears have no bias, our
    affine-free BatchNorm is lightly's with weight 1 and bias 0)."""
    kinds = (nn.Linear, nn.BatchNorm1d)
    mine = [m for m in ours if isinstance(m, kinds)]
    theirs = [m for m in reference.layers if isinstance(m, kinds)]
    assert [type(m) for m in mine] == [type(m) for m in theirs]
    with torch.no_grad():
        for src, dst in zip(mine, theirs, strict=True):
            assert src.weight is None or src.weight.shape == dst.weight.shape
            if isinstance(src, nn.Linear):
                dst.weight.copy_(src.weight)
                if dst.bias is not None:
                    dst.bias.zero_()
            elif src.affine:
                dst.weight.copy_(src.weight)
                dst.bias.copy_(src.bias)
            else:
                dst.weight.fill_(1.0)
                dst.bias.zero_()
    return reference.train()


def lightly_moco(target: ViewContrastTarget) -> tuple[nn.Module, nn.Module, nn.Module]:
    """MoCo v3 (ViT): a 3-layer projector and a 2-layer predictor, BatchNorm in every layer."""
    projector = MoCoProjectionHead(ENC, HIDDEN, OUT, num_layers=3, batch_norm=True)
    predictor = MoCoProjectionHead(OUT, HIDDEN, OUT, num_layers=2, batch_norm=True)
    ema = MoCoProjectionHead(ENC, HIDDEN, OUT, num_layers=3, batch_norm=True)
    return (
        load_into(projector, target.projector),
        load_into(predictor, target.predictor),
        load_into(ema, target.teacher_projector.module),
    )


def lightly_byol(target: ViewRegressTarget) -> tuple[nn.Module, nn.Module, nn.Module]:
    return (
        load_into(BYOLProjectionHead(ENC, HIDDEN, OUT), target.projector),
        load_into(BYOLPredictionHead(OUT, HIDDEN, OUT), target.predictor),
        load_into(BYOLProjectionHead(ENC, HIDDEN, OUT), target.teacher_projector.module),
    )


def views(n: int, seed: int) -> dict[str, torch.Tensor]:
    """Pooled features: the student's of view 1 and view 2, the EMA backbone's of both."""
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(n, ENC, generator=g) for name in ("s1", "s2", "t1", "t2")}


def context(x: dict[str, torch.Tensor]) -> StepContext:
    """mix.ratio 1: one stream, image A = sample i in row i, its tokens pooling to x["s1"]."""
    n = len(x["s1"])
    stream = Stream(x["s1"][:, None], torch.zeros(n, 1, dtype=torch.long), torch.arange(n))
    return StepContext(
        Batch([]),
        {"a": stream},
        4,
        teacher_pooled={"view1": x["t1"], "view2": x["t2"]},
        student_pooled={"view2": x["s2"]},
    )


def swapped(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"s1": x["s2"], "s2": x["s1"], "t1": x["t2"], "t2": x["t1"]}


def ctr(q: torch.Tensor, k: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """MoCo v3's Algorithm 1: the cross-entropy of q k^T / tau on unit vectors (unscaled)."""
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).t() / TAU
    return F.cross_entropy(logits, positives)


# ---------------------------------------------------------------- heads


def test_heads_have_the_published_layouts():
    moco, byol = moco_target(), byol_target()
    layout = [type(m).__name__ for m in moco.projector]
    assert layout == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "BatchNorm1d"]
    assert [type(m).__name__ for m in moco.predictor] == layout[3:]
    assert not moco.projector[-1].affine and not moco.predictor[-1].affine  # MoCo v3's last BN
    assert [type(m).__name__ for m in byol.projector] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert [type(m).__name__ for m in byol.predictor] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    for head in (moco.projector, moco.predictor, byol.projector, byol.predictor):
        assert all(m.bias is None for m in head if isinstance(m, nn.Linear))
    assert (moco.projector[0].in_features, moco.projector[-2].out_features) == (ENC, OUT)
    assert (byol.predictor[0].in_features, byol.predictor[0].out_features) == (OUT, HIDDEN)


@pytest.mark.parametrize(
    "make, reference", [(moco_target, lightly_moco), (byol_target, lightly_byol)]
)
def test_heads_equal_lightly_heads_in_training_mode(make, reference):
    target = make()
    projector, predictor, _ = reference(target)
    x = torch.randn(5, ENC)
    torch.testing.assert_close(target.projector(x), projector(x), atol=1e-5, rtol=1e-5)
    z = torch.randn(5, OUT)
    torch.testing.assert_close(target.predictor(z), predictor(z), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- the losses


@pytest.mark.parametrize("n", [2, 3, 5])
def test_moco_is_moco_v3_algorithm_1(n):
    target = moco_target()
    x = views(n, seed=n)
    bound = target(context(x))
    projector, predictor, ema = lightly_moco(target)
    q1, q2 = predictor(projector(x["s1"])), predictor(projector(x["s2"]))
    with torch.no_grad():
        k1, k2 = ema(x["t1"]), ema(x["t2"])
    labels = torch.arange(n)
    ce12, ce21 = ctr(q1, k2, labels), ctr(q2, k1, labels)
    torch.testing.assert_close(bound.loss, 2 * TAU * ce12 + 2 * TAU * ce21, atol=1e-5, rtol=1e-5)
    expected_mi = ((math.log(n) - ce12) + (math.log(n) - ce21)) / 2
    torch.testing.assert_close(bound.mi, expected_mi.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_byol_is_the_symmetrised_normalised_l2(n):
    target = byol_target()
    x = views(n, seed=n)
    bound = target(context(x))
    projector, predictor, ema = lightly_byol(target)
    p1, p2 = predictor(projector(x["s1"])), predictor(projector(x["s2"]))
    with torch.no_grad():
        z1, z2 = ema(x["t1"]), ema(x["t2"])
    negative_cosine = NegativeCosineSimilarity()
    # BYOL: L = 2 - 2 cos(p1, z2') and its symmetrised twin, summed
    expected = (2 + 2 * negative_cosine(p1, z2)) + (2 + 2 * negative_cosine(p2, z1))
    torch.testing.assert_close(bound.loss, expected, atol=1e-5, rtol=1e-5)
    p1, p2, z1, z2 = (F.normalize(v, dim=-1) for v in (p1, p2, z1, z2))
    mis = [gaussian(p1, z2).mi, gaussian(p2, z1).mi]  # the Gaussian figure on unit vectors
    # NaN here: n unit vectors in 8 dimensions leave the covariances singular (docs/information.md)
    torch.testing.assert_close(bound.mi, sum(mis) / 2, atol=1e-5, rtol=1e-5, equal_nan=True)


def test_moco_with_two_mixed_images_averages_them_in_the_first_direction():
    """With a mix, stream b holds the partners: each of its queries' positive is its image's key."""
    n = 4
    target = moco_target()
    x = views(n, seed=7)
    ctx = context(x)
    partners = torch.arange(n - 1, -1, -1)
    b_pooled = torch.randn(n, ENC, generator=torch.Generator().manual_seed(8))
    ctx.streams["b"] = Stream(b_pooled[:, None], torch.zeros(n, 1, dtype=torch.long), partners)
    bound = target(ctx)
    projector, predictor, ema = lightly_moco(target)
    with torch.no_grad():
        k1, k2 = ema(x["t1"]), ema(x["t2"])
    first_a = ctr(predictor(projector(x["s1"])), k2, torch.arange(n))
    first_b = ctr(predictor(projector(b_pooled)), k2, partners)
    second = ctr(predictor(projector(x["s2"])), k1, torch.arange(n))
    expected = 2 * TAU * (first_a + first_b) / 2 + 2 * TAU * second
    torch.testing.assert_close(bound.loss, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", [moco_target, byol_target])
def test_swapping_the_views_gives_the_same_loss(make):
    target = make()
    x = views(4, seed=3)
    bound, swapped_bound = target(context(x)), target(context(swapped(x)))
    torch.testing.assert_close(bound.loss, swapped_bound.loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(bound.mi, swapped_bound.mi, atol=1e-6, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("make", [moco_target, byol_target])
def test_gradients_reach_the_online_heads_and_never_the_keys(make):
    target = make()
    x = {k: v.requires_grad_(True) for k, v in views(4, seed=4).items()}
    target(context(x)).loss.backward()
    assert x["t1"].grad is None and x["t2"].grad is None  # stop-gradient on the EMA side
    assert x["s1"].grad.abs().sum() > 0 and x["s2"].grad.abs().sum() > 0  # both views learn
    assert all(p.grad is None for p in target.teacher_projector.parameters())
    online = [*target.projector.parameters(), *target.predictor.parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in online)


@pytest.mark.parametrize("make", [moco_target, byol_target])
def test_pool_cls_reads_the_class_tokens_of_student_and_teacher(make):
    """pool=cls (MoCo v3 on a ViT): the loss of the class tokens, not of the tokens' means."""
    tokens, means = views(4, seed=9), views(4, seed=10)
    ctx = context(means)  # every image's tokens average to `means`
    ctx.streams["a"].class_token = tokens["s1"]
    ctx.student_class_token = {"view2": tokens["s2"]}
    ctx.teacher_class_token = {"view1": tokens["t1"], "view2": tokens["t2"]}
    loss = make("cls")(ctx).loss
    torch.testing.assert_close(loss, make("mean")(context(tokens)).loss)
    assert not torch.allclose(loss, make("mean")(ctx).loss)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model.name=convnext_atto", "model.patch_size=8"],
            "targets.view_contrast.pool=cls reads the class token, and model.name "
            "'convnext_atto' has none; set targets.view_contrast.pool=mean",
        ),
        (
            ["mix.ratio=0.5", "mix.isolate=false"],
            "targets.view_contrast.pool=cls reads each image's class token, and with "
            "mix.isolate=false the two images of a mix share one",
        ),
        (["targets.view_contrast.pool=max"], "targets.view_contrast.pool must be mean or cls"),
    ],
)
def test_pool_cls_is_refused_without_a_class_token_of_each_image(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("moco", overrides=overrides)
    load_config("moco", overrides=["mix.isolate=false"])  # mix.ratio 1: one image, its own


# ---------------------------------------------------------------- the EMA projector


@pytest.mark.parametrize(
    "make, reference", [(moco_target, lightly_moco), (byol_target, lightly_byol)]
)
def test_ema_projector_normalises_with_batch_statistics(make, reference):
    """As BYOL's and MoCo v3's target networks (run in training mode), in train and eval mode."""
    target = make()
    with torch.no_grad():  # running statistics that batch statistics cannot be mistaken for
        for module in target.teacher_projector.module:
            if isinstance(module, nn.BatchNorm1d):
                module.running_mean.fill_(3.0)
                module.running_var.fill_(9.0)
    _, _, ema = reference(target)
    frozen = copy.deepcopy(target.teacher_projector.module).eval()  # running statistics
    x = torch.randn(6, ENC)
    for mode in (True, False):
        target.train(mode)
        torch.testing.assert_close(target.teacher_projector(x), ema(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(target.teacher_projector(x), frozen(x), atol=1e-3)
        modes = {type(m): m.training for m in target.teacher_projector.module}
        assert modes == {nn.Linear: False, nn.BatchNorm1d: True, nn.ReLU: False}


@pytest.mark.parametrize("make", [moco_target, byol_target])
def test_momentum_update_moves_the_ema_projector(make):
    target = make()
    before = [p.clone() for p in target.teacher_projector.module.parameters()]
    target.projector(torch.randn(4, ENC))  # training mode: the student's running statistics move
    target.momentum_update(0.9)
    after = list(target.teacher_projector.module.parameters())
    for old, new, student in zip(before, after, target.projector.parameters(), strict=True):
        expected = 0.9 * old + 0.1 * student.detach()
        torch.testing.assert_close(new, expected, atol=1e-6, rtol=1e-6)
    student_buffers = dict(target.projector.named_buffers())
    for name, buffer in target.teacher_projector.module.named_buffers():
        assert torch.equal(buffer, student_buffers[name]), name
