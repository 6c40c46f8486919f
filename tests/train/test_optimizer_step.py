"""One optimizer step (`OptimizerStep`): accumulation, autocast, gradient scaling, skips."""

import copy

import pytest
import timm.optim
import torch

from m3i.config import load_config
from m3i.data.batch import collate
from m3i.data.specs import open_source
from m3i.data.views import ViewDataset
from m3i.method import M3IModel
from m3i.mi.targets import RunContext
from m3i.models import vit as backbone_module
from m3i.models.text import train_bpe
from m3i.train.optimizer_step import OptimizerStep, build_optimizer
from tests.tiny import TINY_M3I

SMALL = ["model.img_size=16", "model.patch_size=4", "train.batch_size=4", "train.grad_clip=0"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def source():
    return open_source("shapes", "train", num_samples=8, image_size=16)


@pytest.fixture(scope="module")
def tokenizer(source):
    return train_bpe(source.captions(), 200)


def config(preset: str, *overrides: str):
    return load_config(preset, overrides=[*TINY_M3I, *SMALL, *overrides])


def make_model(cfg, source, tokenizer) -> M3IModel:
    torch.manual_seed(0)
    return M3IModel(cfg, RunContext(num_classes=len(source.classes), tokenizer=tokenizer))


def make_batch(source, cfg, n: int = 4, start: int = 0):
    views = ViewDataset(source, cfg.views, cfg.model.img_size, seed=0)
    return collate([views[i] for i in range(start, start + n)])


def parameters(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def gradients(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def sgd(model, lr: float = 1.0):
    return torch.optim.SGD(model.parameters(), lr=lr)


def assert_unchanged(model, before: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_accumulation_steps_on_the_mean_of_the_micro_batch_gradients(source, tokenizer):
    """Each half of the batch is a step of its own: CLIP's negatives come from the micro-batch."""
    cfg = config("clip", "train.accum_steps=2")
    model = make_model(cfg, source, tokenizer)
    reference = copy.deepcopy(model)
    batch = make_batch(source, cfg)
    halves = [make_batch(source, cfg, 2), make_batch(source, cfg, 2, start=2)]
    losses, monitors, grads = [], [], []
    for half in halves:
        reference.zero_grad(set_to_none=True)
        loss, half_monitors = reference(half)
        loss.backward()
        losses.append(loss.detach())
        monitors.append(half_monitors)
        grads.append(gradients(reference))
    assert grads[0].keys() == grads[1].keys() == dict(model.named_parameters()).keys()
    mean = {name: (grads[0][name] + grads[1][name]) / 2 for name in grads[0]}
    before = parameters(model)

    result = OptimizerStep(model, model, sgd(model), cfg.train, CPU)(batch)

    assert result.skipped is None
    torch.testing.assert_close(result.loss, (losses[0] + losses[1]) / 2)
    assert result.monitors.keys() == monitors[0].keys()
    for key, value in result.monitors.items():
        torch.testing.assert_close(value, (monitors[0][key] + monitors[1][key]) / 2)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, mean[name], rtol=1e-5, atol=1e-8, msg=name)
        torch.testing.assert_close(p.detach(), before[name] - mean[name], rtol=1e-5, atol=1e-7)
    # the whole batch at once has twice the candidates: another loss and other gradients
    reference.zero_grad(set_to_none=True)
    full_loss, _ = reference(batch)
    full_loss.backward()
    assert abs(full_loss.item() - result.loss.item()) > 0.1
    head = "targets.text.head.weight"
    assert not torch.allclose(reference.get_parameter(head).grad, mean[head], rtol=1e-2)


def test_one_micro_batch_is_a_plain_backward_and_step(source, tokenizer):
    cfg = config("supervised")
    model = make_model(cfg, source, tokenizer)
    plain = copy.deepcopy(model)
    batch = make_batch(source, cfg)
    optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-3)
    loss, _ = plain(batch)
    loss.backward()
    optimizer.step()

    result = OptimizerStep(
        model, model, torch.optim.AdamW(model.parameters(), lr=1e-3), cfg.train, CPU
    )(batch)

    assert result.skipped is None
    torch.testing.assert_close(result.loss, loss.detach())
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)


def test_the_stepped_gradient_is_clipped_to_grad_clip(source, tokenizer):
    cfg = config("supervised", "train.grad_clip=0.01")
    model = make_model(cfg, source, tokenizer)
    result = OptimizerStep(model, model, sgd(model), cfg.train, CPU)(make_batch(source, cfg))
    assert result.skipped is None
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    assert norm.item() == pytest.approx(0.01, rel=1e-4)


def autocast_dtype(model) -> list[torch.dtype]:
    """Records the dtype of the first block's qkv projection output (what autocast ran it in)."""
    seen: list[torch.dtype] = []
    qkv = model.backbone.vit.blocks[0].attn.qkv
    qkv.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    return seen


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_steps_with_a_loss_close_to_fp32(source, tokenizer, precision):
    """fp16's scaler starts at 2**16, which overflows CLIP's first gradients here: it halves the
    scale and skips (not fatal) until a step fits, from unchanged weights."""
    cfg = config("clip")
    model = make_model(cfg, source, tokenizer)
    low = copy.deepcopy(model)
    batch = make_batch(source, cfg)
    full = OptimizerStep(model, model, sgd(model, 0.1), cfg.train, CPU)(batch)
    seen = autocast_dtype(low)
    before = parameters(low)
    cfg_low = config("clip", f"train.precision={precision}")

    optimizer_step = OptimizerStep(low, low, sgd(low, 0.1), cfg_low.train, CPU)
    skips = []
    while (result := optimizer_step(batch)).skipped:
        assert result.skipped.startswith("fp16 gradient overflow") and not result.fatal
        assert_unchanged(low, before)
        skips.append(result)
        assert len(skips) < 5

    assert set(seen) == {{"bf16": torch.bfloat16, "fp16": torch.float16}[precision]}
    assert torch.isfinite(result.loss)
    assert result.loss.item() == pytest.approx(full.loss.item(), rel=0.05)
    assert optimizer_step.scaler.is_enabled() == (precision == "fp16")
    if precision == "fp16":
        assert optimizer_step.scaler.get_scale() == 2.0 ** (16 - len(skips))
    else:
        assert not skips
    changed = [not torch.equal(p, before[n]) for n, p in low.named_parameters()]
    assert all(torch.isfinite(p).all() for p in low.parameters()) and any(changed)


def test_an_fp16_overflow_is_skipped_without_counting_and_lowers_the_scale(source, tokenizer):
    cfg = config("clip", "train.precision=fp16")
    model = make_model(cfg, source, tokenizer)
    weight = model.backbone.vit.patch_embed.proj.weight
    weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    before = parameters(model)
    optimizer_step = OptimizerStep(model, model, sgd(model), cfg.train, CPU)
    scale = optimizer_step.scaler.get_scale()

    result = optimizer_step(make_batch(source, cfg))

    assert torch.isfinite(result.loss)
    assert result.skipped.startswith("fp16 gradient overflow") and not result.fatal
    assert optimizer_step.scaler.get_scale() == scale / 2
    assert_unchanged(model, before)


def nan_at_call(model, which: int, calls: list[int]):
    """The model's forward, its loss NaN at call number `which`; `calls` gets each batch size."""

    def forward(batch):
        calls.append(len(batch))
        loss, monitors = model(batch)
        return (loss * float("nan") if len(calls) == which else loss), monitors

    return forward


def test_a_non_finite_loss_is_skipped_and_changes_nothing(source, tokenizer):
    """NaN in the second micro-batch only: the step's mean loss is NaN, no parameter moves."""
    cfg = config("supervised", "train.accum_steps=2")
    model = make_model(cfg, source, tokenizer)
    calls = []
    nan_second = nan_at_call(model, 2, calls)
    before = parameters(model)
    result = OptimizerStep(model, nan_second, sgd(model), cfg.train, CPU)(make_batch(source, cfg))

    assert calls == [2, 2]
    assert result.skipped.startswith("non-finite loss") and result.fatal
    assert all(p.grad is None for p in model.parameters())
    assert_unchanged(model, before)


def test_fp16_steps_on_after_a_non_finite_loss(source, tokenizer):
    cfg = config("supervised", "train.precision=fp16")
    model = make_model(cfg, source, tokenizer)
    calls = []
    nan_first = nan_at_call(model, 1, calls)
    optimizer_step = OptimizerStep(model, nan_first, sgd(model, 0.1), cfg.train, CPU)
    batch = make_batch(source, cfg)
    first = optimizer_step(batch)
    assert first.skipped.startswith("non-finite loss")
    # the scaler then halves its scale on each gradient overflow (the linear classifier's first
    # gradients overflow fp16 at 2^15) until a step is taken
    later = [optimizer_step(batch) for _ in range(4)]
    skipped = [r.skipped for r in later]
    taken = skipped.index(None)
    assert all(
        s.startswith("fp16 gradient overflow") and not r.fatal
        for s, r in zip(skipped[:taken], later[:taken], strict=True)
    )


def test_a_non_finite_gradient_is_skipped_and_counts(source, tokenizer):
    cfg = config("supervised")
    model = make_model(cfg, source, tokenizer)
    model.backbone.vit.pos_embed.register_hook(lambda grad: grad * float("nan"))
    before = parameters(model)
    result = OptimizerStep(model, model, sgd(model), cfg.train, CPU)(make_batch(source, cfg))
    assert torch.isfinite(result.loss)
    assert result.skipped.startswith("non-finite gradient norm") and result.fatal
    assert_unchanged(model, before)


def test_grad_checkpointing_gives_the_same_loss_and_gradients(source, tokenizer, monkeypatch):
    """The m3i preset: random masks (the same seed for both), both images, decoder, teacher."""
    cfg = config("m3i")
    assert cfg.model.drop_path == 0
    model = make_model(cfg, source, tokenizer)
    checkpointed = copy.deepcopy(model)
    checkpointed.backbone.grad_checkpointing = True
    calls = []
    original = backbone_module.checkpoint_seq
    monkeypatch.setattr(
        backbone_module,
        "checkpoint_seq",
        lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs),
    )
    batch = make_batch(source, cfg)
    results = []
    for net in (model, checkpointed):
        torch.manual_seed(1)
        loss, _ = net(batch)
        loss.backward()
        results.append((loss.detach(), gradients(net)))
    assert calls  # the checkpointed model did recompute its blocks
    (loss, grads), (loss_checkpointed, grads_checkpointed) = results
    torch.testing.assert_close(loss_checkpointed, loss)
    assert grads.keys() == grads_checkpointed.keys()
    assert any(name.startswith("backbone.vit.blocks.") for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_checkpointed[name], grad, msg=name)


