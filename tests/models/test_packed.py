"""model.attention=packed: the two images of a mix in one sequence per sample with a
block-diagonal mask, against the two-sequence reference (each image's tokens run alone through
timm's blocks), its isolation, its gradients, and a tiny pre-training run."""

import copy
import functools
import json

import pytest
import torch

from m3i.config import ConfigError, load_config
from m3i.data.mixing import gather_tokens
from m3i.models.backbone import Backbone
from m3i.models.config import ModelConfig
from m3i.train.pretrain import pretrain
from tests.models.test_backbone import NAMES, PATCH, SIZE, batch, encode, images, m3i_model
from tests.tiny import TINY_M3I

GRID = (SIZE // PATCH) ** 2
# uncompiled FlexAttention (the tests' CPU reference of the CUDA kernel) warns that it is slow
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@functools.cache
def pair(name: str, drop_path: float = 0.0) -> tuple[Backbone, Backbone]:
    """A separate and a packed backbone with the same weights (non-trivial prefix and
    position embeddings and LayerScale, where the model has them)."""
    torch.manual_seed(0)
    cfg = ModelConfig(name=name, img_size=SIZE, patch_size=PATCH, depth=2, drop_path=drop_path)
    separate = Backbone(cfg)
    with torch.no_grad():
        for param in separate.vit.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    packed = Backbone(ModelConfig(**{**vars(cfg), "attention": "packed"}))
    packed.load_state_dict(separate.state_dict())
    return separate.eval(), packed.eval()


def mix_tokens(model: Backbone, n: int, count_a: int, seed: int = 0):
    """A's tokens at `count_a` random cells of image 1, B's at the others of image 2, and the
    cells (A's first)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(GRID, generator=g) for _ in range(n)])
    patches_a, patches_b = model.embed(images(n, 1)), model.embed(images(n, 2))
    tokens_a = gather_tokens(patches_a, order[:, :count_a])
    return tokens_a, gather_tokens(patches_b, order[:, count_a:]), order


def alone(model: Backbone, tokens: torch.Tensor) -> torch.Tensor:
    """The two-sequence reference: each row's tokens through timm's blocks as a batch of one
    (the model's own prefix tokens and final norm), nothing else in the sequence."""
    vit = model.vit
    rows = []
    for row in tokens:
        x = torch.cat([model._prefix(1), row[None]], dim=1)
        rows.append(vit.norm(vit.blocks(vit.norm_pre(x)))[:, vit.num_prefix_tokens :])
    return torch.cat(rows) if rows else tokens


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("count_a", [GRID, 12, 8, 3])  # 0, 4, 8 and 13 tokens of B
@pytest.mark.parametrize("kernel", ["sdpa", "flex"])
def test_packed_tokens_equal_two_separate_sequences(name, count_a, kernel):
    _, packed = pair(name)
    packed.attention_kernel = kernel
    tokens_a, tokens_b, order = mix_tokens(packed, 3, count_a)
    with torch.no_grad():  # FlexAttention has no backward on the CPU
        out_a, out_b = packed.encode_token_mix(tokens_a, tokens_b, isolate=True)
        ref_a, ref_b = alone(packed, tokens_a), alone(packed, tokens_b)
    assert out_a.shape == tokens_a.shape and out_b.shape == tokens_b.shape
    torch.testing.assert_close(out_a, ref_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_b, ref_b, atol=1e-5, rtol=1e-5)
    if count_a == GRID:  # image A alone: timm's own forward of the whole image
        full = packed.vit.forward_features(images(3, 1))[:, packed.vit.num_prefix_tokens :]
        torch.testing.assert_close(out_a, gather_tokens(full, order), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["sdpa", "flex"])
def test_packed_a_does_not_see_b(kernel):
    _, packed = pair(NAMES[0])
    packed.attention_kernel = kernel
    tokens_a, tokens_b, _ = mix_tokens(packed, 2, 8)
    with torch.no_grad():
        out_a, out_b = packed.encode_token_mix(tokens_a, tokens_b)
        new_a, new_b = packed.encode_token_mix(tokens_a, torch.randn_like(tokens_b))
    assert torch.equal(out_a, new_a)
    assert not torch.allclose(out_b, new_b, atol=1e-3)


@pytest.mark.parametrize("name", [NAMES[0], NAMES[2]])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_gradients_equal_two_separate_sequences(name, checkpointing):
    separate, packed = pair(name)
    packed.attention_kernel = "sdpa"  # the CPU's (FlexAttention has no backward on the CPU)
    packed.grad_checkpointing = checkpointing
    torch.manual_seed(1)
    weight_a, weight_b = torch.randn(2, 6, packed.embed_dim), torch.randn(2, 10, packed.embed_dim)
    grads = []
    for model, encode_mix in ((separate, alone), (packed, None)):
        model.zero_grad()
        tokens_a, tokens_b = (t.detach().requires_grad_() for t in mix_tokens(model, 2, 6)[:2])
        if encode_mix is None:
            out_a, out_b = model.encode_token_mix(tokens_a, tokens_b, isolate=True)
        else:
            out_a, out_b = encode_mix(model, tokens_a), encode_mix(model, tokens_b)
        ((out_a * weight_a).sum() + (out_b * weight_b).sum()).backward()
        grads.append(
            [tokens_a.grad, tokens_b.grad] + [p.grad for p in model.vit.blocks.parameters()]
        )
    assert all(g is not None for g in grads[1])
    for ours, reference in zip(*grads, strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)


@functools.cache
def packed_m3i_model():
    return m3i_model(isolate=True, attention="packed")


def test_packed_mix_isolates_images_and_equals_separate():
    model, reference = packed_m3i_model(), m3i_model(isolate=True)
    reference_state = reference.state_dict()
    model.load_state_dict(reference_state)
    data = batch(2)
    changed = copy.deepcopy(data)  # sample 1 is image B of sample 0's mix
    changed.views[0].image[1] = torch.randn(3, SIZE, SIZE)
    ctx, ctx_changed, ctx_ref = encode(model, data), encode(model, changed), encode(reference, data)
    a, a_changed = ctx.streams["a"], ctx_changed.streams["a"]
    assert torch.equal(a.positions, a_changed.positions)
    torch.testing.assert_close(a.tokens[0], a_changed.tokens[0], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(a.tokens[1], a_changed.tokens[1], atol=1e-4)
    for name in ("a", "b"):
        torch.testing.assert_close(
            ctx.streams[name].tokens, ctx_ref.streams[name].tokens, atol=1e-5, rtol=1e-5
        )


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tiny_pretrain_packed_follows_separate(tmp_path):
    common = [
        *TINY_M3I,
        "monitor.every=0",
        "monitor.final_eval=[]",
        "monitor.tensorboard=false",
        "train.steps=3",
        "train.log_every=1",
        "train.batch_size=8",
        "data.num_train=16",
    ]
    for attention in ("separate", "packed"):
        cfg = load_config("m3i", overrides=[*common, f"model.attention={attention}"])
        pretrain(cfg, tmp_path / attention, progress=False)
    packed, separate = losses(tmp_path / "packed"), losses(tmp_path / "separate")
    assert len(packed) == 3
    assert packed == pytest.approx(separate, rel=1e-4)


def test_attention_must_be_separate_or_packed():
    message = r"model.attention must be separate or packed, got 'flex'"
    with pytest.raises(ConfigError, match=message):
        load_config("m3i", overrides=[*TINY_M3I, "model.attention=flex"])


def test_packed_is_for_vit_backbones():
    cfg = ModelConfig(name="convnext_atto", img_size=64, patch_size=16, depth=1)
    with pytest.raises(ValueError, match="model.attention=packed is for ViT backbones"):
        Backbone(ModelConfig(**{**vars(cfg), "attention": "packed"}))


def test_packed_compiles_as_one_graph_and_matches_eager():
    """The packed mask is built from Python integers: a compiled step sees static shapes (a mask
    built from a tensor of lengths once made Dynamo fail on a data-dependent size). Dynamo and
    AOTAutograd only, no Inductor code generation: seconds."""
    _, packed = pair(NAMES[0])
    packed.attention_kernel = "sdpa"
    tokens_a, tokens_b, _ = mix_tokens(packed, 2, 6)
    torch._dynamo.reset()
    compiled = torch.compile(packed.encode_token_mix, backend="aot_eager", fullgraph=True)
    for got, expected in zip(
        compiled(tokens_a, tokens_b), packed.encode_token_mix(tokens_a, tokens_b), strict=True
    ):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
