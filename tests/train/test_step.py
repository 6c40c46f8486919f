"""The M3I step on real `shapes` views: every preset's losses are finite at batch sizes 1 and 2."""

import math

import pytest
import torch

from m3i.bench.measure import synthetic_batch
from m3i.config import ConfigError, load_config, preset_names, preset_values
from m3i.data.base import ImageSource
from m3i.data.batch import collate
from m3i.data.shapes import CLASSES, ShapesDataset
from m3i.data.specs import open_source
from m3i.data.views import ViewDataset
from m3i.method import M3IModel
from m3i.mi.targets import RunContext, information
from m3i.models.text import train_bpe
from m3i.train.build import build_model
from m3i.train.stopping import TrainingError
from tests.tiny import TINY_M3I

SMALL = ["model.img_size=16", "model.patch_size=4", "model.depth=2", "decoder.depth=1"]
PRESETS = ["m3i", "supervised", "clip", "mae", "data2vec", "siameseim", "byol", "moco"]


@pytest.fixture(scope="module")
def source():
    return open_source("shapes", "train", num_samples=8, image_size=16)


def make_batch(source, cfg, n):
    views = ViewDataset(source, cfg.views, cfg.model.img_size, seed=0)
    return collate([views[i] for i in range(n)])


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("n", [1, 2])
def test_every_loss_is_finite_and_trains_the_backbone(source, preset, n):
    torch.manual_seed(0)
    if n == 1 and preset in ("byol", "moco"):  # BatchNorm in their heads needs two images
        with pytest.raises(ConfigError, match="at least 2 images per micro-batch"):
            load_config(preset, overrides=SMALL + ["train.batch_size=1"])
        return
    cfg = load_config(preset, overrides=SMALL)
    model = M3IModel(
        cfg,
        RunContext(num_classes=len(source.classes), tokenizer=train_bpe(source.captions(), 200)),
    )
    loss, monitors = model(make_batch(source, cfg, n))
    assert torch.isfinite(loss)
    estimates = [t for t in cfg.active_targets() if information()[t] == "estimate"]
    assert set(monitors) == {
        f"{kind}/{t}" for t in cfg.active_targets() for kind in ("loss", "mi")
    } | {f"mi_se/{t}" for t in estimates}  # an estimate's standard error, a bound has none
    for key, value in monitors.items():  # a Gaussian estimate needs more tokens than D = 192
        kind = information()[key.split("/")[1]] if key.startswith("mi") else "loss"
        assert torch.isnan(value) if kind == "estimate" else torch.isfinite(value), key
    weighted = sum(
        cfg.active_targets()[t].weight * monitors[f"loss/{t}"] for t in cfg.active_targets()
    )
    assert torch.allclose(loss.detach(), weighted)
    loss.backward()
    if n == 1 and preset == "clip":  # one candidate in the softmax: nothing to learn
        assert loss.item() == pytest.approx(0.0, abs=1e-6)
        return
    grads = [p.grad for p in model.backbone.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    if model.teacher is not None:
        assert all(p.grad is None for p in model.teacher.parameters())


def test_only_needed_streams_are_encoded(source):
    """MAE encodes only the visible 25% of image A; SiameseIM only image B (its 40%); M3I both
    halves."""
    expected = {
        "mae": {"a": 4},
        "siameseim": {"b": 6},  # image A: round(0.602 x 16) = 10 cells (B's masked ones)
        "m3i": {"a": 8, "b": 8},
        "supervised": {"a": 16},
    }
    for preset, streams in expected.items():
        cfg = load_config(preset, overrides=SMALL)
        model = M3IModel(
            cfg,
            RunContext(
                num_classes=len(source.classes), tokenizer=train_bpe(source.captions(), 200)
            ),
        )
        ctx = model.encode(make_batch(source, cfg, 2))
        assert {k: s.tokens.shape[1] for k, s in ctx.streams.items()} == streams, preset


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize(
    "preset, student, teacher",
    [("m3i", 1, 2), ("supervised", 1, 0), ("moco", 2, 2), ("byol", 2, 2)],
)
def test_student_encodes_view_2_only_for_pooled_view_targets(source, preset, student, teacher):
    """BYOL / MoCo v3 put both views through the student and the EMA teacher (one pass each on
    a CPU); M3I's step keeps its single student pass over the mix."""
    cfg = load_config(preset, overrides=SMALL)
    model = M3IModel(
        cfg,
        RunContext(num_classes=len(source.classes), tokenizer=train_bpe(source.captions(), 200)),
    )
    student_calls = count_calls(model.backbone.vit.blocks[0])
    teacher_calls = count_calls(model.teacher.module.vit.blocks[0]) if model.teacher else [0]
    ctx = model.encode(make_batch(source, cfg, 2))
    assert (student_calls[0], teacher_calls[0]) == (student, teacher)
    pooled = preset in ("moco", "byol")
    assert set(ctx.student_pooled) == ({"view2"} if pooled else set())
    if pooled:
        assert set(ctx.teacher_pooled) == {"view1", "view2"}
        # at initialisation the EMA teacher is the student: the same features of view 2
        torch.testing.assert_close(ctx.student_pooled["view2"], ctx.teacher_pooled["view2"])


def test_image_b_of_mix_k_is_sample_n_minus_1_minus_k(source):
    cfg = load_config("m3i", overrides=SMALL)
    model = M3IModel(
        cfg,
        RunContext(num_classes=len(source.classes), tokenizer=train_bpe(source.captions(), 200)),
    )
    ctx = model.encode(make_batch(source, cfg, 3))
    assert ctx.streams["a"].samples.tolist() == [0, 1, 2]
    assert ctx.streams["b"].samples.tolist() == [2, 1, 0]
    a, b = ctx.streams["a"].positions, ctx.streams["b"].positions
    assert torch.equal(torch.cat([a, b], 1).sort(1).values, torch.arange(16).expand(3, 16))


def test_position_embeddings_tokens_and_temperature_get_no_weight_decay(source):
    from timm.optim import create_optimizer_v2

    cfg = load_config("m3i", overrides=SMALL)
    model = M3IModel(cfg, RunContext(num_classes=10, tokenizer=train_bpe(source.captions(), 200)))
    optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {
        names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]
    }
    expected = {
        "backbone.vit.pos_embed",
        "backbone.vit.cls_token",
        "decoder.mask_token",
        "targets.text.encoder.position_embedding",
        "targets.text.logit_scale",
    }
    assert expected <= no_decay
    assert "backbone.vit.blocks.0.attn.qkv.weight" not in no_decay


