"""train.compile: the compiled step (torch.compile, Inductor) against the eager one, same
weights, same batch and the same random draws: equal loss, monitors and gradients, and no
recompilation on the next step; for M3I, and for a preset with one target (whose loss is the
total: a detached monitor of it once took the total's gradient, pytorch/pytorch#195357)."""

import copy

import pytest
import torch
import torch._dynamo
import torch._inductor.config

from m3i.bench.measure import synthetic_batch
from m3i.config import load_config
from m3i.data.shapes import CLASSES, ShapesDataset
from m3i.method import M3IModel
from m3i.mi.targets import RunContext
from m3i.models.text import train_bpe
from m3i.train.optimizer_step import OptimizerStep, build_optimizer
from tests.tiny import TINY_M3I

CPU = torch.device("cpu")
STEPS = 3


def run_steps(model: M3IModel, forward, cfg, batch, steps: int) -> list[dict]:
    """Loss, monitors and gradients of each of `steps` optimizer steps (OptimizerStep)."""
    optimizer_step = OptimizerStep(
        model, forward, build_optimizer(model, cfg.train, CPU), cfg.train, CPU
    )
    results = []
    for step in range(steps):
        torch.manual_seed(step)  # the mix's draws
        result = optimizer_step(batch)
        assert result.skipped is None
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        monitors = {k: v.detach() for k, v in result.monitors.items() if k.startswith("loss/")}
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # compiled so far
        results.append(
            {"loss": result.loss, "monitors": monitors, "grads": grads, "graphs": graphs}
        )
        model.momentum_update(0.99)
    return results


@pytest.mark.slow  # Inductor compiles the step's graphs in ~30 s (warm cache) to 6 min (cold,
# on a loaded 2-core CPU); CI still runs it
@pytest.mark.parametrize(("preset", "steps"), [("m3i", STEPS), ("mae", 1)])
def test_compiled_step_matches_eager(preset, steps):
    cfg = load_config(preset, overrides=[*TINY_M3I, "model.img_size=16", "model.patch_size=4"])
    captions = ShapesDataset("train", num_samples=50).captions()
    torch.manual_seed(0)
    tokenizer = train_bpe(captions, cfg.targets.text.vocab_size)
    eager = M3IModel(cfg, RunContext(num_classes=len(CLASSES), tokenizer=tokenizer)).train()
    eager.measure_information = False  # as on the steps the loop does not log
    compiled = copy.deepcopy(eager)
    batch = synthetic_batch(8, 16, captions, CPU)
    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):  # torch.rand draws as eager's
        got = run_steps(compiled, torch.compile(compiled), cfg, batch, steps)
    expected = run_steps(eager, eager, cfg, batch, steps)
    assert got[0]["graphs"] > 0 and got[-1]["graphs"] == got[0]["graphs"]  # no recompilation
    for mine, reference in zip(got, expected, strict=True):
        torch.testing.assert_close(mine["loss"], reference["loss"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mine["monitors"], reference["monitors"], rtol=1e-5, atol=1e-6)
        assert mine["grads"].keys() == reference["grads"].keys() and reference["grads"]
        torch.testing.assert_close(mine["grads"], reference["grads"], rtol=1e-4, atol=1e-5)
