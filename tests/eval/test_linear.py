"""Linear probe: standardisation with train statistics, and a sweep that finds a working lr."""

import numpy as np
import pytest
import torch

from m3i.eval.linear import linear_probe, standardise
from m3i.eval.settings import LinearSettings


def separable(n: int, num_classes: int = 4, dim: int = 16, seed: int = 0):
    """Gaussian blobs (std 1) around class means 12 apart along orthogonal axes, offset and
    scaled per feature so that standardisation matters."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    means = 12.0 * torch.eye(num_classes, dim)
    features = means[labels] + torch.randn(n, dim, generator=generator)
    scale = torch.linspace(0.1, 10.0, dim)
    return features * scale + 50.0, labels


def test_standardise_uses_train_statistics_only():
    generator = torch.Generator().manual_seed(0)
    train = torch.randn(200, 5, generator=generator) * torch.tensor([1.0, 2, 3, 4, 5]) + 7.0
    val = torch.randn(100, 5, generator=generator) * 3.0 - 4.0  # other mean and scale
    other = torch.randn(10, 5, generator=generator)
    out_train, out_val, out_other = standardise(train, val, other)
    assert out_train.mean(dim=0).abs().max() < 1e-5
    np.testing.assert_allclose(out_train.numpy().std(axis=0, ddof=1), 1.0, rtol=1e-5)
    mean, std = train.double().numpy().mean(axis=0), train.double().numpy().std(axis=0, ddof=1)
    np.testing.assert_allclose(out_val.numpy(), (val.double().numpy() - mean) / std, atol=1e-5)
    np.testing.assert_allclose(out_other.numpy(), (other.double().numpy() - mean) / std, atol=1e-5)
    # val is not standardised with its own statistics: its mean stays far from 0
    assert out_val.mean(dim=0).abs().min() > 1.0


def test_standardise_leaves_constant_features_finite():
    train = torch.ones(10, 3)
    (out,) = standardise(train)
    assert torch.isfinite(out).all() and (out == 0).all()


def test_linear_probe_separates_blobs():
    train, train_labels = separable(300, seed=0)
    val, val_labels = separable(100, seed=1)
    settings = LinearSettings(lrs=[1e-2, 3e-2], epochs=10, batch_size=64)
    result = linear_probe(train, train_labels, val, val_labels, 4, settings)
    assert result["top1"] >= 99.0
    assert result["top5"] == 100.0  # 4 classes
    assert result["lr"] in settings.lrs
    assert 0.0 <= result["holdout_top1"] <= 100.0


def test_linear_probe_picks_the_learning_rate_that_works():
    # lr 1e-9 leaves the random head as it is; the sweep must pick 0.1 even though 1e-9 comes
    # first (a tie would keep the first)
    train, train_labels = separable(300, seed=0)
    val, val_labels = separable(100, seed=1)
    settings = LinearSettings(lrs=[1e-9, 1e-1], epochs=3, batch_size=64, holdout=0.2)
    result = linear_probe(train, train_labels, val, val_labels, 4, settings)
    assert result["lr"] == pytest.approx(1e-1)
    assert result["holdout_top1"] == pytest.approx(100.0)
    assert result["top1"] >= 99.0


def test_the_learning_rate_is_chosen_without_the_val_split():
    """What the probe chooses (lr, and its held-out score) depends on train alone: val with
    its labels scrambled, or replaced by noise, changes the reported accuracy, not the choice."""
    train, train_labels = separable(300, seed=0)
    val, val_labels = separable(100, seed=1)
    settings = LinearSettings(lrs=[1e-4, 1e-2, 1e-1], epochs=2, batch_size=64, holdout=0.2)
    true = linear_probe(train, train_labels, val, val_labels, 4, settings)
    scrambled = linear_probe(train, train_labels, val, (val_labels + 1) % 4, 4, settings)
    noise = linear_probe(
        train, train_labels, torch.randn(100, val.shape[1]), val_labels, 4, settings
    )
    for other in (scrambled, noise):
        assert (other["lr"], other["holdout_top1"]) == (true["lr"], true["holdout_top1"])
        assert other["top1"] < true["top1"]  # val did reach the reported score


def test_the_held_out_score_is_of_samples_the_head_was_not_fit_on():
    """Random labels on 512-dim noise: a head fit on 150 points memorises them, so its score on
    the held-out 50 is chance (1 in 4) only if they were left out of its fit."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(200, 512, generator=generator)
    labels = torch.randint(0, 4, (200,), generator=generator)
    settings = LinearSettings(lrs=[1e-2], epochs=30, batch_size=50, holdout=0.25)
    result = linear_probe(features, labels, features[:8], labels[:8], 4, settings)
    assert result["top1"] == 100.0  # refit on all of train: memorised (val is 8 train points)
    assert result["holdout_top1"] < 45.0  # chance is 25%; memorised would be about 100%
