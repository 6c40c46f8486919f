"""The ConvNeXt backbone against timm: dense features, the exact isolation of the two images of
a mix (against timm run on each image's own half, cropped: a sparse convolution), block
outputs, and its export."""

import copy
import functools

import pytest
import timm
import torch
from safetensors.torch import load_file

from m3i.config import load_config
from m3i.data.batch import Batch, View
from m3i.method import M3IModel
from m3i.mi.targets import RunContext
from m3i.models.backbone import (
    Backbone,
    frozen_features,
    input_size,
    load_timm_model,
    read_backbone_metadata,
)
from m3i.models.config import ModelConfig
from m3i.models.convnet import ConvNetBackbone
from m3i.models.text import train_bpe
from tests.tiny import TINY_M3I

SIZE, STRIDE = 64, 16  # a 4 x 4 mix grid
NAMES = ["convnext_atto", "convnextv2_atto"]  # ConvNeXt (layer scale) and V2 (GRN)


@functools.cache
def backbone(name: str = "convnext_atto", stride: int = STRIDE) -> ConvNetBackbone:
    """Built once; GRN and layer-scale parameters made non-trivial (timm starts them at 0 and
    1e-6, which would hide what they read)."""
    torch.manual_seed(0)
    size = SIZE * stride // STRIDE
    model = Backbone(ModelConfig(name=name, img_size=size, patch_size=stride, depth=2)).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.abs().max() < 1e-3:
                param.normal_(std=0.1)
    return model


