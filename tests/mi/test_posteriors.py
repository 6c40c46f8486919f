"""The two posterior families against reference implementations and closed forms."""

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from m3i.mi.posteriors import (
    boltzmann,
    gaussian,
    normalised_l2,
    query_key_infonce,
    symmetric_infonce,
)


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1)


@pytest.mark.parametrize("n", [1, 2, 3, 8])
@pytest.mark.parametrize("scale", [1.0, 1 / 0.07, 100.0])
def test_symmetric_infonce_equals_open_clip(n, scale):
    image, text = unit(n, 16, n), unit(n, 16, 100 + n)
    logit_scale = torch.tensor(scale)
    reference = ClipLoss()(image, text, logit_scale)
    bound = symmetric_infonce(scale * image @ text.t())
    torch.testing.assert_close(bound.loss, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bound.mi, math.log(n) - reference, atol=1e-5, rtol=1e-5)


def test_symmetric_infonce_is_not_one_directional():
    # An asymmetric logit matrix: the two directions differ, the loss is their mean.
    logits = torch.tensor([[3.0, 0.0, 0.0], [2.5, 1.0, 0.0], [0.0, 0.0, 2.0]])
    labels = torch.arange(3)
    rows, cols = F.cross_entropy(logits, labels), F.cross_entropy(logits.t(), labels)
    assert abs(rows.item() - cols.item()) > 1e-3
    torch.testing.assert_close(symmetric_infonce(logits).loss, (rows + cols) / 2)


def moco_v3_ctr(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v3's Algorithm 1, written out: ctr(q, k) = CE(q k^T / t, arange) * 2t, on unit
    vectors, the cross-entropy as a brute-force mean of -log softmax rows."""
    q, k = q / q.norm(dim=1, keepdim=True), k / k.norm(dim=1, keepdim=True)
    logits = q @ k.t() / temperature
    rows = [-(logits[i, i] - torch.logsumexp(logits[i], 0)) for i in range(len(q))]
    return sum(rows) / len(rows) * 2 * temperature


@pytest.mark.parametrize("n", [1, 2, 3, 8])
@pytest.mark.parametrize("temperature", [0.2, 1.0])
def test_query_key_infonce_is_moco_v3_ctr(n, temperature):
    g = torch.Generator().manual_seed(n)
    q, k = torch.randn(n, 12, generator=g) * 3, torch.randn(n, 12, generator=g)  # not unit
    bound = query_key_infonce(q, k, torch.arange(n), temperature)
    reference = moco_v3_ctr(q, k, temperature)
    torch.testing.assert_close(bound.loss, reference, atol=1e-5, rtol=1e-5)
    # the bound: log K - cross-entropy, with the unscaled cross-entropy
    expected_mi = math.log(n) - reference / (2 * temperature)
    torch.testing.assert_close(bound.mi, expected_mi, atol=1e-5, rtol=1e-5)


def test_query_key_infonce_positives_index_the_keys():
    """Two queries against five keys (a rank's slice of a gathered batch): row i's positive is
    key positives[i]; the bound is log 5 - cross-entropy."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 6, generator=g), torch.randn(5, 6, generator=g)
    positives = torch.tensor([3, 1])
    bound = query_key_infonce(q, k, positives, 0.5)
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).t() / 0.5
    ce = (-(logits[0, 3] - logits[0].logsumexp(0)) - (logits[1, 1] - logits[1].logsumexp(0))) / 2
    torch.testing.assert_close(bound.loss, 2 * 0.5 * ce)
    torch.testing.assert_close(bound.mi, math.log(5) - ce)


def test_query_key_infonce_of_perfect_keys_tends_to_log_k():
    k = torch.eye(4)  # orthogonal keys: at a small temperature each query picks its own
    bound = query_key_infonce(k.clone(), k, torch.arange(4), 0.01)
    assert bound.loss.item() == pytest.approx(0.0, abs=1e-6)
    assert bound.mi.item() == pytest.approx(math.log(4), abs=1e-6)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("classes", [2, 7])
def test_boltzmann_is_cross_entropy(n, classes):
    g = torch.Generator().manual_seed(10 * n + classes)
    logits = torch.randn(n, classes, generator=g) * 3
    labels = torch.randint(0, classes, (n,), generator=g)
    bound = boltzmann(logits, labels)
    # brute force: -log softmax at the label, averaged
    manual = sum(-(logits[i, labels[i]] - torch.logsumexp(logits[i], 0)) for i in range(n)) / n
    torch.testing.assert_close(bound.loss, F.cross_entropy(logits, labels))
    torch.testing.assert_close(bound.loss, manual)
    torch.testing.assert_close(bound.mi, math.log(classes) - bound.loss.detach())


def test_boltzmann_uniform_logits_give_zero_bound():
    bound = boltzmann(torch.zeros(3, 5), torch.tensor([0, 4, 2]))
    torch.testing.assert_close(bound.loss, torch.tensor(math.log(5)))
    torch.testing.assert_close(bound.mi, torch.tensor(0.0), atol=1e-6, rtol=0)


@pytest.mark.parametrize("noise_std", [0.5, 1.0, 2.0])
def test_gaussian_estimate_on_independent_gaussian_channels(noise_std):
    d, n = 4, 200_000
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    z_y = x + noise_std * torch.randn(n, d, generator=g)
    bound = gaussian(x, z_y)
    true_mi = d * 0.5 * math.log((1 + noise_std**2) / noise_std**2)
    assert bound.mi.item() == pytest.approx(true_mi, rel=0.03)
    assert bound.loss.item() == pytest.approx(noise_std**2, rel=0.02)


def test_gaussian_loss_is_mse_over_all_leading_dims():
    g = torch.Generator().manual_seed(1)
    prediction, target = torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 3, generator=g)
    bound = gaussian(prediction, target)
    manual = (
        sum(
            (prediction[i, j, k] - target[i, j, k]) ** 2
            for i in range(2)
            for j in range(5)
            for k in range(3)
        )
        / 30
    )
    torch.testing.assert_close(bound.loss, manual)


