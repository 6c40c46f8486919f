"""The class token the backbone gives for pool=cls (MoCo v3 on a ViT), against timm's own
class-token pooling (global_pool="token": the class token after the final norm), for full views
and for each image of an isolated mix; refused where there is none to read."""

import pytest
import timm
import torch
from torch import nn

from m3i.models.backbone import Backbone
from m3i.models.config import ModelConfig

VIT = ModelConfig(img_size=16, patch_size=4, depth=2)
N, P = 3, 16


def perturbed(backbone: Backbone) -> Backbone:
    """Non-trivial class token, positions and norms (timm starts some at 0 or 1)."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in backbone.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=g))
    return backbone.eval()


class KeepPatches(nn.Module):
    """A stand-in for timm's `patch_drop` that keeps the class token and the given patches:
    timm's forward_features then encodes those patches alone (with their positions)."""

    def __init__(self, keep: torch.Tensor) -> None:
        super().__init__()
        self.keep = keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = torch.gather(x[:, 1:], 1, self.keep[..., None].expand(-1, -1, x.shape[-1]))
        return torch.cat([x[:, :1], patches], dim=1)


def timm_token_model(backbone: Backbone) -> nn.Module:
    """timm's ViT of the same weights whose features are its class token (MoCo v3's base
    encoder: timm's VisionTransformer, the class token after the final norm)."""
    model = timm.create_model(
        VIT.name, img_size=16, patch_size=4, depth=2, num_classes=0, global_pool="token"
    )
    model.load_state_dict(backbone.timm_model.state_dict())
    return model.eval()


def timm_class_token(backbone: Backbone, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    model = timm_token_model(backbone)
    model.patch_drop = KeepPatches(keep)
    return model.forward_head(model.forward_features(images), pre_logits=True)


@torch.no_grad()
def test_class_token_of_full_views_is_timms_token_pooling():
    torch.manual_seed(0)
    backbone = perturbed(Backbone(VIT))
    images = torch.randn(N, 3, 16, 16)
    tokens, outputs, class_token = backbone.forward_with_class_token(images)
    torch.testing.assert_close(class_token, timm_token_model(backbone)(images))
    torch.testing.assert_close(tokens, backbone(images))
    assert outputs == []
    tokens, outputs, _ = backbone.forward_with_class_token(images, last=2)
    reference_tokens, reference_outputs = backbone.forward_with_block_outputs(images, 2)
    torch.testing.assert_close(tokens, reference_tokens)
    for mine, theirs in zip(outputs, reference_outputs, strict=True):
        torch.testing.assert_close(mine, theirs)


@pytest.mark.parametrize("attention", ["separate", "packed"])
@pytest.mark.parametrize("la", [8, 5, 16])
@torch.no_grad()
def test_each_isolated_image_has_its_own_class_token(attention, la):
    """Image A's class token is timm's class token of A's patches alone, B's of B's: neither
    sees the other's patches (la 8: one batch of 2N; 5: two sequences; 16: no image B)."""
    torch.manual_seed(1)
    backbone = perturbed(
        Backbone(ModelConfig(img_size=16, patch_size=4, depth=2, attention=attention))
    )
    backbone.attention_kernel = "sdpa"
    images = torch.randn(N, 3, 16, 16)
    order = torch.rand(N, P, generator=torch.Generator().manual_seed(2)).argsort(dim=1)
    pos_a, pos_b = order[:, :la].sort(1).values, order[:, la:].sort(1).values
    partners = torch.arange(N - 1, -1, -1)
    tokens_a, tokens_b, class_a, class_b = backbone.encode_mix(
        images, partners, pos_a, pos_b, isolate=True, class_tokens=True
    )
    torch.testing.assert_close(class_a, timm_class_token(backbone, images, pos_a))
    assert tokens_a.shape == (N, la, backbone.embed_dim)
    if la == P:
        assert class_b is None and tokens_b.shape[1] == 0
    else:
        torch.testing.assert_close(class_b, timm_class_token(backbone, images[partners], pos_b))
    plain = backbone.encode_mix(images, partners, pos_a, pos_b, isolate=True)
    assert len(plain) == 2 and torch.equal(plain[0], tokens_a) and torch.equal(plain[1], tokens_b)


def test_a_shared_class_token_or_none_is_refused():
    backbone = Backbone(VIT)
    images, partners = torch.randn(2, 3, 16, 16), torch.tensor([1, 0])
    pos_a, pos_b = torch.arange(8).expand(2, 8), torch.arange(8, 16).expand(2, 8)
    with pytest.raises(ValueError, match="one class token for both images"):
        backbone.encode_mix(images, partners, pos_a, pos_b, isolate=False, class_tokens=True)
    no_token = Backbone(
        ModelConfig(name="vit_base_patch16_gap_224", img_size=16, patch_size=4, depth=1)
    )
    assert not no_token.has_class_token
    with pytest.raises(ValueError, match="has no class token"):
        no_token.forward_with_class_token(images)
    convnet = Backbone(ModelConfig(name="convnext_atto", img_size=32, patch_size=8, depth=1))
    assert not convnet.has_class_token
    with pytest.raises(ValueError, match="'convnext_atto' has no class token"):
        convnet.forward_with_class_token(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="'convnext_atto' has no class token"):
        convnet.encode_mix(
            torch.randn(2, 3, 32, 32), partners, pos_a[:, :8], pos_b[:, :8], class_tokens=True
        )
