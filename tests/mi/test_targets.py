"""Targets on a hand-built StepContext, against brute-force and library references."""

import math
from dataclasses import fields

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from m3i.config import Config
from m3i.data.batch import Batch, View
from m3i.mi.targets import RunContext, StepContext, Stream, information
from m3i.mi.targets.category import CategoryTarget, CategoryTargetConfig
from m3i.mi.targets.dense import DenseTargetConfig, InterViewTarget, IntraViewTarget
from m3i.mi.targets.pixels import PixelTarget, PixelTargetConfig
from m3i.mi.targets.text import TextTarget, TextTargetConfig
from m3i.models.text import train_bpe

ENC_DIM, DEC_DIM = 12, 10
CAPTIONS = [
    "a red circle on a blue background",
    "a green square next to a yellow triangle",
    "two small blue circles",
    "a large red square",
    "a yellow triangle above a green circle",
]


def image_batch(view1: torch.Tensor) -> Batch:
    """A batch of one view (its boxes and flips unread by the targets here)."""
    n = len(view1)
    return Batch([View(view1, torch.zeros(n, 4), torch.zeros(n, dtype=torch.bool))])


def make_streams(n: int, grid: int, seed: int, both: bool = True) -> dict[str, Stream]:
    """Stream a holds sample i in row i, stream b the partner n - 1 - i (as the step does)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.rand(n, grid, generator=g).argsort(dim=1)
    half = grid // 2
    streams = {
        "a": Stream(
            torch.randn(n, half, ENC_DIM, generator=g),
            order[:, :half].sort(dim=1).values,
            torch.arange(n),
        )
    }
    if both:
        streams["b"] = Stream(
            torch.randn(n, grid - half, ENC_DIM, generator=g),
            order[:, half:].sort(dim=1).values,
            torch.arange(n - 1, -1, -1),
        )
    return streams


# ---------------------------------------------------------------- category


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


# 91% of the images in class 0, 1% in each of the 9 others: H(Y) by hand, in nats
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


def test_every_target_says_whether_its_figure_is_a_bound_or_an_estimate():
    # by hand, from docs/information.md: Boltzmann posteriors give InfoNCE-style lower bounds,
    # Gaussian ones the Gaussian-channel estimate
    expected = {
        "category": "lower bound",
        "text": "lower bound",
        "view_contrast": "lower bound",
        "intra_view": "estimate",
        "inter_view": "estimate",
        "pixels": "estimate",
        "view_regress": "estimate",
    }
    assert {name: information()[name] for name in expected} == expected
    assert [f.name for f in fields(Config().targets)] == [
        "category", "text", "intra_view", "inter_view", "pixels", "view_contrast", "view_regress"
    ]  # fmt: skip


# ---------------------------------------------------------------- text


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(CAPTIONS, vocab_size=80)


def text_target(tokenizer) -> TextTarget:
    torch.manual_seed(0)
    cfg = TextTargetConfig(
        weight=1.0, embed_dim=8, hidden_dim=16, width=16, depth=1, heads=2, context_length=12
    )
    return TextTarget(cfg, RunContext(ENC_DIM, tokenizer=tokenizer)).eval()


def test_text_init_temperature(tokenizer):
    target = text_target(tokenizer)
    assert (1 / target.logit_scale.exp()).item() == pytest.approx(0.07, rel=1e-6)


@pytest.mark.parametrize("log_scale", [math.log(14.0), math.log(99.0), math.log(150.0)])
def test_text_logit_scale_gradient_is_open_clips_below_and_above_the_cap(log_scale, tokenizer):
    """The forward pass uses exp(logit_scale) as it is: its gradient is open_clip's ClipLoss
    gradient, never cut to zero (the cap is applied after the optimizer step instead)."""
    target = text_target(tokenizer)
    with torch.no_grad():
        target.logit_scale.fill_(log_scale)
    streams = make_streams(3, 16, seed=7, both=False)
    bound = target(StepContext(Batch([], captions=CAPTIONS[:3]), streams, 4))
    bound.loss.backward()
    image = target.encode_image(streams["a"].tokens.mean(dim=1)).detach()
    text = target.encode_text(CAPTIONS[:3]).detach()
    reference_log_scale = torch.tensor(log_scale, requires_grad=True)
    ClipLoss()(image, text, reference_log_scale.exp()).backward()
    assert reference_log_scale.grad.abs() > 1e-4
    torch.testing.assert_close(
        target.logit_scale.grad[0], reference_log_scale.grad, atol=1e-5, rtol=1e-4
    )


def test_text_after_optimizer_step_caps_the_scale_at_100(tokenizer):
    target = text_target(tokenizer)
    for log_scale, expected in [(math.log(250.0), 100.0), (math.log(40.0), 40.0), (-1.0, 1.0)]:
        with torch.no_grad():
            target.logit_scale.fill_(log_scale)
        target.after_optimizer_step()
        assert target.logit_scale.exp().item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_text_one_stream_equals_open_clip(n, tokenizer):
    target = text_target(tokenizer)
    streams = make_streams(n, 16, seed=n, both=False)
    captions = [CAPTIONS[i] for i in range(n)]
    bound = target(StepContext(Batch([], captions=captions), streams, 4))
    image = target.encode_image(streams["a"].tokens.mean(dim=1))
    text = target.encode_text(captions)
    reference = ClipLoss()(image, text, target.logit_scale.exp())
    torch.testing.assert_close(bound.loss, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bound.mi, math.log(n) - reference.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [2, 3])
def test_text_excludes_captionless_samples(n, tokenizer):
    target = text_target(tokenizer)
    streams = make_streams(n, 16, seed=n, both=False)
    captions = [CAPTIONS[i] if i != 1 else "" for i in range(n)]
    bound = target(StepContext(Batch([], captions=captions), streams, 4))
    keep = [i for i in range(n) if captions[i]]
    image = target.encode_image(streams["a"].tokens.mean(dim=1))[keep]
    text = target.encode_text([captions[i] for i in keep])  # encoded without the empty ones
    reference = ClipLoss()(image, text, target.logit_scale.exp())
    torch.testing.assert_close(bound.loss, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_text_two_streams_average_their_clip_losses(n, tokenizer):
    target = text_target(tokenizer)
    streams = make_streams(n, 16, seed=10 + n)
    captions = [CAPTIONS[i] if i != 0 or n == 1 else "" for i in range(n)]
    bound = target(StepContext(Batch([], captions=captions), streams, 4))
    losses = []
    for stream in streams.values():
        image = target.encode_image(stream.tokens.mean(dim=1))
        rows = [r for r in range(n) if captions[int(stream.samples[r])]]
        text = target.encode_text([captions[int(stream.samples[r])] for r in rows])
        losses.append(ClipLoss()(image[rows], text, target.logit_scale.exp()))
    torch.testing.assert_close(bound.loss, sum(losses) / 2, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 2])
def test_text_without_captions_is_zero_without_a_figure(n, tokenizer):
    target = text_target(tokenizer)
    bound = target(StepContext(Batch([], captions=[""] * n), make_streams(n, 16, seed=n), 4))
    assert torch.isfinite(bound.loss) and bound.loss.item() == 0.0
    assert math.isnan(bound.mi.item())  # null in the log, left out of means


# ---------------------------------------------------------------- pixels


def brute_force_patches(image: torch.Tensor, p: int) -> list[list[float]]:
    """Row-major patches of a (C, H, W) image, each flattened as (p, q, channel)."""
    c, h, w = image.shape
    patches = []
    for row in range(h // p):
        for col in range(w // p):
            values = []
            for y in range(p):
                for x in range(p):
                    for ch in range(c):
                        values.append(image[ch, row * p + y, col * p + x].item())
            patches.append(values)
    return patches


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_pixel_target_equals_brute_force(n, norm_pix):
    p, size = 4, 12  # a 3x3 grid of 4x4 patches
    grid = (size // p) ** 2
    torch.manual_seed(0)
    run = RunContext(decoder_dim=DEC_DIM, patch_size=p)
    target = PixelTarget(PixelTargetConfig(weight=1.0, norm_pix=norm_pix), run)
    g = torch.Generator().manual_seed(n)
    view1 = torch.rand(n, 3, size, size, generator=g) * 2 + torch.arange(n)[:, None, None, None]
    streams = make_streams(n, grid, seed=n)
    streams["a"].samples = torch.arange(n - 1, -1, -1)  # row r of stream a holds sample n-1-r
    masked = torch.stack([torch.randperm(grid, generator=g)[:4] for _ in range(n)])
    decoded = torch.randn(n, 4, DEC_DIM, generator=g)
    ctx = StepContext(
        image_batch(view1),
        streams,
        masked_positions=masked,
        decoded={"masked": decoded},
        patch_size=p,
    )
    bound = target(ctx)

    rows = []
    for r in range(n):
        patches = brute_force_patches(view1[int(streams["a"].samples[r])], p)
        for q in range(masked.shape[1]):
            values = patches[int(masked[r, q])]
            if norm_pix:
                mean = sum(values) / len(values)
                var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
                values = [(v - mean) / math.sqrt(var + 1e-6) for v in values]
            rows.append(values)
    reference = torch.tensor(rows, dtype=torch.float32).reshape(n, masked.shape[1], -1)
    prediction = target.head(decoded)
    expected = ((prediction - reference) ** 2).mean()
    torch.testing.assert_close(bound.loss, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- dense teacher


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


def position_only_tokens(n: int, grid: int, d: int, seed: int):
    """Per-position means (grid, d) and tokens = mean + unit noise for n images."""
    g = torch.Generator().manual_seed(seed)
    means = 3 * torch.randn(grid, d, generator=g)
    return means, means + torch.randn(n, grid, d, generator=g)


def identity_head(target) -> None:
    with torch.no_grad():
        target.head.weight.copy_(torch.eye(*target.head.weight.shape))
        target.head.bias.zero_()


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


def test_pixel_figure_is_zero_for_a_position_only_predictor():
    n, p, size, q = 64, 4, 16, 8
    grid = (size // p) ** 2
    run = RunContext(decoder_dim=3 * p * p, patch_size=p)
    target = PixelTarget(PixelTargetConfig(weight=1.0, norm_pix=False), run)
    identity_head(target)
    g = torch.Generator().manual_seed(3)
    mean_image = 3 * torch.randn(3, size, size, generator=g)
    images = mean_image + torch.randn(n, 3, size, size, generator=g)
    patch_means = torch.tensor(brute_force_patches(mean_image, p))  # (grid, 48)
    masked = torch.stack([torch.randperm(grid, generator=g)[:q] for _ in range(n)])
    decoded = {"masked": patch_means[masked]}
    ctx = StepContext(image_batch(images), make_streams(n, grid, seed=3), p, masked, decoded)
    assert abs(target(ctx).mi.item()) < 0.1
