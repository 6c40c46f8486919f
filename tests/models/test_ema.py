"""The momentum teacher: no gradient, eval mode, the EMA formula, the cosine schedule and
data2vec 2.0's linear one, and the scaling of a published schedule to a run's length."""

import math

import pytest
import timm
import torch
from torch import nn

from m3i.config import ConfigError, load_config
from m3i.data.batch import Batch, View
from m3i.method import M3IModel
from m3i.mi.targets import RunContext
from m3i.models.ema import MomentumTeacher, TeacherConfig, momentum_at
from m3i.models.text import train_bpe
from tests.tiny import TINY_M3I


def student() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))


def perturb(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=g))


@pytest.mark.parametrize("n", [2, 3])
def test_teacher_receives_no_gradient(n):
    online = student().train()
    teacher = MomentumTeacher(online)
    teacher.train()
    x = torch.randn(n, 4)
    loss = online(x).pow(2).sum() + teacher(x).pow(2).sum()
    loss.backward()
    assert all(p.grad is not None for p in online.parameters())
    for param in teacher.parameters():
        assert param.requires_grad is False
        assert param.grad is None
    assert teacher(x).requires_grad is False


def by_hand(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The student's function in eval mode, written out: linear, BatchNorm with the running
    statistics, no dropout, linear."""
    first, norm, _, last = module
    h = x @ first.weight.T + first.bias
    h = (h - norm.running_mean) / (norm.running_var + norm.eps).sqrt() * norm.weight + norm.bias
    return h @ last.weight.T + last.bias


def test_teacher_stays_in_eval_mode():
    online = student()
    perturb(online, seed=3)
    with torch.no_grad():
        online(torch.randn(6, 4))  # train mode: running statistics away from 0 and 1
    teacher = MomentumTeacher(online)
    container = nn.ModuleDict({"online": online, "teacher": teacher})
    container.train()
    assert online.training
    assert not teacher.training
    assert not any(m.training for m in teacher.modules())
    teacher.train(True)
    assert not any(m.training for m in teacher.modules())
    # eval mode: no dropout, and BatchNorm uses the running statistics copied from the student
    x = torch.randn(5, 4)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), by_hand(online, x))
        torch.testing.assert_close(teacher(x), online.eval()(x))


def test_batch_statistics_teacher_runs_only_its_batchnorm_in_training_mode():
    """BYOL's and MoCo v3's target networks: BatchNorm on the batch's statistics, no dropout."""
    online = student()
    teacher = MomentumTeacher(online, batch_statistics=True)
    with torch.no_grad():  # running statistics that batch statistics cannot be mistaken for
        teacher.module[1].running_mean.fill_(3.0)
        teacher.module[1].running_var.fill_(9.0)
    x = torch.randn(5, 4)
    for mode in (True, False):
        teacher.train(mode)
        modes = {type(m).__name__: m.training for m in teacher.module}
        assert modes == {"Linear": False, "BatchNorm1d": True, "Dropout": False}
        # the batch's own statistics, by hand: (h - mean) / sqrt(biased var + eps) * w + b
        linear, norm, _, last = teacher.module
        h = linear(x)
        normalised = (h - h.mean(0)) / (h.var(0, unbiased=False) + norm.eps).sqrt()
        expected = last(normalised * norm.weight + norm.bias)
        torch.testing.assert_close(teacher(x), expected)  # no dropout either: deterministic
        assert teacher(x).requires_grad is False


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.99, 1.0])
def test_update_follows_ema_formula(momentum):
    online = student()
    teacher = MomentumTeacher(online)
    perturb(teacher.module, seed=1)  # teacher and student differ before the update
    perturb(online, seed=2)
    with torch.no_grad():
        online(torch.randn(6, 4))  # in train mode: changes BatchNorm's running statistics
    before = {k: v.clone() for k, v in teacher.module.named_parameters()}
    teacher.update(online, momentum)
    student_params = dict(online.named_parameters())
    for name, value in teacher.module.named_parameters():
        old, new = before[name].flatten().tolist(), student_params[name].flatten().tolist()
        expected = [momentum * o + (1 - momentum) * s for o, s in zip(old, new, strict=True)]
        torch.testing.assert_close(value.flatten(), torch.tensor(expected), atol=1e-6, rtol=1e-6)
        if momentum == 1.0:
            assert torch.equal(value, before[name])
    for (name, ema_buf), buf in zip(teacher.module.named_buffers(), online.buffers(), strict=True):
        assert torch.equal(ema_buf, buf), name


