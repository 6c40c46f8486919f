"""The Gaussian estimate on tokens that share their image: benchmarks/information_bias.py's
`clustered_tokens`, y = mu_position + g_image + A x + noise (64 images x 64 positions, D = 192,
g of rank r), with the Bayes-optimal predictor and the exact information from the
covariances; "signal": the predictor knows g, "error": it does not."""

import math
import sys
from pathlib import Path

import pytest
import torch

from m3i.mi.gaussian_channel import gaussian_information

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
from information_bias import clustered_tokens  # noqa: E402


def biases(rank: int, scale: float, shared: str, draws: int) -> tuple[float, float, float]:
    """Mean over draws of (plain - exact, jackknife - exact, jackknife standard error)."""
    rows = []
    for seed in range(draws):
        t = clustered_tokens(64, rank, scale, shared, seed)
        plain, _ = gaussian_information(t["optimal"], t["target"], t["positions"], 64)
        jack, se = gaussian_information(t["optimal"], t["target"], t["positions"], 64, t["images"])
        rows.append([plain.item() - t["exact"], jack.item() - t["exact"], se.item()])
    return tuple(torch.tensor(rows).mean(0).tolist())


@pytest.mark.parametrize(
    "rank, scale, shared, plain_bias, jackknife_bias",
    [
        (16, 1.0, "signal", -0.2, -0.1),
        (32, 3.0, "signal", -3.1, 0.4),
        (64, 3.0, "signal", -12.5, 1.0),
        (16, 1.0, "error", 0.2, -0.1),
        (32, 3.0, "error", 0.9, -0.4),
        (64, 3.0, "error", 4.5, -2.6),
    ],
)
def test_bias_on_tokens_that_share_their_image(rank, scale, shared, plain_bias, jackknife_bias):
    """The plain (Wishart-corrected) estimate treats the 4,096 tokens as independent: low when
    the image's content is signal, high when it is error. The jackknife over images removes
    most of it: all but ~1 nat of -12.5 (signal, rank 64), half of +4.5 with the sign turned
    (error, rank 64); the values docs/information.md states, mean of 3 draws."""
    plain, jack, _ = biases(rank, scale, shared, draws=3)
    assert plain == pytest.approx(plain_bias, abs=0.35)
    assert jack == pytest.approx(jackknife_bias, abs=0.35)


def test_the_jackknife_removes_no_bias_that_is_not_there():
    """Independent tokens (no image content): plain and jackknife both within their noise of
    exact, the jackknife's standard error that noise (against the spread over 12 draws)."""
    errors, ses = [], []
    for sample in range(12):
        t = clustered_tokens(64, 1, 0.0, "signal", seed=0, sample_seed=100 + sample)
        jack, se = gaussian_information(t["optimal"], t["target"], t["positions"], 64, t["images"])
        errors.append(jack.item() - t["exact"])
        ses.append(se.item())
    errors = torch.tensor(errors)
    assert errors.mean().item() == pytest.approx(0.0, abs=0.1)
    assert sum(ses) / len(ses) == pytest.approx(errors.std().item(), rel=0.5)


def test_the_standard_error_follows_the_spread_over_draws_of_clustered_tokens():
    """Signal shared at rank 32: the same covariances, 12 samples; the mean jackknife standard
    error against the standard deviation of the 12 jackknifed figures."""
    figures, ses = [], []
    for sample in range(12):
        t = clustered_tokens(64, 32, 3.0, "signal", seed=0, sample_seed=200 + sample)
        jack, se = gaussian_information(t["optimal"], t["target"], t["positions"], 64, t["images"])
        figures.append(jack.item())
        ses.append(se.item())
    spread = torch.tensor(figures).std().item()
    assert sum(ses) / len(ses) == pytest.approx(spread, rel=0.5)


def leave_out(tensor: torch.Tensor, image: torch.Tensor, drop: int) -> torch.Tensor:
    return tensor[image != drop]


