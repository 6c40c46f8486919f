"""The step's dense teacher targets against the teacher's timm blocks run by hand: data2vec 2.0's
target for the `data2vec` preset, LayerNorm'd last-layer tokens (unchanged) for `m3i`."""

import pytest
import torch
import torch.nn.functional as F

from m3i.bench.measure import synthetic_batch
from m3i.config import load_config
from m3i.method import M3IModel
from m3i.mi.targets import RunContext
from m3i.mi.targets.dense import DenseTargetConfig
from tests.by_hand import vit_blocks_by_hand
from tests.tiny import TINY_M3I

SIZE, PATCH, DEPTH = 16, 4, 3
SMALL = TINY_M3I + [f"model.img_size={SIZE}", f"model.patch_size={PATCH}", f"model.depth={DEPTH}"]
EPS = 1e-5  # torch's default for instance_norm and layer_norm, as data2vec 2.0 uses them


def model_with_own_teacher(preset: str, overrides: list[str] = ()) -> M3IModel:
    """A model whose EMA teacher's weights differ from the student's (as after some steps)."""
    torch.manual_seed(0)
    model = M3IModel(
        load_config(preset, overrides=SMALL + list(overrides)), RunContext(num_classes=10)
    )
    with torch.no_grad():
        for param in model.teacher.module.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def normalise(x: torch.Tensor, dim: int) -> torch.Tensor:
    mean = x.mean(dim=dim, keepdim=True)
    return (x - mean) / ((x - mean).pow(2).mean(dim=dim, keepdim=True) + EPS).sqrt()


def data2vec_by_hand(vit, images: torch.Tensor, k: int) -> torch.Tensor:
    """data2vec 2.0's image target: the top k MLP outputs, each normalised over the tokens per
    sample and channel (instance norm), averaged, then normalised over the channels."""
    with torch.no_grad():
        top = vit_blocks_by_hand(vit, images)[1][-k:]
    return normalise(sum(normalise(x, dim=1) for x in top) / k, dim=-1)


def at_masked_positions(full: torch.Tensor, ctx) -> torch.Tensor:
    """Rows of stream a's samples, at the positions image A did not see."""
    samples, masked = ctx.streams["a"].samples, ctx.masked_positions
    return torch.stack(
        [
            torch.stack([full[int(samples[r]), int(q)] for q in masked[r]])
            for r in range(len(masked))
        ]
    )


def test_data2vec_preset_is_data2vec2_target_of_the_top_5_blocks():
    cfg = load_config("data2vec")
    assert cfg.targets.intra_view == DenseTargetConfig(weight=1.0, norm="instance", layers=5)
    assert cfg.model.depth == 6  # the top 5 of 6, as data2vec 2.0's top 10 of 12 for ViT-B


def test_siameseim_preset_has_the_official_decorrelation_weight():
    expected = DenseTargetConfig(weight=1.0, decorrelation=0.02)  # its neg_weight
    assert load_config("siameseim").targets.inter_view == expected


@pytest.mark.parametrize("k", [2, 5])  # 5 > depth 3: all of the blocks
def test_data2vec_target_equals_the_teachers_blocks_run_by_hand(k):
    model = model_with_own_teacher("data2vec", [f"targets.intra_view.layers={k}"])
    batch = synthetic_batch(3, SIZE, ["a caption"], torch.device("cpu"))
    ctx = model.encode(batch)
    assert len(ctx.teacher_layers["view1"]) == min(k, DEPTH)
    target = model.targets["intra_view"].target_tokens(ctx)
    teacher, student = model.teacher.module.vit, model.backbone.vit
    expected = at_masked_positions(
        data2vec_by_hand(teacher, batch.views[0].image, min(k, DEPTH)), ctx
    )
    torch.testing.assert_close(target, expected, atol=1e-4, rtol=1e-4)
    # the student's blocks give another target: the test tells the teacher from the student
    other = at_masked_positions(data2vec_by_hand(student, batch.views[0].image, min(k, DEPTH)), ctx)
    assert (other - expected).abs().max() > 1e-2
    assert not target.requires_grad


def test_m3i_dense_targets_are_layer_normed_last_layer_tokens_of_the_teacher():
    cfg = load_config("m3i")
    for name in ("intra_view", "inter_view"):  # METHOD §3: target = last-layer tokens
        assert getattr(cfg.targets, name) == DenseTargetConfig(weight=1.0)
    model = model_with_own_teacher("m3i", ["targets.text.weight=0"])  # no tokenizer needed
    batch = synthetic_batch(3, SIZE, ["a caption"], torch.device("cpu"))
    ctx = model.encode(batch)
    assert ctx.teacher_layers == {}  # no block outputs: no target reads them
    vit = model.teacher.module.vit
    with torch.no_grad():
        views = {
            v: F.layer_norm(
                vit.forward_features(batch.view(v).image)[:, vit.num_prefix_tokens :],
                (vit.embed_dim,),
            )
            for v in ("view1", "view2")
        }
    intra = model.targets["intra_view"].target_tokens(ctx)
    torch.testing.assert_close(intra, at_masked_positions(views["view1"], ctx))
    inter = model.targets["inter_view"].target_tokens(ctx)
    torch.testing.assert_close(inter, views["view2"][ctx.streams["b"].samples])
    assert not intra.requires_grad and not inter.requires_grad
