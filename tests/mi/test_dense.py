"""Dense teacher targets against the published formulas written out here: data2vec 2.0's target
(fairseq data2vec2 `make_targets` for images) and SiameseIM's loss (OpenGVLab
Siamese-Image-Modeling `compute_unigrad_loss`), including its all-reduce over 2 gloo ranks."""

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from m3i.data.batch import Batch
from m3i.mi.gaussian_channel import gaussian_information
from m3i.mi.targets import RunContext, StepContext
from m3i.mi.targets.dense import (
    DenseTargetConfig,
    InterViewTarget,
    IntraViewTarget,
    data2vec_target,
    decorrelation_term,
)
from tests.mi.step_inputs import (
    DEC_DIM,
    ENC_DIM,
    identity_head,
    make_streams,
    position_only_tokens,
)

# the 2-rank test spawns processes that import this module: it imports no heavy test helpers
EPS = 1e-5  # torch's default for instance_norm and layer_norm, as data2vec 2.0 uses them


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data2vec_reference(layers: list[torch.Tensor]) -> torch.Tensor:
    """Each (N, P, D) layer normalised per sample and channel over its P tokens, the K layers
    averaged, then each token normalised over its D channels; written with explicit loops."""
    n, p, d = layers[0].shape
    average = torch.zeros(n, p, d)
    for layer in layers:
        for i in range(n):
            for c in range(d):
                column = layer[i, :, c]
                mean = column.sum() / p
                var = ((column - mean) ** 2).sum() / p
                average[i, :, c] += (column - mean) / torch.sqrt(var + EPS) / len(layers)
    out = torch.empty_like(average)
    for i in range(n):
        for j in range(p):
            token = average[i, j]
            mean = token.sum() / d
            var = ((token - mean) ** 2).sum() / d
            out[i, j] = (token - mean) / torch.sqrt(var + EPS)
    return out


@pytest.mark.parametrize("k", [1, 3])
def test_data2vec_target_is_instance_norm_average_then_layer_norm(k):
    g = torch.Generator().manual_seed(k)
    # channels with different offsets and scales: instance norm must remove both per sample
    layers = [
        torch.randn(2, 9, 6, generator=g) * torch.rand(6, generator=g) * 5 + torch.arange(6.0)
        for _ in range(k)
    ]
    torch.testing.assert_close(data2vec_target(layers), data2vec_reference(layers))


def siameseim_reference(prediction, target, neg_weight):
    """(pos + neg_weight * neg) / D: pos sums the squared error over D and averages over tokens;
    neg averages p^T C p over tokens, C = sum of t t^T over tokens / their count."""
    p = prediction.reshape(-1, prediction.shape[-1])
    t = target.reshape(-1, target.shape[-1])
    count, dim = p.shape
    correlation = torch.zeros(dim, dim)
    for row in t:
        correlation += torch.outer(row, row) / count
    positive = sum(((p[i] - t[i]) ** 2).sum() for i in range(count)) / count
    negative = torch.einsum("nd,de,ne->n", p, correlation, p).mean()
    return (positive + neg_weight * negative) / dim


def inter_view_ctx(n: int, grid: int, seed: int) -> StepContext:
    g = torch.Generator().manual_seed(seed)
    teacher = {"view2": F.layer_norm(torch.randn(n, grid, ENC_DIM, generator=g), (ENC_DIM,))}
    decoded = {"other_view": torch.randn(n, grid, DEC_DIM, generator=g)}
    return StepContext(
        Batch([]), make_streams(n, grid, seed), 4, decoded=decoded, teacher_dense=teacher
    )


@pytest.mark.parametrize("n", [1, 2, 3])
def test_siameseim_loss_is_positive_plus_weighted_decorrelation_over_d(n):
    torch.manual_seed(0)
    cfg = DenseTargetConfig(weight=1.0, decorrelation=0.02)
    target = InterViewTarget(cfg, RunContext(ENC_DIM, DEC_DIM))
    ctx = inter_view_ctx(n, 16, seed=n)
    bound = target(ctx)
    prediction = target.head(ctx.decoded["other_view"])
    tokens = ctx.teacher_dense["view2"][ctx.streams["b"].samples]
    torch.testing.assert_close(bound.loss, siameseim_reference(prediction, tokens, 0.02))
    plain = InterViewTarget(DenseTargetConfig(weight=1.0), RunContext(ENC_DIM, DEC_DIM))
    plain.load_state_dict(target.state_dict())
    # the information estimate ignores the decorrelation term (NaN at n <= 2: with one image
    # left out, 16 tokens on 16 positions leave no degree of freedom for the covariance)
    assert torch.isnan(bound.mi) if n <= 2 else torch.isfinite(bound.mi)
    torch.testing.assert_close(bound.mi, plain(ctx).mi, equal_nan=True)
    # the decorrelation term adds to the plain L2 loss, it is not the whole of it
    assert bound.loss.item() > plain(ctx).loss.item() + 1e-4