@pytest.mark.parametrize("preset", [p for p in preset_names() if "stages" not in preset_values(p)])
def test_every_trainable_parameter_gets_a_gradient(preset):
    """DDP (without find_unused_parameters) needs every trainable parameter in the graph."""
    cfg = load_config(preset, overrides=TINY_M3I + ["model.img_size=16", "model.patch_size=4"])
    captions = ShapesDataset("train", num_samples=40).captions()
    tokenizer = train_bpe(captions, 100) if cfg.targets.text.weight else None
    model = M3IModel(cfg, RunContext(num_classes=10, tokenizer=tokenizer))
    loss, _ = model(synthetic_batch(4, 16, captions, torch.device("cpu")))
    loss.backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []


def test_gaussian_estimates_are_finite_at_a_batch_with_enough_tokens():
    """32 images x 8 masked (or 16 other-view) positions of a 4x4 grid: more tokens than
    D = 192 plus the 16 positions, so every figure is a number."""
    cfg = load_config("m3i", overrides=TINY_M3I + ["model.img_size=16", "model.patch_size=4"])
    captions = ShapesDataset("train", num_samples=40).captions()
    model = M3IModel(cfg, RunContext(num_classes=10, tokenizer=train_bpe(captions, 100)))
    with torch.no_grad():
        _, monitors = model(synthetic_batch(32, 16, captions, torch.device("cpu")))
    assert all(torch.isfinite(monitors[f"mi/{t}"]) for t in ("intra_view", "inter_view"))


class Imbalanced(ImageSource):
    """Labels only (build_model reads no image for a supervised run): 91 of class 0, one of each
    other class, 5 unlabelled."""

    classes = list(CLASSES)
    name = "imbalanced"

    def __init__(self, labelled: bool = True) -> None:
        self._labels = [0] * 91 + list(range(1, 10)) + [-1] * 5 if labelled else [-1] * 4

    def labels(self) -> list[int]:
        return self._labels


def test_build_model_takes_the_category_prior_from_the_training_labels():
    cfg = load_config("supervised", overrides=TINY_M3I)
    model = build_model(cfg, Imbalanced())
    entropy = -(0.91 * math.log(0.91) + 9 * 0.01 * math.log(0.01))  # the 5 unlabelled left out
    assert model.targets["category"].label_entropy == pytest.approx(entropy, rel=1e-6)
    with pytest.raises(TrainingError, match="no sample of data 'shapes' has one"):
        build_model(cfg, Imbalanced(labelled=False))