def images(n: int, seed: int = 0, size: int = SIZE) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def timm_tokens(convnet: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's features, its head LayerNorm at each position, as (N, P, D)."""
    return convnet.head.norm(convnet.forward_features(x)).flatten(2).transpose(1, 2)


def halves(grid: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cells of the left half (image A) and of the right half (image B), row-major."""
    left = [r * grid + c for r in range(grid) for c in range(grid // 2)]
    right = [r * grid + c for r in range(grid) for c in range(grid // 2, grid)]
    return torch.tensor([left] * n), torch.tensor([right] * n)


@pytest.mark.parametrize("name", NAMES)
def test_dense_tokens_equal_timm_features_with_head_norm(name):
    model = backbone(name)
    x = images(2)
    with torch.no_grad():
        tokens = model(x)
        reference = timm_tokens(model.convnet, x)
    assert model.grid == (4, 4) and tokens.shape == (2, 16, model.convnet.num_features)
    torch.testing.assert_close(tokens, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.pooled(x), reference.mean(dim=1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("name", "stride"),
    [(NAMES[0], 16), (NAMES[1], 16), (NAMES[1], 8), ("convnext_atto_ols", 16)],  # ols: 3x3 stem
)
def test_each_image_is_encoded_as_timm_encodes_its_own_cells_alone(name, stride):
    """A on the left half of the grid, B on the right: the masked pass must equal timm run on
    the cropped half (zero padding where the partner's cells were), which no zeroing skipped
    after a block, a downsampling norm or before a GRN leaves equal."""
    model = backbone(name, stride)
    size, grid = model.img_size, model.grid[0]
    x = images(2, seed=1, size=size)
    partners = torch.tensor([1, 0])
    pos_a, pos_b = halves(grid, 2)
    with torch.no_grad():
        tokens_a, tokens_b = model.encode_mix(x, partners, pos_a, pos_b)
        left = timm_tokens(model.convnet, x[..., : size // 2])
        right = timm_tokens(model.convnet, x[partners][..., size // 2 :])
    torch.testing.assert_close(tokens_a, left, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens_b, right, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("isolate", [True, False])
def test_partner_pixels_do_not_reach_an_image(name, isolate):
    """Isolated, A's tokens are bit-identical when B's pixels change, and when A's own pixels
    in B's cells change (what A must predict); not isolated, they change."""
    model = backbone(name)
    torch.manual_seed(3)
    pos = torch.rand(2, 16).argsort(dim=1)
    pos_a, pos_b = pos[:, :8].sort(dim=1).values, pos[:, 8:].sort(dim=1).values
    partners = torch.tensor([1, 0])
    x = images(2, seed=2)
    changed = x.clone()
    changed[1] = images(1, seed=9)[0]  # image B of mix 0, image A of mix 1
    with torch.no_grad():
        a, b = model.encode_mix(x, partners, pos_a, pos_b, isolate)
        a_changed, b_changed = model.encode_mix(changed, partners, pos_a, pos_b, isolate)
    assert not torch.allclose(a[1], a_changed[1], atol=1e-4)  # the edit is seen where it should
    if isolate:
        assert torch.equal(a[0], a_changed[0]) and torch.equal(b[1], b_changed[1])
        hidden = torch.zeros(16, dtype=torch.bool)
        hidden[pos_b[0]] = True
        pixels = hidden.view(1, 1, 4, 4).repeat_interleave(STRIDE, 2).repeat_interleave(STRIDE, 3)
        own_hidden = torch.where(pixels[0], images(1, seed=5)[0], x[0])
        with torch.no_grad():
            a_own, _ = model.encode_mix(torch.stack([own_hidden, x[1]]), partners, pos_a, pos_b)
        assert torch.equal(a[0], a_own[0])
    else:
        assert not torch.allclose(a[0], a_changed[0], atol=1e-4)


def test_empty_stream_and_full_mix():
    model = backbone()
    x = images(2)
    everything, nothing = torch.arange(16).expand(2, -1), torch.zeros(2, 0, dtype=torch.int64)
    with torch.no_grad():
        tokens_a, tokens_b = model.encode_mix(x, torch.tensor([1, 0]), everything, nothing)
        reference = timm_tokens(model.convnet, x)
    torch.testing.assert_close(tokens_a, reference, atol=1e-5, rtol=1e-5)
    assert tokens_b.shape == (2, 0, model.embed_dim)


@pytest.mark.parametrize("name", NAMES)
def test_block_outputs_are_the_mlp_branches_of_the_last_stage(name):
    """Against the last stage's blocks run by hand from timm's modules."""
    model = Backbone(ModelConfig(name=name, img_size=SIZE, patch_size=STRIDE, depth=2)).eval()
    convnet, x = model.convnet, images(2, seed=4)
    with torch.no_grad():
        tokens, outputs = model.forward_with_block_outputs(x, 5)
        h = convnet.stages[:-1](convnet.stem(x))
        h = convnet.stages[-1].downsample(h)
        reference = []
        for block in convnet.stages[-1].blocks:
            reference.append(block.mlp(block.norm(block.conv_dw(h))).flatten(2).transpose(1, 2))
            h = block(h)
    assert len(outputs) == 2  # the last stage's 2 blocks, though 5 were asked for
    for mine, theirs in zip(outputs, reference, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens, timm_tokens(convnet, x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="last must be >= 1"):
        model.forward_with_block_outputs(x, 0)


@pytest.mark.parametrize("name", NAMES)
def test_export_loads_strictly_into_plain_timm_model(tmp_path, name):
    model = backbone(name)
    path = tmp_path / "backbone.safetensors"
    model.save(path)
    assert read_backbone_metadata(path) == (
        name,
        {"output_stride": STRIDE, "num_classes": 0, "drop_path_rate": 0.0, "depths": [2] * 4},
    )
    plain = timm.create_model(name, output_stride=16, depths=[2] * 4, num_classes=0).eval()
    plain.load_state_dict(load_file(str(path)))  # strict
    loaded = load_timm_model(path).eval()
    x = images(2, seed=6)
    with torch.no_grad():
        pooled, dense = frozen_features(loaded, x)
        torch.testing.assert_close(dense, model(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pooled, model.pooled(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(plain(x), loaded(x), atol=0, rtol=0)
    assert input_size(loaded) == SIZE


def test_load_takes_a_backbone_file_of_the_same_model_only(tmp_path):
    path = tmp_path / "backbone.safetensors"
    backbone().save(path)
    same = Backbone(ModelConfig(name="convnext_atto", img_size=SIZE, patch_size=STRIDE, depth=2))
    same.load(path)
    for key, value in backbone().convnet.state_dict().items():
        assert torch.equal(same.convnet.state_dict()[key], value), key
    deeper = Backbone(ModelConfig(name="convnext_atto", img_size=SIZE, patch_size=STRIDE, depth=3))
    with pytest.raises(ValueError, match=r"holds a backbone with model\.depth=2; set the same"):
        deeper.load(path)


def test_a_stride_timm_cannot_build_is_refused_up_front():
    with pytest.raises(ValueError, match=r"model\.patch_size=4 for convnext_atto: .* 8, 16, 32"):
        Backbone(ModelConfig(name="convnext_atto", img_size=SIZE, patch_size=4))


def test_metadata_with_an_argument_m3i_does_not_write_for_a_convnet_is_refused(tmp_path):
    """The ViT's `patch_size` is not a ConvNeXt argument m3i writes (timm's would resize the
    stem): the file is refused before timm sees it."""
    path = tmp_path / "backbone.safetensors"
    model = backbone()
    model.timm_kwargs = {**model.timm_kwargs, "patch_size": 2}
    try:
        model.save(path)
    finally:
        model.timm_kwargs.pop("patch_size")
    with pytest.raises(ValueError, match="timm_kwargs key 'patch_size' is not one m3i writes"):
        load_timm_model(path)


def test_the_m3i_step_on_a_convnet_isolates_the_two_images():
    """The step's stream `a` row 0 (sample 0) is bit-identical when its partner B (sample 1)
    changes; row 1 (sample 1 itself) is not."""
    captions = ["a red circle", "a blue square"]
    convnet = [f"model.name={NAMES[1]}", f"model.img_size={SIZE}", f"model.patch_size={STRIDE}"]
    cfg = load_config("m3i", overrides=[*TINY_M3I, *convnet, "model.depth=1"])
    torch.manual_seed(0)
    run = RunContext(num_classes=3, tokenizer=train_bpe(captions, vocab_size=60))
    model = M3IModel(cfg, run).eval()
    flags = torch.zeros(2, dtype=torch.bool)
    view2 = View(images(2, seed=8), torch.tensor([[0.2, 0.0, 0.6, 0.7]] * 2), ~flags)
    box1 = torch.tensor([[0.1, 0.1, 0.5, 0.5]] * 2)
    data = Batch([View(images(2, seed=7), box1, flags), view2], torch.tensor([0, 1]), captions)
    changed = copy.deepcopy(data)
    changed.views[0].image[1] = images(1, seed=9)[0]
    contexts = []
    for batch in (data, changed):
        torch.manual_seed(123)  # the same mix positions
        with torch.no_grad():
            contexts.append(model.encode(batch))
    a, a_changed = contexts[0].streams["a"], contexts[1].streams["a"]
    assert a.tokens.shape == (2, 8, model.backbone.embed_dim)
    assert torch.equal(a.tokens[0], a_changed.tokens[0])
    assert not torch.allclose(a.tokens[1], a_changed.tokens[1], atol=1e-4)
    assert contexts[0].decoded["masked"].shape[:2] == (2, 8)


@pytest.mark.parametrize("isolate", [True, False])
def test_grad_checkpointing_gives_the_same_tokens_and_gradients(isolate):
    """Each masked block recomputed in backward (its GRN hooks included) gives what the plain
    pass gives."""
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = Backbone(ModelConfig(name=NAMES[1], img_size=SIZE, patch_size=STRIDE, depth=1))
        with torch.no_grad():  # GRN and layer scale away from their identity-like init
            for param in model.parameters():
                if param.abs().max() < 1e-3:
                    param.normal_(std=0.1)
        model.grad_checkpointing = checkpointing
        pos_a, pos_b = halves(4, 2)
        tokens_a, tokens_b = model.encode_mix(
            images(2), torch.tensor([1, 0]), pos_a, pos_b, isolate
        )
        (tokens_a.square().sum() + tokens_b.sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((tokens_a.detach(), grads))
    (plain, plain_grads), (recomputed, recomputed_grads) = results
    torch.testing.assert_close(recomputed, plain, atol=1e-5, rtol=1e-5)
    assert recomputed_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(recomputed_grads[name], grad, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize(
    ("model", "warned"),
    [
        (
            [
                "model.name=convnext_atto",
                "model.img_size=64",
                "model.patch_size=16",
                "model.depth=1",
            ],
            True,
        ),
        (["model.depth=5"], False),  # the ViT's 5 blocks give data2vec's 5 block outputs
    ],
)
def test_data2vec_on_a_backbone_with_fewer_block_outputs_warns(model, warned, caplog):
    cfg = load_config("data2vec", overrides=[*TINY_M3I, *model])
    assert cfg.targets.intra_view.layers == 5  # data2vec 2.0's top 5 blocks
    with caplog.at_level("WARNING", logger="m3i.train"):
        M3IModel(cfg, RunContext(num_classes=10))
    messages = [r.getMessage() for r in caplog.records if "block outputs" in r.getMessage()]
    # convnext_atto at depth 1 has one block in its last stage (earlier stages have other widths)
    expected = ["a target averages the teacher's last 5 block outputs (its layers), but "
                "convnext_atto gives 1: it averages those"]  # fmt: skip
    assert messages == (expected if warned else [])