def random_covariance(d: int, floor: float, g: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.t() / d + floor * torch.eye(d, dtype=torch.float64)


def gaussian_tokens(n: int, q: int, grid: int, d: int, seed: int) -> dict[str, torch.Tensor]:
    """Tokens y = mu_p + s + n at q random positions of `grid` per image, with full-rank signal
    and correlated noise covariances, and the closed form I = 1/2 log det(S + N) / det N."""
    g = torch.Generator().manual_seed(seed)
    sigma_s, sigma_n = random_covariance(d, 0.0, g), random_covariance(d, 0.3, g)
    exact = 0.5 * (torch.logdet(sigma_s + sigma_n) - torch.logdet(sigma_n)).item()
    positions = torch.rand(n, grid, generator=g).argsort(1)[:, :q]
    means = 3 * torch.randn(grid, d, generator=g, dtype=torch.float64)
    signal = torch.randn(n, q, d, generator=g, dtype=torch.float64)
    noise = torch.randn(n, q, d, generator=g, dtype=torch.float64)
    signal = signal @ torch.linalg.cholesky(sigma_s).t()
    noise = noise @ torch.linalg.cholesky(sigma_n).t()
    return {
        "target": means[positions] + signal + noise,
        "optimal": means[positions] + signal,  # E[y | x, position]
        "position_only": means[positions],  # E[y | position]
        "positions": positions,
        "exact": exact,
    }


@pytest.mark.parametrize("d", [16, 64])
def test_gaussian_estimate_equals_closed_form_with_correlated_noise(d):
    tokens = gaussian_tokens(128, 32, 64, d, seed=d)
    bound = gaussian(tokens["optimal"], tokens["target"], tokens["positions"], 64)
    assert tokens["exact"] > 3
    assert bound.mi.item() == pytest.approx(tokens["exact"], rel=0.1)


def test_gaussian_estimate_counts_a_repeated_signal_once():
    n, d = 8192, 192  # one scalar signal in every dimension, unit noise: I = 1/2 log(1 + d)
    g = torch.Generator().manual_seed(3)
    signal = torch.randn(n, 1, generator=g)
    target = signal + torch.randn(n, d, generator=g)
    bound = gaussian(signal.expand(n, d), target)
    assert bound.mi.item() == pytest.approx(0.5 * math.log(1 + d), rel=0.1)


def test_gaussian_estimate_is_invariant_to_rotating_the_target_space():
    tokens = gaussian_tokens(64, 32, 64, 32, seed=5)
    rotation, _ = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64))
    before = gaussian(tokens["optimal"], tokens["target"], tokens["positions"], 64).mi
    after = gaussian(
        tokens["optimal"] @ rotation, tokens["target"] @ rotation, tokens["positions"], 64
    ).mi
    assert after.item() == pytest.approx(before.item(), rel=0.02)


def test_a_constant_offset_of_the_predictions_carries_no_information_away():
    """Information cannot depend on shifting the predictor by a constant: the estimate uses the
    error's covariance (a second moment would count the offset as error)."""
    tokens = gaussian_tokens(128, 32, 64, 16, seed=9)
    offset = torch.linspace(-2.0, 3.0, 16, dtype=torch.float64)
    exact = gaussian(tokens["optimal"], tokens["target"], tokens["positions"], 64).mi
    shifted = gaussian(tokens["optimal"] + offset, tokens["target"], tokens["positions"], 64).mi
    assert shifted.item() == pytest.approx(exact.item(), abs=1e-4)
    assert exact.item() == pytest.approx(tokens["exact"], rel=0.1)