@pytest.mark.parametrize(("device", "kernel"), [("cpu", "foreach"), ("cuda", "fused")])
def test_adamw_is_timms_with_the_devices_multi_tensor_kernel(source, tokenizer, device, kernel):
    cfg = config("m3i", "train.lr=0.01", "train.weight_decay=0.1")
    model = make_model(cfg, source, tokenizer)
    reference = copy.deepcopy(model)
    batch = make_batch(source, cfg)
    optimizer = build_optimizer(model, cfg.train, torch.device(device))  # params stay on the CPU
    assert optimizer.defaults["fused" if kernel == "fused" else "foreach"] is True
    assert not optimizer.defaults["foreach" if kernel == "fused" else "fused"]
    # the single-tensor loop of torch's own AdamW on timm's groups (no decay on biases, norms)
    groups = timm.optim.param_groups_weight_decay(
        reference, 0.1, no_weight_decay_list=reference.no_weight_decay()
    )
    plain = torch.optim.AdamW(groups, lr=0.01, foreach=False, fused=False)
    sizes = [len(group["params"]) for group in groups]
    assert [len(group["params"]) for group in optimizer.param_groups] == sizes
    for net, opt in ((model, optimizer), (reference, plain)):  # one step on equal gradients
        torch.manual_seed(0)  # the same masks and mixes
        net(batch)[0].backward()
        opt.step()
    for got, expected in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # steps are 1e-2