def test_decorrelation_gradient_treats_the_correlation_as_a_constant():
    g = torch.Generator().manual_seed(0)
    prediction = torch.randn(3, 5, 4, generator=g, requires_grad=True)
    target = torch.randn(3, 5, 4, generator=g, requires_grad=True)
    decorrelation_term(prediction, target).backward()
    assert target.grad is None  # no gradient into the targets
    t = target.detach().reshape(-1, 4)
    correlation = t.t() @ t / 15
    # d/dp of mean_n p_n^T C p_n = 2 C p_n / N for a symmetric constant C
    expected = 2 * prediction.detach() @ correlation / 15
    torch.testing.assert_close(prediction.grad, expected)


def decorrelation_worker(rank: int, port: int, root: Path) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        prediction, target, split = torch.load(root / "inputs.pt")
        results = {}
        for name, rows in split.items():  # each rank's own rows of the global batch
            mine = prediction[rows[rank]].clone().requires_grad_(True)
            value = decorrelation_term(mine, target[rows[rank]])
            value.backward()
            results[name] = (value.detach(), mine.grad)
        torch.save(results, root / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_decorrelation_over_two_ranks_uses_the_global_batch_correlation(tmp_path):
    g = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(8, 3, 4, generator=g), torch.randn(8, 3, 4, generator=g)
    split = {
        "equal": [torch.arange(0, 4), torch.arange(4, 8)],
        "unequal": [torch.arange(0, 3), torch.arange(3, 8)],
    }
    torch.save((prediction, target, split), tmp_path / "inputs.pt")
    mp.spawn(decorrelation_worker, args=(free_port(), tmp_path), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    everything = prediction.clone().requires_grad_(True)
    single = decorrelation_term(everything, target)
    single.backward()
    # equal token counts: 2 ranks x B (DDP averages the gradients) == 1 process x 2B
    (value0, grad0), (value1, grad1) = ranks[0]["equal"], ranks[1]["equal"]
    torch.testing.assert_close((value0 + value1) / 2, single.detach())
    torch.testing.assert_close(torch.cat([grad0, grad1]) / 2, everything.grad)
    # unequal counts: each rank still uses the correlation of all 8 x 3 target tokens
    t = target.reshape(-1, 4)
    correlation = t.t() @ t / len(t)
    for rank, rows in enumerate(split["unequal"]):
        p = prediction[rows].reshape(-1, 4)
        expected = torch.einsum("nd,de,ne->n", p, correlation, p).mean()
        torch.testing.assert_close(ranks[rank]["unequal"][0], expected)


@pytest.mark.parametrize("n", [1, 3])
def test_intra_view_with_instance_norm_reads_the_top_k_teacher_layers(n):
    grid, q, depth = 16, 6, 4
    torch.manual_seed(0)
    cfg = DenseTargetConfig(weight=1.0, norm="instance", layers=2)
    target = IntraViewTarget(cfg, RunContext(ENC_DIM, DEC_DIM))
    assert target.teacher_layers == 2
    g = torch.Generator().manual_seed(n)
    streams = make_streams(n, grid, seed=n)
    streams["a"].samples = torch.arange(n - 1, -1, -1)
    masked = torch.stack([torch.randperm(grid, generator=g)[:q] for _ in range(n)])
    layers = [torch.randn(n, grid, ENC_DIM, generator=g) * 3 + 1 for _ in range(depth)]
    ctx = StepContext(
        Batch([]),
        streams,
        4,
        masked_positions=masked,
        decoded={"masked": torch.randn(n, q, DEC_DIM, generator=g)},
        teacher_layers={"view1": layers},
    )
    full = data2vec_reference(layers[-2:])  # the top 2 of the 4 blocks the step returned
    reference = torch.empty(n, q, ENC_DIM)
    for r in range(n):
        for j in range(q):
            reference[r, j] = full[int(streams["a"].samples[r]), int(masked[r, j])]
    torch.testing.assert_close(target.target_tokens(ctx), reference)
    expected = F.mse_loss(target.head(ctx.decoded["masked"]), reference)
    torch.testing.assert_close(target(ctx).loss, expected)


def test_inter_view_figure_is_the_jackknife_over_its_rows_images():
    """Each row of the queries is one image: the figure leaves out one row at a time (the
    plain estimate recomputed on the other rows), and its standard error is logged."""
    n, grid = 6, 16
    target = InterViewTarget(DenseTargetConfig(weight=1.0), RunContext(ENC_DIM, DEC_DIM))
    ctx = inter_view_ctx(n, grid, seed=4)
    bound = target(ctx)
    prediction = target.head(ctx.decoded["other_view"]).detach()
    tokens = ctx.teacher_dense["view2"][ctx.streams["b"].samples]
    positions = torch.arange(grid).expand(n, grid)
    full = gaussian_information(prediction, tokens, positions, grid)[0].item()
    rows = list(range(n))
    loo = torch.tensor(
        [
            gaussian_information(
                prediction[[o for o in rows if o != r]],
                tokens[[o for o in rows if o != r]],
                positions[1:],
                grid,
            )[0].item()
            for r in rows
        ]
    )
    expected = n * full - (n - 1) * loo.mean().item()
    assert bound.mi.item() == pytest.approx(expected, abs=1e-3)
    expected_se = ((n - 1) / n * (loo - loo.mean()).pow(2).sum()).sqrt().item()
    assert bound.se.item() == pytest.approx(expected_se, rel=1e-3)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_intra_view_regresses_teacher_view1_at_masked_positions(n):
    grid, q = 16, 8
    torch.manual_seed(0)
    target = IntraViewTarget(DenseTargetConfig(weight=1.0), RunContext(ENC_DIM, DEC_DIM))
    g = torch.Generator().manual_seed(n)
    streams = make_streams(n, grid, seed=n)
    streams["a"].samples = torch.arange(n - 1, -1, -1)
    masked = torch.stack([torch.randperm(grid, generator=g)[:q] for _ in range(n)])
    teacher = {
        "view1": torch.randn(n, grid, ENC_DIM, generator=g),
        "view2": torch.randn(n, grid, ENC_DIM, generator=g),
    }
    decoded = torch.randn(n, q, DEC_DIM, generator=g)
    ctx = StepContext(
        {}, streams, 4, masked_positions=masked, decoded={"masked": decoded}, teacher_dense=teacher
    )
    reference = torch.empty(n, q, ENC_DIM)
    for r in range(n):
        for j in range(q):
            reference[r, j] = teacher["view1"][int(streams["a"].samples[r]), int(masked[r, j])]
    torch.testing.assert_close(target.target_tokens(ctx), reference)
    expected = F.mse_loss(target.head(decoded), reference)
    torch.testing.assert_close(target(ctx).loss, expected)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_inter_view_regresses_partner_teacher_view2_densely(n):
    grid = 16
    torch.manual_seed(0)
    target = InterViewTarget(DenseTargetConfig(weight=1.0), RunContext(ENC_DIM, DEC_DIM))
    g = torch.Generator().manual_seed(n)
    streams = make_streams(n, grid, seed=n)
    teacher = {
        "view1": torch.randn(n, grid, ENC_DIM, generator=g),
        "view2": torch.randn(n, grid, ENC_DIM, generator=g),
    }
    decoded = torch.randn(n, grid, DEC_DIM, generator=g)
    ctx = StepContext({}, streams, 4, decoded={"other_view": decoded}, teacher_dense=teacher)
    reference = torch.empty(n, grid, ENC_DIM)
    for r in range(n):
        partner = n - 1 - r  # stream b row r holds image B = sample n-1-r
        for j in range(grid):
            reference[r, j] = teacher["view2"][partner, j]
    torch.testing.assert_close(target.target_tokens(ctx), reference)
    expected = F.mse_loss(target.head(decoded), reference)
    torch.testing.assert_close(target(ctx).loss, expected)


def test_intra_view_figure_is_zero_for_a_position_only_predictor():
    """The queries' positions reach the estimate: predicting each masked position's mean tells
    nothing (without the positions the figure would be far above 0)."""
    n, grid, q = 64, 16, 8
    target = IntraViewTarget(DenseTargetConfig(weight=1.0), RunContext(ENC_DIM, ENC_DIM))
    identity_head(target)
    means, teacher = position_only_tokens(n, grid, ENC_DIM, seed=0)
    g = torch.Generator().manual_seed(1)
    masked = torch.stack([torch.randperm(grid, generator=g)[:q] for _ in range(n)])
    streams = make_streams(n, grid, seed=0)
    streams["a"].samples = torch.arange(n - 1, -1, -1)
    ctx = StepContext(
        Batch([]),
        streams,
        4,
        masked,
        {"masked": means[masked]},
        {"view1": teacher, "view2": teacher},
    )
    assert abs(target(ctx).mi.item()) < 0.1


def test_inter_view_figure_is_zero_for_a_position_only_predictor():
    n, grid = 64, 16
    target = InterViewTarget(DenseTargetConfig(weight=1.0), RunContext(ENC_DIM, ENC_DIM))
    identity_head(target)
    means, teacher = position_only_tokens(n, grid, ENC_DIM, seed=2)
    decoded = {"other_view": means.expand(n, grid, ENC_DIM)}
    ctx = StepContext(
        Batch([]), make_streams(n, grid, seed=2), 4, None, decoded, {"view2": teacher}
    )
    assert abs(target(ctx).mi.item()) < 0.1
