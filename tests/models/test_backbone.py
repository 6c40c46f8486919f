"""The backbone against timm, its export, and the isolation of the two images of a mix."""

import copy
import functools

import pytest
import timm
import torch
from safetensors.torch import load_file

from m3i.config import load_config
from m3i.data.batch import Batch, View
from m3i.data.mixing import gather_tokens, split_positions
from m3i.method import M3IModel
from m3i.mi.targets import RunContext
from m3i.models.backbone import Backbone, load_timm_model, read_backbone_metadata
from m3i.models.config import ModelConfig
from m3i.models.text import train_bpe
from tests.by_hand import vit_blocks_by_hand
from tests.tiny import TINY_M3I

SIZE, PATCH = 16, 4
NAMES = [
    "vit_tiny_patch16_224",  # class token, pos_embed covers it
    "vit_little_patch16_reg4_gap_256",  # register tokens, no class token, no_embed_class
    "vit_small_patch14_reg4_dinov2",  # class + register tokens, no_embed_class
]


@functools.cache
def backbone(name: str = "vit_tiny_patch16_224") -> Backbone:
    """Built once per name; the tests only read it."""
    torch.manual_seed(0)
    model = Backbone(ModelConfig(name=name, img_size=SIZE, patch_size=PATCH, depth=2)).eval()
    with torch.no_grad():  # non-trivial prefix tokens and position embeddings
        for param in model.vit.parameters():
            if param.abs().sum() == 0:
                param.normal_(std=0.02)
    return model


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("name", "n"), [(NAMES[0], 1), (NAMES[0], 2), (NAMES[0], 3), (NAMES[1], 2), (NAMES[2], 3)]
)
def test_backbone_equals_timm_forward_features(name, n):
    model = backbone(name)
    x = images(n)
    tokens = model(x)
    vit = model.vit
    reference = vit.forward_features(x)[:, vit.num_prefix_tokens :]
    assert tokens.shape == (n, (SIZE // PATCH) ** 2, vit.embed_dim)
    torch.testing.assert_close(tokens, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("last", [1, 2, 5])
def test_mlp_outputs_of_the_last_blocks_equal_timm_blocks_run_by_hand(name, last):
    model = backbone(name)
    x = images(2, seed=3)
    with torch.no_grad():
        tokens, outputs = model.forward_with_block_outputs(x, last)
        reference_tokens, reference = vit_blocks_by_hand(model.vit, x)
    torch.testing.assert_close(tokens, reference_tokens, atol=1e-5, rtol=1e-5)
    assert len(outputs) == min(last, 2)  # the model has 2 blocks: all of them when last > 2
    for mine, theirs in zip(outputs, reference[-last:], strict=True):
        assert mine.shape == (2, (SIZE // PATCH) ** 2, model.embed_dim)
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    assert all(not block.mlp._forward_hooks for block in model.vit.blocks)  # hooks removed


def test_mlp_outputs_need_at_least_one_block():
    with pytest.raises(ValueError, match="last must be >= 1"):
        backbone().forward_with_block_outputs(images(1), 0)


def test_export_loads_strictly_into_plain_timm_model(tmp_path):
    """A plain `timm.create_model(..., num_classes=0)` must take the exported weights as is."""
    model = backbone()
    path = tmp_path / "backbone.safetensors"
    model.save(path)
    plain = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=SIZE,
        patch_size=PATCH,
        depth=2,
        num_classes=0,
    ).eval()
    plain.load_state_dict(load_file(str(path)))  # strict
    x = images(2)
    reference = plain.forward_features(x)[:, plain.num_prefix_tokens :]
    torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES[:2])
def test_export_round_trip_with_load_timm_model(tmp_path, name):
    model = backbone(name)
    path = tmp_path / "backbone.safetensors"
    model.save(path)
    stored_name, kwargs = read_backbone_metadata(path)
    assert stored_name == name
    assert (kwargs["img_size"], kwargs["patch_size"], kwargs["depth"]) == (SIZE, PATCH, 2)
    loaded = load_timm_model(path).eval()
    state = loaded.state_dict()
    assert state.keys() == model.vit.state_dict().keys()
    for key, value in model.vit.state_dict().items():
        assert torch.equal(state[key], value), key
    x = images(3)
    reference = loaded.forward_features(x)[:, loaded.num_prefix_tokens :]
    torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- encode_mix


def reference_alone(model: Backbone, tokens: torch.Tensor) -> torch.Tensor:
    """Each row's tokens encoded as a batch of one: nothing else in the sequence."""
    return torch.cat([model.encode(tokens[i : i + 1]) for i in range(tokens.shape[0])])


@pytest.mark.parametrize("ratio", [0.5, 0.25])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_encode_mix_isolated_equals_each_image_alone(ratio, n):
    model = backbone()
    patches_a, patches_b = model.embed_patches(images(n, 1)), model.embed_patches(images(n, 2))
    torch.manual_seed(n)
    pos_a, pos_b = split_positions(n, model.num_patches, ratio)
    tokens_a, tokens_b = gather_tokens(patches_a, pos_a), gather_tokens(patches_b, pos_b)
    out_a, out_b = model.encode_token_mix(tokens_a, tokens_b, isolate=True)
    assert out_a.shape == tokens_a.shape and out_b.shape == tokens_b.shape
    torch.testing.assert_close(out_a, reference_alone(model, tokens_a), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_b, reference_alone(model, tokens_b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_encode_mix_not_isolated_is_one_sequence(ratio):
    model = backbone()
    patches_a, patches_b = model.embed_patches(images(2, 1)), model.embed_patches(images(2, 2))
    torch.manual_seed(0)
    pos_a, pos_b = split_positions(2, model.num_patches, ratio)
    tokens_a, tokens_b = gather_tokens(patches_a, pos_a), gather_tokens(patches_b, pos_b)
    out_a, out_b = model.encode_token_mix(tokens_a, tokens_b, isolate=False)
    joint = reference_alone(model, torch.cat([tokens_a, tokens_b], dim=1))
    torch.testing.assert_close(torch.cat([out_a, out_b], dim=1), joint, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out_a, reference_alone(model, tokens_a), atol=1e-4)


def test_encode_mix_with_empty_stream():
    model = backbone()
    tokens = model.embed_patches(images(2))
    out_a, out_b = model.encode_token_mix(tokens, tokens[:, :0])
    torch.testing.assert_close(out_a, model(images(2)), atol=1e-5, rtol=1e-5)
    assert out_b.shape == (2, 0, model.embed_dim)


# ---------------------------------------------------------------- the mix in M3IModel

CAPTIONS = ["a red circle", "a blue square", "a green triangle", "two yellow circles"]


@functools.cache
def m3i_model(isolate: bool, attention: str = "separate") -> M3IModel:
    """Built once per setting; the tests only run `encode` under no_grad."""
    cfg = load_config(
        "m3i",
        overrides=[
            *TINY_M3I,
            f"model.img_size={SIZE}",
            f"model.patch_size={PATCH}",
            f"mix.isolate={str(isolate).lower()}",
            f"model.attention={attention}",
        ],
    )
    torch.manual_seed(0)
    return M3IModel(
        cfg, RunContext(num_classes=3, tokenizer=train_bpe(CAPTIONS, vocab_size=60))
    ).eval()


def batch(n: int, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    image1 = torch.randn(n, 3, SIZE, SIZE, generator=g)
    image2 = torch.randn(n, 3, SIZE, SIZE, generator=g)
    view1 = View(image1, torch.tensor([[0.1, 0.1, 0.5, 0.5]] * n), torch.zeros(n, dtype=torch.bool))
    view2 = View(image2, torch.tensor([[0.2, 0.0, 0.6, 0.7]] * n), torch.ones(n, dtype=torch.bool))
    return Batch([view1, view2], torch.arange(n) % 3, CAPTIONS[:n])


def encode(model: M3IModel, data: Batch):
    torch.manual_seed(123)  # the same mix positions for every call
    with torch.no_grad():
        return model.encode(data)


@pytest.mark.parametrize("isolate", [True, False])
def test_mix_isolates_images(isolate):
    model = m3i_model(isolate)
    data = batch(2)
    changed = copy.deepcopy(data)
    changed.views[0].image[1] = torch.randn(
        3, SIZE, SIZE, generator=torch.Generator().manual_seed(9)
    )
    ctx, ctx_changed = encode(model, data), encode(model, changed)
    a, a_changed = ctx.streams["a"], ctx_changed.streams["a"]
    assert torch.equal(a.positions, a_changed.positions)
    # stream "a" row 0 is sample 0; its partner B in that mix is sample 1 = N - 1 - 0
    assert ctx.streams["b"].samples.tolist() == [1, 0]
    if isolate:
        torch.testing.assert_close(a.tokens[0], a_changed.tokens[0], atol=1e-5, rtol=1e-5)
    else:
        assert not torch.allclose(a.tokens[0], a_changed.tokens[0], atol=1e-4)
    # sample 1's own row does change (the test sees the edit either way)
    assert not torch.allclose(a.tokens[1], a_changed.tokens[1], atol=1e-4)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_mix_streams_equal_each_image_encoded_alone(n):
    model = m3i_model(isolate=True)
    data = batch(n, seed=n)
    ctx = encode(model, data)
    patches = model.backbone.embed_patches(data.views[0].image)
    for name, stream in ctx.streams.items():
        for row in range(n):
            own = patches[int(stream.samples[row])][stream.positions[row]][None]
            expected = model.backbone.encode(own)[0]
            torch.testing.assert_close(stream.tokens[row], expected, atol=1e-5, rtol=1e-5)
        assert stream.positions.shape == (n, model.backbone.num_patches // 2), name
    # A and B occupy complementary grid positions of the mixed input
    full = torch.cat([ctx.streams["a"].positions, ctx.streams["b"].positions], dim=1)
    assert torch.equal(full.sort(dim=1).values, torch.arange(16).expand(n, -1))
    assert torch.equal(ctx.masked_positions, ctx.streams["b"].positions)


def test_load_takes_a_backbone_file_of_the_same_model_only(tmp_path):
    path = tmp_path / "backbone.safetensors"
    backbone().save(path)
    same = Backbone(ModelConfig(img_size=SIZE, patch_size=PATCH, depth=2))
    same.load(path)
    for key, value in backbone().vit.state_dict().items():
        assert torch.equal(same.vit.state_dict()[key], value), key
    deeper = Backbone(ModelConfig(img_size=SIZE, patch_size=PATCH, depth=3))
    with pytest.raises(ValueError, match=r"holds a backbone with model\.depth=2; set the same"):
        deeper.load(path)