def test_a_position_only_predictor_gets_zero():
    tokens = gaussian_tokens(128, 32, 64, 16, seed=7)
    bound = gaussian(tokens["position_only"], tokens["target"], tokens["positions"], 64)
    assert abs(bound.mi.item()) < 0.05
    # the per-position means must be removed: with the overall mean only, positions look informative
    assert gaussian(tokens["position_only"], tokens["target"]).mi.item() > 5


def test_gaussian_estimate_is_unbiased_at_few_tokens_per_position():
    """T = 256 tokens at 64 positions, D = 32: the log dets' Wishart bias is corrected (without
    the correction the mean is 0.3 nats low); the mean over draws is within its noise of exact."""
    errors = []
    for seed in range(40):
        tokens = gaussian_tokens(8, 32, 64, 32, seed=1000 + seed)
        bound = gaussian(tokens["optimal"], tokens["target"], tokens["positions"], 64)
        errors.append(bound.mi.item() - tokens["exact"])
    assert sum(errors) / len(errors) == pytest.approx(0.0, abs=0.1)


def test_gaussian_estimate_ignores_directions_in_which_targets_do_not_vary():
    """Targets centred over D (as LayerNorm'd or per-patch normalised ones): the estimate is the
    closed form in the D - 1 dimensions left, whatever the prediction does along the mean."""
    d = 16
    centre = torch.eye(d, dtype=torch.float64) - 1 / d
    g = torch.Generator().manual_seed(0)
    sigma_s, sigma_n = random_covariance(d, 0.0, g), random_covariance(d, 0.3, g)
    basis = torch.linalg.svd(centre).U[:, : d - 1]  # orthonormal basis of the centred space
    signal = torch.randn(4096, d, generator=g, dtype=torch.float64)
    noise = torch.randn(4096, d, generator=g, dtype=torch.float64)
    signal = signal @ torch.linalg.cholesky(sigma_s).t() @ centre
    noise = noise @ torch.linalg.cholesky(sigma_n).t() @ centre
    target = (signal + noise).float()
    restricted = [basis.t() @ centre @ sigma @ centre @ basis for sigma in (sigma_s, sigma_n)]
    exact = 0.5 * (torch.logdet(restricted[0] + restricted[1]) - torch.logdet(restricted[1]))
    prediction = signal.float() + torch.randn(4096, 1, generator=g)  # noise along the mean
    assert gaussian(prediction, target).mi.item() == pytest.approx(exact.item(), rel=0.1)


@pytest.mark.parametrize("extra", [0, 1])
def test_gaussian_estimate_needs_more_tokens_than_positions_plus_dimensions(extra):
    d, grid = 8, 4
    g = torch.Generator().manual_seed(2)
    positions = torch.arange(d + grid + extra) % grid
    target = torch.randn(d + grid + extra, d, generator=g)
    mi = gaussian(torch.zeros_like(target), target, positions, grid).mi
    assert torch.isnan(mi) if extra == 0 else torch.isfinite(mi)


def test_gaussian_single_row_is_not_estimable():
    bound = gaussian(torch.ones(1, 4), torch.zeros(1, 4))
    assert bound.loss.item() == pytest.approx(1.0)
    assert torch.isnan(bound.mi)


def test_constant_targets_carry_no_information():
    target = torch.arange(4.0).expand(10, 4)  # the same vector in every row
    assert gaussian(torch.randn(10, 4), target).mi.item() == 0.0


@pytest.mark.parametrize("n", [1, 2, 3])
def test_normalised_l2_is_two_minus_two_cos(n):
    g = torch.Generator().manual_seed(n)
    prediction, target = torch.randn(n, 6, generator=g) * 3, torch.randn(n, 6, generator=g)
    cos = []
    for i in range(n):
        dot = sum(prediction[i, k] * target[i, k] for k in range(6))
        norm_p = math.sqrt(sum(prediction[i, k].item() ** 2 for k in range(6)))
        norm_t = math.sqrt(sum(target[i, k].item() ** 2 for k in range(6)))
        cos.append(dot.item() / (norm_p * norm_t))
    expected = sum(2 - 2 * c for c in cos) / n
    assert normalised_l2(prediction, target).loss.item() == pytest.approx(expected, rel=1e-5)


def test_normalised_l2_hand_cases():
    v = torch.tensor([[1.0, 2.0, 2.0]])
    assert normalised_l2(5 * v, v).loss.item() == pytest.approx(0.0, abs=1e-6)
    assert normalised_l2(-v, 2 * v).loss.item() == pytest.approx(4.0)
    orthogonal = normalised_l2(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]]))
    assert orthogonal.loss.item() == pytest.approx(2.0)