def test_momentum_schedule_is_cosine():
    base, final, total = 0.995, 1.0, 100
    for step in (0, total // 2, total):
        expected = final - (final - base) * (math.cos(math.pi * step / total) + 1) / 2
        assert momentum_at(step, total, base, final) == pytest.approx(expected, abs=1e-12)
    assert momentum_at(0, total, base, final) == pytest.approx(base)
    assert momentum_at(total // 2, total, base, final) == pytest.approx((base + final) / 2)
    assert momentum_at(total, total, base, final) == pytest.approx(final)
    assert momentum_at(2 * total, total, base, final) == pytest.approx(final)
    values = [momentum_at(step, total, base, final) for step in range(total + 1)]
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    assert values[0] < values[-1]
    assert momentum_at(5, 0, base, final) == final


def fairseq_annealed_rate(start: float, end: float, step: int, total: int) -> float:
    """data2vec 2.0's EMA decay (fairseq examples/data2vec get_annealed_rate, applied until
    ema_anneal_end_step, then ema_end_decay)."""
    if step >= total:
        return end
    return end - (end - start) * (1 - step / total)


def test_linear_schedule_is_data2vec2s_annealed_rate():
    cfg = TeacherConfig(0.9998, 0.99999, schedule="linear", anneal_steps=100000)
    for step in (0, 1, 2500, 50000, 99999, 100000, 100001, 375300):
        expected = fairseq_annealed_rate(0.9998, 0.99999, step, 100000)
        assert cfg.momentum_at(step, 375300) == pytest.approx(expected, abs=1e-12), step
    assert cfg.momentum_at(50000, 375300) == pytest.approx((0.9998 + 0.99999) / 2, abs=1e-12)
    whole_run = TeacherConfig(0.99, 1.0, schedule="linear")  # anneal_steps 0: the whole run
    assert whole_run.momentum_at(25, 100) == pytest.approx(0.9925, abs=1e-12)


def test_cosine_is_the_default_and_stops_at_anneal_steps():
    assert TeacherConfig().momentum_at(30, 100) == momentum_at(30, 100, 0.995, 1.0)
    capped = TeacherConfig(0.99, 1.0, anneal_steps=40)
    assert capped.momentum_at(20, 100) == pytest.approx(0.995, abs=1e-12)  # half way: the mean
    assert capped.momentum_at(40, 100) == capped.momentum_at(90, 100) == 1.0


def test_reference_steps_keep_the_averaging_horizon_a_share_of_the_run():
    """1 - m' = (1 - m) x reference / steps, by hand: data2vec 2.0's 375,300-step schedule on
    a 200-step run; anneal_steps 100,000 -> round(53.29) = 53."""
    cfg = TeacherConfig(0.9998, 0.99999, "linear", anneal_steps=100000, reference_steps=375300)
    start, end = 1 - 0.0002 * 1876.5, 1 - 0.00001 * 1876.5  # 0.6247, 0.981235
    assert cfg.momentum_at(0, 200) == pytest.approx(start, abs=1e-12)
    assert cfg.momentum_at(53, 200) == cfg.momentum_at(200, 200) == pytest.approx(end, abs=1e-12)
    assert cfg.momentum_at(20, 200) == pytest.approx(end - (end - start) * 33 / 53, abs=1e-12)
    assert cfg.momentum_at(20, 375300) == TeacherConfig(
        0.9998, 0.99999, "linear", anneal_steps=100000
    ).momentum_at(20, 375300)  # at the reference length: the published values
    assert TeacherConfig(0.9, reference_steps=1000).momentum_at(0, 10) == 0.0  # 1 - m' <= 1


def test_presets_schedules():
    """data2vec: data2vec 2.0's published values (scaled to the tiny run); SiameseIM: --mm
    0.995 on its cosine schedule."""
    data2vec, siameseim = load_config("data2vec").teacher, load_config("siameseim").teacher
    assert data2vec == TeacherConfig(0.9998, 0.99999, "linear", 100000, 375300)
    assert load_config("vit_b16_data2vec").teacher == TeacherConfig(
        0.9998, 0.99999, "linear", 100000
    )
    assert siameseim == load_config("vit_b16_siameseim").teacher == TeacherConfig(0.995, 1.0)
    with pytest.raises(ConfigError, match="teacher.schedule must be cosine or linear"):
        load_config("data2vec", overrides=["teacher.schedule=step"])


# ---------------------------------------------------------------- inside M3IModel

CAPTIONS = ["a red circle", "a blue square", "a green triangle"]


def m3i_model() -> M3IModel:
    cfg = load_config(
        "m3i",
        overrides=[
            *TINY_M3I,
            "model.img_size=16",
            "model.patch_size=4",
        ],
    )
    torch.manual_seed(0)
    return M3IModel(cfg, RunContext(num_classes=3, tokenizer=train_bpe(CAPTIONS, vocab_size=60)))


def batch(n: int) -> Batch:
    g = torch.Generator().manual_seed(n)
    image1 = torch.randn(n, 3, 16, 16, generator=g)
    image2 = torch.randn(n, 3, 16, 16, generator=g)
    view1 = View(image1, torch.tensor([[0.0, 0.1, 0.8, 0.8]] * n), torch.zeros(n, dtype=torch.bool))
    view2 = View(
        image2, torch.tensor([[0.2, 0.0, 0.6, 0.7]] * n), torch.tensor([True, False, True][:n])
    )
    return Batch([view1, view2], torch.arange(n) % 3, CAPTIONS[:n])


@pytest.mark.parametrize("n", [2])
def test_m3i_teacher_no_grad_and_momentum_update(n):
    model = m3i_model().train()
    assert model.teacher is not None and not model.teacher.training
    loss, monitors = model(batch(n))
    assert torch.isfinite(loss)
    loss.backward()
    for name, param in model.teacher.named_parameters():
        assert not param.requires_grad and param.grad is None, name
    assert any(p.grad is not None for p in model.backbone.parameters())
    # a plain SGD step on everything trainable, then the EMA update
    trainable = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    teacher_before = {k: v.clone() for k, v in model.teacher.module.named_parameters()}
    torch.optim.SGD(trainable, lr=0.5).step()
    for name, param in model.teacher.module.named_parameters():
        assert torch.equal(param, teacher_before[name]), f"optimizer moved teacher {name}"
    momentum = 0.9
    model.momentum_update(momentum)
    backbone = dict(model.backbone.vit.named_parameters())
    moved = False
    for name, param in model.teacher.module.vit.named_parameters():
        expected = momentum * teacher_before[f"vit.{name}"] + (1 - momentum) * backbone[name]
        torch.testing.assert_close(param, expected, atol=1e-6, rtol=1e-5)
        moved |= not torch.equal(param, teacher_before[f"vit.{name}"])
    assert moved


def test_m3i_teacher_is_the_students_timm_model_in_eval_mode():
    """With drop path on and the model in train mode, the teacher (a copy of the student at the
    start) gives the patch tokens of a plain timm ViT with the student's weights in eval mode."""
    overrides = [*TINY_M3I, "model.img_size=16", "model.patch_size=4", "model.drop_path=0.5"]
    cfg = load_config("m3i", overrides=overrides)
    torch.manual_seed(0)
    model = M3IModel(
        cfg, RunContext(num_classes=3, tokenizer=train_bpe(CAPTIONS, vocab_size=60))
    ).train()
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=16,
        patch_size=4,
        depth=2,
        num_classes=0,
        global_pool="avg",
        fc_norm=False,
    ).eval()
    prefix = "backbone.vit."
    state = model.state_dict()
    vit.load_state_dict(
        {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    )
    x = batch(2).views[0].image
    with torch.no_grad():
        reference = vit.forward_features(x)[:, vit.num_prefix_tokens :]
        torch.testing.assert_close(model.teacher(x), reference, atol=1e-5, rtol=1e-5)


def test_update_is_one_multi_tensor_op_for_parameters_and_one_for_buffers(monkeypatch):
    online = student()
    teacher = MomentumTeacher(online)
    calls = []
    for name in ("_foreach_lerp_", "_foreach_copy_"):
        op = getattr(torch, name)
        monkeypatch.setattr(
            torch, name, lambda *a, op=op, name=name, **k: (calls.append(name), op(*a, **k))
        )
    teacher.update(online, 0.9)
    assert calls == ["_foreach_lerp_", "_foreach_copy_"]  # no per-tensor Python loop


def test_update_from_a_different_student_is_a_clear_error():
    teacher = MomentumTeacher(student())
    other = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))  # the student without BatchNorm
    message = "the teacher holds 6 parameters and 3 buffers, the student 4 and 0"
    with pytest.raises(ValueError, match=message):
        teacher.update(other, 0.9)
