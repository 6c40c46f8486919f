"""The step with the originals' masks and SiameseIM's projector: SiameseIM's targets (its EMA
projector run by hand on the teacher's tokens), the projector's EMA update, block masks on the
packed-attention and ConvNet paths, and the logged teacher momentum of a short run."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from m3i.bench.measure import synthetic_batch
from m3i.config import ConfigError, load_config
from m3i.data.mixing import count_a, split_positions
from m3i.method import M3IModel
from m3i.mi.targets import RunContext
from m3i.train.pretrain import pretrain
from tests.models.test_decoder import block_by_hand
from tests.tiny import TINY_M3I

SIZE, PATCH = 16, 4
SMALL = [*TINY_M3I, f"model.img_size={SIZE}", f"model.patch_size={PATCH}"]
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def siameseim_model() -> M3IModel:
    """The siameseim preset, tiny, its teacher and EMA projector apart from the student's."""
    torch.manual_seed(0)
    model = M3IModel(load_config("siameseim", overrides=SMALL), RunContext(num_classes=10))
    with torch.no_grad():
        for param in [*model.teacher.parameters(), *model.teacher_projector.parameters()]:
            param.add_(0.05 * torch.randn_like(param))
    return model.train()


def test_siameseim_targets_are_the_ema_projector_of_the_teachers_tokens():
    """forward_sim's target: the momentum encoder's tokens through mm_decoder_embed and
    mm_projector_decoder_blocks (BatchNorm with the batch's statistics: the model trains),
    then teacher_norm (LayerNorm without affine); the prediction is decoder-wide."""
    model = siameseim_model()
    cfg = model.cfg.decoder
    assert (cfg.norm, cfg.projector_depth, cfg.qkv_bias) == ("batch", 1, True)
    batch = synthetic_batch(3, SIZE, ["a caption"], torch.device("cpu"))
    ctx = model.encode(batch)
    vit, projection = model.teacher.module.vit, model.teacher_projector.module
    embed, projector = projection[0], projection[1]
    with torch.no_grad():
        tokens = vit.forward_features(batch.view("view2").image)[:, vit.num_prefix_tokens :]
        x = tokens @ embed.weight.T + embed.bias
        for block in projector:
            x = block_by_hand(x, block, heads=model.cfg.decoder.heads)
        expected = F.layer_norm(x, x.shape[-1:])
    target = model.targets["inter_view"].target_tokens(ctx)
    torch.testing.assert_close(target, expected[ctx.streams["b"].samples], atol=1e-5, rtol=1e-5)
    assert model.targets["inter_view"].head.out_features == cfg.dim  # decoder_pred: dim -> dim


def test_the_ema_projector_follows_the_decoders_embedding_and_projector():
    model = siameseim_model()
    before = [p.clone() for p in model.teacher_projector.parameters()]
    student = [*model.decoder.embed.parameters(), *model.decoder.projector.parameters()]
    model.momentum_update(0.9)
    after = list(model.teacher_projector.parameters())
    assert len(after) == len(student) == len(before)
    for old, new, online in zip(before, after, student, strict=True):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * online, atol=1e-6, rtol=1e-6)


def test_m3i_has_no_projector():
    cfg = load_config("m3i")
    assert (cfg.decoder.norm, cfg.decoder.projector_depth, cfg.decoder.qkv_bias) == (
        "layer",
        0,
        False,
    )
    assert cfg.mix.masking == "random"
    model = M3IModel(
        load_config("m3i", overrides=[*SMALL, "targets.text.weight=0"]), RunContext(num_classes=3)
    )
    assert model.teacher_projector is None and len(model.decoder.projector) == 0