@pytest.mark.parametrize("seed", [0, 1])
def test_jackknife_equals_recomputing_with_each_image_left_out(seed):
    """The downdated scatters against the definition: the plain estimate recomputed without
    each image in turn. Uneven images (3 to 12 tokens), ids not contiguous, one position held
    by a single image, two tokens of one image at one position."""
    g = torch.Generator().manual_seed(seed)
    sizes = [3, 12, 7, 9, 5, 11, 8, 10, 6, 12]
    image = torch.cat([torch.full((s,), 10 * i + 3) for i, s in enumerate(sizes)])
    positions = torch.randint(0, 6, (len(image),), generator=g)
    positions[0], positions[1] = 6, 1  # position 6: only image 3's first token
    positions[2] = 1  # image 3 twice at position 1
    d = 5
    target = torch.randn(len(image), d, generator=g, dtype=torch.float64)
    target += torch.randn(10, d, generator=g, dtype=torch.float64).repeat_interleave(
        torch.tensor(sizes), 0
    )
    prediction = 0.6 * target + 0.5 * torch.randn(len(image), d, generator=g, dtype=torch.float64)
    full, _ = gaussian_information(prediction, target, positions, 7)
    ids = image.unique()
    loo = torch.tensor(
        [
            gaussian_information(
                leave_out(prediction, image, i),
                leave_out(target, image, i),
                leave_out(positions, image, i),
                7,
            )[0].item()
            for i in ids
        ],
        dtype=torch.float64,
    )
    n = len(ids)
    expected = n * full.item() - (n - 1) * loo.mean().item()
    expected_se = math.sqrt((n - 1) / n * (loo - loo.mean()).pow(2).sum().item())
    jack, se = gaussian_information(prediction, target, positions, 7, image)
    assert jack.item() == pytest.approx(expected, abs=1e-4)
    assert se.item() == pytest.approx(expected_se, rel=1e-4)


def test_one_image_has_no_jackknife():
    target = torch.randn(40, 3, dtype=torch.float64)
    jack, se = gaussian_information(0.5 * target, target, images=torch.zeros(40, dtype=torch.long))
    assert math.isnan(jack.item()) and math.isnan(se.item())
    plain, no_se = gaussian_information(0.5 * target, target)
    assert math.isfinite(plain.item()) and math.isnan(no_se.item())


def test_chunks_of_images_give_the_same_jackknife(monkeypatch):
    """The leave-one-out scatters come in chunks of images to bound memory (D x D each): chunks
    of 3 images (the last one short) give the one-chunk figures."""
    import m3i.mi.gaussian_channel as channel

    t = clustered_tokens(10, 8, 3.0, "signal", seed=1)
    args = (t["optimal"][..., :24], t["target"][..., :24], t["positions"], 64, t["images"])
    whole = channel.gaussian_information(*args)
    monkeypatch.setattr(channel, "CHUNK_BYTES", 3 * 8 * 24 * 24)
    chunked = channel.gaussian_information(*args)
    assert all(math.isfinite(v.item()) for v in whole)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)


def test_layer_normed_float32_tokens_on_two_threads():
    """The default run's intra_view shape: 64 images x 32 of 64 positions, LayerNorm'd float32
    targets (rank 191 of 192: one direction left out). On 2 threads MKL's batched LU of the
    leave-one-out scatters failed ("Parameter 6 was incorrect on entry to DLASWP") and the
    logged figure was NaN; the figure must be finite and the same as on 1 thread."""
    g = torch.Generator().manual_seed(0)
    positions = torch.rand(64, 64, generator=g).argsort(1)[:, :32]
    signal = torch.randn(64, 32, 192, generator=g)
    target = torch.nn.functional.layer_norm(signal + torch.randn(64, 32, 192, generator=g), (192,))
    prediction = torch.nn.functional.layer_norm(signal, (192,))
    images = torch.arange(64)[:, None].expand(64, 32)
    threads = torch.get_num_threads()
    figures = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            figures.append(gaussian_information(prediction, target, positions, 64, images))
    finally:
        torch.set_num_threads(threads)
    assert all(math.isfinite(v.item()) for v in figures[1])
    torch.testing.assert_close(figures[1], figures[0])
