"""A run folder is a timm `local-dir`: timm's own create_model builds the backbone with m3i's
pooling and its weights, and timm's resolve_data_config gives m3i's eval transform."""

import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from m3i.data.views import eval_data_config, eval_transform
from m3i.models.backbone import Backbone
from m3i.models.config import ModelConfig
from m3i.models.pretrained import init_state
from m3i.models.timm_dir import save_backbone_files

MODELS = {
    "vit": ModelConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2),
    "convnext": ModelConfig(name="convnext_atto", img_size=64, patch_size=16, depth=1),
}


def exported(tmp_path, family: str) -> tuple[Backbone, torch.nn.Module]:
    torch.manual_seed(0)
    backbone = Backbone(MODELS[family]).eval()
    with torch.no_grad():  # LayerNorm weights away from 1 and 0: a misplaced norm shows
        for name, param in backbone.timm_model.named_parameters():
            if "norm" in name:
                param.normal_()
    save_backbone_files(backbone, tmp_path)
    return backbone, timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()


@pytest.mark.parametrize("family", MODELS)
def test_timm_builds_the_export_with_m3i_pooling_and_weights(tmp_path, family):
    backbone, model = exported(tmp_path, family)
    assert model.num_classes == 0 and type(model) is backbone.timm_class
    images = torch.randn(3, 3, MODELS[family].img_size, MODELS[family].img_size)
    with torch.no_grad():
        timm_pooled = model.forward_head(model.forward_features(images), pre_logits=True)
        torch.testing.assert_close(timm_pooled, backbone.pooled(images), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(images), backbone.pooled(images), rtol=1e-5, atol=1e-5)
    mine = load_file(tmp_path / "backbone.safetensors")
    assert len(model.state_dict()) == len(mine)


def test_a_vit_export_links_the_weights_m3i_reads(tmp_path):
    exported(tmp_path, "vit")
    weights, backbone = tmp_path / "model.safetensors", tmp_path / "backbone.safetensors"
    assert weights.read_bytes() == backbone.read_bytes()
    assert weights.stat().st_ino == backbone.stat().st_ino  # one copy on disk


@pytest.mark.parametrize("family", MODELS)
def test_timm_resolves_m3i_eval_transform_from_the_export(tmp_path, family):
    _, model = exported(tmp_path, family)
    size = MODELS[family].img_size
    data_config = timm.data.resolve_data_config(model=model)
    ours = eval_data_config(size)
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items()} == {
        k: tuple(v) if isinstance(v, list) else v for k, v in ours.items()
    }
    transform = timm.data.create_transform(**data_config)
    image = torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8)
    from torchvision.transforms.v2.functional import to_pil_image

    assert torch.equal(transform(to_pil_image(image)), eval_transform(image, ours))


def test_the_export_config_names_m3i_not_the_default_weights(tmp_path):
    exported(tmp_path, "vit")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224"
    assert config["model_args"] == {
        "img_size": [32, 32], "patch_size": 4, "depth": 2, "num_classes": 0,
        "global_pool": "avg", "fc_norm": False, "in_chans": 3,
    }  # fmt: skip
    assert config["pretrained_cfg"]["tag"] == "m3i"
    assert "hf_hub_id" not in config["pretrained_cfg"] and "license" not in config["pretrained_cfg"]


@pytest.mark.parametrize("family", MODELS)
def test_an_export_is_a_start_for_a_new_run(tmp_path, family):
    backbone, _ = exported(tmp_path, family)
    start = init_state(f"local-dir:{tmp_path}", MODELS[family])
    mine = backbone.timm_model.state_dict()
    assert start.keys() == mine.keys()
    assert all(torch.equal(start[k], mine[k]) for k in mine)