@pytest.mark.parametrize("masking", ["block", "inverse_block"])
def test_block_masks_on_packed_attention_equal_separate(masking):
    overrides = [*SMALL, "targets.text.weight=0", "mix.ratio=0.5", f"mix.masking={masking}"]
    models = []
    for attention in ("separate", "packed"):
        torch.manual_seed(0)
        cfg = load_config("m3i", overrides=[*overrides, f"model.attention={attention}"])
        models.append(M3IModel(cfg, RunContext(num_classes=10)).eval())
    models[1].load_state_dict(models[0].state_dict())
    batch = synthetic_batch(4, SIZE, ["a caption"], torch.device("cpu"))
    contexts = []
    for model in models:
        torch.manual_seed(7)
        with torch.no_grad():
            contexts.append(model.encode(batch))
    torch.manual_seed(7)
    pos_a, pos_b = split_positions(4, 16, 0.5, masking=masking, grid=(4, 4))
    for name, positions in (("a", pos_a), ("b", pos_b)):
        separate, packed = contexts[0].streams[name], contexts[1].streams[name]
        assert torch.equal(separate.positions, positions) and torch.equal(
            packed.positions, positions
        )
        torch.testing.assert_close(packed.tokens, separate.tokens, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("masking", ["block", "inverse_block"])
def test_block_masks_on_a_convnet_keep_the_images_apart(masking):
    """m3i_convnext's 4 x 4 grid: A's cells are the drawn blocks, and A's tokens of sample 0 do
    not change when its partner (sample 1) does."""
    cfg = load_config(
        "m3i_convnext", overrides=[*TINY_M3I, "targets.text.weight=0", f"mix.masking={masking}"]
    )
    torch.manual_seed(0)
    model = M3IModel(cfg, RunContext(num_classes=10)).eval()
    batch = synthetic_batch(2, 64, ["a caption"], torch.device("cpu"))
    changed = copy.deepcopy(batch)
    changed.views[0].image[1] = torch.randn(3, 64, 64)
    contexts = []
    for data in (batch, changed):
        torch.manual_seed(11)
        with torch.no_grad():
            contexts.append(model.encode(data))
    torch.manual_seed(11)
    pos_a, _ = split_positions(2, 16, 0.5, masking=masking, grid=(4, 4))
    a, a_changed = contexts[0].streams["a"], contexts[1].streams["a"]
    assert torch.equal(a.positions, pos_a)
    assert torch.equal(a.tokens[0], a_changed.tokens[0])
    assert not torch.allclose(a.tokens[1], a_changed.tokens[1], atol=1e-4)
    loss, _ = model.train()(batch)
    assert torch.isfinite(loss)


def test_a_run_logs_the_teachers_schedule(tmp_path):
    """A linear schedule 0.9 -> 0.99 until step 2 of 3, by hand: 0.945, 0.99, 0.99."""
    teacher = ["momentum=0.9", "momentum_final=0.99", "schedule=linear", "anneal_steps=2"]
    overrides = [
        *SMALL,
        *(f"teacher.{t}" for t in teacher),
        "teacher.reference_steps=0",
        "monitor.every=0",
        "monitor.final_eval=[]",
        "monitor.tensorboard=false",
        "train.steps=3",
        "train.log_every=1",
        "train.batch_size=4",
        "data.num_train=8",
    ]
    pretrain(load_config("data2vec", overrides=overrides), tmp_path, progress=False)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    logged = [json.loads(line)["momentum"] for line in lines if "momentum" in json.loads(line)]
    assert logged == pytest.approx([0.945, 0.99, 0.99], abs=1e-12)


def test_presets_mask_as_their_originals():
    """SiameseIM: 118 of ViT-B's 196 patches hidden in BEiT blocks (image A's); data2vec 2.0:
    inverse blocks keeping int(196 x (1 - 0.8)) = 39."""
    for preset in ("siameseim", "vit_b16_siameseim"):
        mix = load_config(preset).mix
        assert (mix.masking, count_a(mix.ratio, 196)) == ("block", 118)
    for preset in ("data2vec", "vit_b16_data2vec"):
        mix = load_config(preset).mix
        assert (mix.masking, count_a(mix.ratio, 196)) == ("inverse_block", int(196 * (1 - 0.8)))
    published = load_config("vit_b16_siameseim").decoder
    assert (published.dim, published.heads, published.projector_depth, published.depth) == (
        768,
        16,
        2,
        4,
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("mix.masking=blocks", "mix.masking must be random, block or inverse_block"),
        ("decoder.norm=group", "decoder.norm must be layer or batch"),
        ("decoder.projector_depth=-1", "decoder.projector_depth must be >= 0"),
        ("teacher.anneal_steps=-5", "teacher.anneal_steps must be >= 0"),
    ],
)
def test_bad_masking_decoder_and_schedule_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("siameseim", overrides=[override])
