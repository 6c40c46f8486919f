"""`init` from what users have: timm checkpoint files (timm's reader and filter, resampled
position embeddings), timm pretrained names and local-dir folders; each refusal one line."""

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed

from m3i.cli import main
from m3i.config import ConfigError, load_config
from m3i.models import pretrained
from m3i.models.config import ModelConfig
from m3i.models.pretrained import init_state
from m3i.train.pretrain import pretrain
from tests.test_bad_input import TINY_RUN, pretrain_argv, refused

VIT = {"img_size": 32, "patch_size": 4, "depth": 2}
TINY = ModelConfig(name="vit_tiny_patch16_224", depth=2)


def timm_checkpoint(path: Path, name: str = "vit_tiny_patch16_224", **kwargs) -> dict:
    """A timm model's own state dict (with its 10-class head) saved as timm users save it."""
    torch.manual_seed(1)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    state = model.state_dict()
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save({"state_dict": state, "epoch": 3}, path)  # timm's train.py layout
    return state


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_zero_step_run_from_a_timm_checkpoint_writes_back_its_weights(tmp_path, suffix):
    state = timm_checkpoint(tmp_path / f"vit{suffix}", **VIT)
    cfg = load_config("supervised", overrides=[*TINY_RUN, "train.steps=0"])
    cfg.init = str(tmp_path / f"vit{suffix}")
    run = pretrain(cfg, tmp_path / "run", progress=False)
    written = load_file(run / "backbone.safetensors")
    backbone = {k: v for k, v in state.items() if not k.startswith("head.")}
    assert written.keys() == backbone.keys()
    assert all(torch.equal(written[k], backbone[k]) for k in backbone)


def test_a_changed_grid_resamples_the_position_embeddings_as_timm_does(tmp_path):
    state = timm_checkpoint(tmp_path / "vit64.pth", img_size=64, patch_size=4, depth=2)
    start = init_state(str(tmp_path / "vit64.pth"), TINY)  # 32 px: grid 16 -> 8
    expected = resample_abs_pos_embed(state["pos_embed"], new_size=(8, 8), num_prefix_tokens=1)
    assert start["pos_embed"].shape == (1, 65, 192)
    torch.testing.assert_close(start["pos_embed"], expected, rtol=0, atol=1e-6)
    assert torch.equal(start["blocks.1.mlp.fc2.weight"], state["blocks.1.mlp.fc2.weight"])


def test_a_convnext_starts_from_its_timm_checkpoint(tmp_path):
    state = timm_checkpoint(tmp_path / "convnext.pth", "convnext_atto", output_stride=16)
    cfg = ModelConfig(name="convnext_atto", patch_size=16, depth=None, img_size=64)
    start = init_state(str(tmp_path / "convnext.pth"), cfg)
    assert "head.fc.weight" not in start and torch.equal(start["head.norm.weight"],
                                                         state["head.norm.weight"])  # fmt: skip
    assert start.keys() == {k for k in state if not k.startswith("head.fc.")}


def test_a_timm_local_dir_and_an_m3i_run_folder_are_starts_too(tmp_path):
    cfg = load_config("supervised", overrides=TINY_RUN)
    first = pretrain(cfg, tmp_path / "first", progress=False)
    weights = load_file(first / "backbone.safetensors")
    for init in (f"local-dir:{first}", str(first)):
        start = init_state(init, TINY)
        assert start.keys() == weights.keys()
        assert all(torch.equal(start[k], weights[k]) for k in weights), init


def test_checkpoint_of_another_architecture_is_refused_in_one_line(tmp_path, capsys):
    timm_checkpoint(tmp_path / "small.pth", "vit_small_patch16_224", **VIT)
    refused(
        capsys,
        pretrain_argv(tmp_path / "run", f"init={tmp_path / 'small.pth'}"),
        "does not fit model.name=vit_tiny_patch16_224",
        "tensors differ, e.g. blocks.0.attn.proj.bias: (384,) in init, (192,) in the model",
    )
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    refused(
        capsys,
        pretrain_argv(tmp_path / "run", f"init={tmp_path / 'junk.pth'}"),
        "is not a checkpoint timm can read",
    )
    assert not (tmp_path / "run").exists()


def test_an_unreachable_hub_fails_at_once_in_one_line(tmp_path, capsys, monkeypatch):
    def unreachable(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(pretrained.socket, "create_connection", unreachable)
    create = timm.create_model

    def no_fetch(*args, pretrained=False, **kwargs):
        assert not pretrained, "timm was asked for the weights"
        return create(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", no_fetch)
    for init in ("vit_tiny_patch16_224.augreg_in21k", "hf-hub:timm/vit_tiny_patch16_224"):
        refused(
            capsys,
            pretrain_argv(tmp_path / "run", f"init={init}"),
            "cannot be reached ([Errno -2] Name or service not known)",
            "HF_HUB_OFFLINE=1",
        )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("init", "message"),
    [
        ("vit_small_patch16_224.augreg_in21k", "holds vit_small_patch16_224 weights"),
        ("vit_tiny_patch16_224.no_such_tag", "timm has no such pretrained tag"),
        ("no_such_model", "init 'no_such_model' does not exist"),
        ("local-dir:/no/such/folder", "no such folder"),
    ],
)
def test_bad_pretrained_names_are_refused_with_the_config(init, message):
    with pytest.raises(ConfigError, match=message):
        load_config("supervised", overrides=[*TINY_RUN, f"init={init}"])


def test_a_checkpoint_start_is_refused_before_the_data_is_read(tmp_path, capsys, monkeypatch):
    timm_checkpoint(tmp_path / "small.pth", "vit_small_patch16_224", **VIT)
    from m3i.train import trainer

    monkeypatch.setattr(trainer, "training_source", lambda *a: pytest.fail("data was read"))
    assert main(pretrain_argv(tmp_path / "run", f"init={tmp_path / 'small.pth'}")) == 2
