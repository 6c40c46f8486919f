"""The category target (`targets.category`) on a hand-built StepContext: logits by hand, the
labelled rows of both streams, and its lower bound against the label prior's entropy."""

import math

import pytest
import torch
import torch.nn.functional as F

from m3i.data.batch import Batch
from m3i.mi.targets import RunContext, StepContext, Stream
from m3i.mi.targets.category import CategoryTarget, CategoryTargetConfig
from tests.mi.step_inputs import (
    ENC_DIM,
    make_streams,
)


def category_target(classes: int) -> CategoryTarget:
    torch.manual_seed(0)
    cfg = CategoryTargetConfig(weight=1.0, hidden_dim=16, embed_dim=8)
    return CategoryTarget(cfg, RunContext(ENC_DIM, num_classes=classes))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_category_loss_over_labelled_rows_of_both_streams(n):
    classes = 4
    target = category_target(classes)
    streams = make_streams(n, 16, seed=n)
    # sample 1 is unlabelled (when there is one)
    labels = torch.tensor([(3 * i + 1) % classes if i != 1 else -1 for i in range(n)])
    ctx = StepContext(Batch([], labels), streams, 4)
    bound = target(ctx)
    # brute force: one cross-entropy term per (stream, row) whose image is labelled
    terms = []
    for stream in streams.values():
        logits = target.logits(stream.tokens.mean(dim=1))
        for row in range(n):
            label = int(labels[stream.samples[row]])
            if label >= 0:
                terms.append(F.cross_entropy(logits[row : row + 1], torch.tensor([label])))
    expected = sum(terms) / len(terms)
    torch.testing.assert_close(bound.loss, expected)
    torch.testing.assert_close(bound.mi, math.log(classes) - expected.detach())


def test_category_logits_by_hand():
    """head=linear (the supervised preset's): the dot product of the pooled features with each
    class embedding plus its class's bias, by hand."""
    cfg = CategoryTargetConfig(weight=1.0, head="linear")
    target = CategoryTarget(cfg, RunContext(encoder_dim=3, num_classes=3))
    with torch.no_grad():
        target.class_embedding.copy_(
            torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 1.0], [-1.0, 2.0, 2.0]])
        )
        target.class_bias.copy_(torch.tensor([0.5, -1.0, -1.5]))
    pooled = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [2.0, -1.0, 0.0]])
    # [1 - 3 + 0.5, 4 + 3 - 1, -1 + 4 + 6 - 1.5]; the biases; [2 + 0.5, -2 - 1, -2 - 2 - 1.5]
    expected = torch.tensor([[-1.5, 6.0, 7.5], [0.5, -1.0, -1.5], [2.5, -3.0, -5.5]])
    torch.testing.assert_close(target.logits(pooled), expected)
    # the loss of a labelled image: cross-entropy of those logits, by hand
    labels = torch.tensor([2, 0, 1])
    streams = {
        "a": Stream(pooled[:, None, :], torch.zeros(3, 1, dtype=torch.long), torch.arange(3))
    }
    bound = target(StepContext(Batch([], labels), streams, 4))
    rows = expected.tolist()
    by_hand = (
        sum(
            math.log(sum(math.exp(v) for v in row)) - row[label]
            for row, label in zip(rows, labels.tolist(), strict=True)
        )
        / 3
    )
    assert bound.loss.item() == pytest.approx(by_hand, rel=1e-6)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_category_without_labels_is_zero_without_a_figure_and_backpropagates(n):
    target = category_target(4)
    streams = make_streams(n, 16, seed=n)
    for s in streams.values():
        s.tokens.requires_grad_(True)
    ctx = StepContext(Batch([], torch.full((n,), -1)), streams, 4)
    bound = target(ctx)
    assert torch.isfinite(bound.loss) and bound.loss.item() == 0.0
    assert math.isnan(bound.mi.item())  # no figure for the step: the log writes null, not 0
    bound.loss.backward()  # the zero loss is still part of a graph
    assert streams["a"].tokens.grad is not None
    assert torch.count_nonzero(streams["a"].tokens.grad) == 0


IMBALANCED = torch.tensor([0.91] + [0.01] * 9)


IMBALANCED_ENTROPY = -(0.91 * math.log(0.91) + 9 * 0.01 * math.log(0.01))  # 0.5003


def imbalanced_labels(n: int) -> torch.Tensor:
    """n = 100 k labels with exactly the IMBALANCED frequencies, shuffled."""
    labels = torch.cat([torch.zeros(91 * n // 100, dtype=torch.long), torch.arange(1, 10)])
    labels = torch.cat([labels[:-9], labels[-9:].repeat(n // 100)])
    return labels[torch.randperm(n)]


def test_category_on_noise_with_an_imbalanced_prior_stays_below_its_entropy():
    """Pure-noise images, 91% in one class: the classifier learns the prior and nothing else, so
    the figure is near 0 and never above H(Y) = 0.50 (log C - CE said 2.07 here)."""
    torch.manual_seed(0)
    cfg = CategoryTargetConfig(weight=1.0, hidden_dim=16, embed_dim=8)
    target = CategoryTarget(cfg, RunContext(ENC_DIM, num_classes=10, label_prior=IMBALANCED))
    assert target.label_entropy == pytest.approx(IMBALANCED_ENTROPY, rel=1e-6)
    optimizer = torch.optim.Adam(target.parameters(), lr=0.01)
    for step in range(60):
        ctx = StepContext(Batch([], imbalanced_labels(100)), make_streams(100, 4, seed=step), 4)
        bound = target(ctx)
        optimizer.zero_grad()
        bound.loss.backward()
        optimizer.step()
        assert bound.mi.item() <= IMBALANCED_ENTROPY
    with torch.no_grad():
        ctx = StepContext(Batch([], imbalanced_labels(2000)), make_streams(2000, 4, seed=99), 4)
        bound = target(ctx)
    torch.testing.assert_close(bound.mi, IMBALANCED_ENTROPY - bound.loss)
    assert -0.1 < bound.mi.item() < 0.05


def test_category_predicting_the_prior_gets_zero():
    run = RunContext(ENC_DIM, num_classes=10, label_prior=IMBALANCED)
    target = CategoryTarget(CategoryTargetConfig(weight=1.0), run)
    target.logits = lambda pooled: IMBALANCED.log().expand(len(pooled), 10)
    bound = target(StepContext(Batch([], imbalanced_labels(200)), make_streams(200, 4, seed=1), 4))
    assert bound.loss.item() == pytest.approx(IMBALANCED_ENTROPY, rel=1e-5)
    assert bound.mi.item() == pytest.approx(0.0, abs=1e-5)


def test_category_without_a_prior_counts_classes_as_balanced():
    target = CategoryTarget(CategoryTargetConfig(weight=1.0), RunContext(ENC_DIM, num_classes=7))
    assert target.label_entropy == pytest.approx(math.log(7))


def test_category_prior_must_match_the_classes():
    with pytest.raises(ValueError, match="label_prior must hold 10 .* shape \\(4,\\)"):
        run = RunContext(ENC_DIM, num_classes=10, label_prior=torch.ones(4) / 4)
        CategoryTarget(CategoryTargetConfig(weight=1.0), run)
