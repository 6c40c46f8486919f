"""model.freeze_patch_embed (MoCo v3's --stop-grad-conv1, SiameseIM's default): the patch
projection is drawn as MoCo v3's vits.py draws it and never changes, through training, the EMA
update, a checkpoint and resume, and FSDP, while every other weight trains."""

import math
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from m3i.config import load_config
from m3i.method import M3IModel
from m3i.mi.targets import RunContext
from m3i.models.backbone import Backbone
from m3i.models.config import ModelConfig
from m3i.train.optimizer_step import build_optimizer
from m3i.train.pretrain import pretrain
from tests.tiny import TINY_M3I
from tests.train.test_ddp import free_ports

FROZEN = ("patch_embed.proj.weight", "patch_embed.proj.bias")


def build(cfg: ModelConfig) -> Backbone:
    torch.manual_seed(0)
    return Backbone(cfg)


def test_the_patch_projection_is_moco_v3s_random_draw_and_the_rest_timms():
    """MoCo v3 (vits.py): uniform in +-sqrt(6 / (3 p^2 + D)), bias 0, requires_grad False; the
    other weights are the ones the same seed gives without the freeze."""
    frozen = build(ModelConfig(freeze_patch_embed=True))
    plain = build(ModelConfig())
    p, dim = 4, frozen.embed_dim
    bound = math.sqrt(6.0 / float(3 * p * p + dim))
    weight = frozen.vit.patch_embed.proj.weight
    assert weight.shape == (dim, 3, p, p)
    assert bound * 0.98 < weight.abs().max() <= bound
    assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)
    assert torch.equal(frozen.vit.patch_embed.proj.bias, torch.zeros(dim))
    assert [n for n, q in frozen.vit.named_parameters() if not q.requires_grad] == list(FROZEN)
    assert all(q.requires_grad for q in plain.parameters())
    mine, theirs = frozen.vit.state_dict(), plain.vit.state_dict()
    assert [k for k in mine if not torch.equal(mine[k], theirs[k])] == list(FROZEN)


def test_a_convnext_freezes_its_patchify_stem_at_timms_initialisation():
    cfg = dict(name="convnext_atto", img_size=32, patch_size=8, depth=1)
    frozen, plain = build(ModelConfig(**cfg, freeze_patch_embed=True)), build(ModelConfig(**cfg))
    stem = [n for n, q in frozen.convnet.named_parameters() if not q.requires_grad]
    assert stem == ["stem.0.weight", "stem.0.bias", "stem.1.weight", "stem.1.bias"]
    mine, theirs = frozen.state_dict(), plain.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_the_optimizer_leaves_the_frozen_projection_out():
    """Of the student's parameters (the EMA copies never train), only the patch projection is
    left out of timm's AdamW."""
    cfg = load_config("moco", overrides=[*TINY_M3I, "targets.view_contrast.hidden_dim=16"])
    model = M3IModel(cfg, RunContext())
    optimizer = build_optimizer(model, cfg.train, torch.device("cpu"))
    optimized = {id(q) for group in optimizer.param_groups for q in group["params"]}
    student = [(n, q) for n, q in model.named_parameters() if "teacher" not in n]
    assert [n for n, q in student if id(q) not in optimized] == [
        f"backbone.vit.{name}" for name in FROZEN
    ]


RUN = [
    *TINY_M3I,
    "model.img_size=16",
    "targets.view_contrast.hidden_dim=16",
    "targets.view_contrast.embed_dim=8",
    "train.batch_size=8",
    "data.num_train=32",
    "train.checkpoint_every=2",
    "train.log_every=1",
    "monitor.every=0",
    "monitor.final_eval=[]",
    "monitor.tensorboard=false",
    "train.device=cpu",
]


def assert_frozen_and_trained(run: Path, initial: dict[str, torch.Tensor], teacher: bool) -> None:
    """The exported and checkpointed patch projection (student and EMA teacher) is the
    initial one bit for bit; every other weight of the backbone moved."""
    exported = load_file(run / "backbone.safetensors")
    assert exported.keys() == initial.keys()
    moved = sorted(k for k in initial if not torch.equal(exported[k], initial[k]))
    assert moved == sorted(set(initial) - set(FROZEN)), moved
    state = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    for name in FROZEN:
        assert torch.equal(state[f"backbone.vit.{name}"], initial[name])
        if teacher:
            assert torch.equal(state[f"teacher.module.vit.{name}"], initial[name])


def test_training_and_resume_keep_the_patch_projection(tmp_path):
    """moco: 2 steps, then resumed from the step-2 checkpoint to 4."""
    steps = lambda n: load_config("moco", overrides=[*RUN, f"train.steps={n}"])  # noqa: E731
    pretrain(steps(0), tmp_path / "init", progress=False)
    initial = load_file(tmp_path / "init" / "backbone.safetensors")
    pretrain(steps(2), tmp_path / "run", progress=False)
    assert_frozen_and_trained(tmp_path / "run", initial, teacher=True)
    pretrain(steps(4), tmp_path / "run", progress=False, resume=True)
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 4
    assert_frozen_and_trained(tmp_path / "run", initial, teacher=True)


FSDP = ["model.freeze_patch_embed=true", "train.strategy=fsdp"]


def fsdp_worker(rank: int, ports: list[int], root: Path) -> None:
    torch.set_num_threads(1)
    env = dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    for (steps, resume), port in zip([(2, False), (3, True)], ports, strict=True):
        os.environ.update(env, MASTER_PORT=str(port))
        cfg = load_config("m3i", overrides=[*RUN, *FSDP, f"train.steps={steps}"])
        pretrain(cfg, root / "fsdp", progress=False, resume=resume)


def test_fsdp_keeps_the_patch_projection_through_a_resume(tmp_path):
    """The m3i preset sharded over 2 gloo ranks, 2 steps, resumed to 3 from the gathered
    checkpoint: the frozen projection is still the single-process initial one."""
    cfg = load_config("m3i", overrides=[*RUN, *FSDP[:1], "train.steps=0"])
    pretrain(cfg, tmp_path / "init", progress=False)
    initial = load_file(tmp_path / "init" / "backbone.safetensors")
    mp.spawn(fsdp_worker, args=(free_ports(2), tmp_path), nprocs=2, join=True)
    assert torch.load(tmp_path / "fsdp" / "checkpoint.pt", weights_only=True)["step"] == 3
    assert_frozen_and_trained(tmp_path / "fsdp", initial, teacher=True)
