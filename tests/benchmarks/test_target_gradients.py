"""benchmarks/target_gradients.py: each target's gradient into the backbone, checked against
properties that hold whatever the model: gradients add up, and scale with the weight."""

import importlib.util
from pathlib import Path

import pytest

from tests.tiny import TINY_M3I

ROOT = Path(__file__).resolve().parents[2]
SPEC = importlib.util.spec_from_file_location(
    "target_gradients", ROOT / "benchmarks" / "target_gradients.py"
)
target_gradients = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(target_gradients)

TINY = [*TINY_M3I, "model.img_size=16", "data.num_train=16", "data.image_size=16"]


def measure(extra: list[str]) -> dict:
    return target_gradients.target_gradients("m3i", TINY + extra, batch_size=4, seed=0)


def test_the_targets_gradients_add_up_to_the_total_losss():
    result = measure([])
    assert list(result["targets"]) == ["category", "text", "intra_view", "inter_view"]
    assert result["total_norm"] == pytest.approx(result["sum_norm"], rel=1e-5)
    shares = [row["share"] for row in result["targets"].values()]
    assert sum(shares) == pytest.approx(1.0)
    assert all(row["norm"] > 0 for row in result["targets"].values())


def test_a_targets_gradient_scales_with_its_weight_and_a_zero_weight_drops_it():
    base = measure([])["targets"]
    doubled = measure(["targets.category.weight=2"])["targets"]
    assert doubled["category"]["norm"] == pytest.approx(2 * base["category"]["norm"], rel=1e-5)
    assert doubled["text"]["norm"] == pytest.approx(base["text"]["norm"], rel=1e-5)
    without = measure(["targets.text.weight=0"])["targets"]
    assert "text" not in without
    assert without["category"]["norm"] == pytest.approx(base["category"]["norm"], rel=1e-5)


def test_with_two_targets_each_ones_cosine_to_the_rest_is_the_same():
    two = measure(["targets.intra_view.weight=0", "targets.inter_view.weight=0"])["targets"]
    assert list(two) == ["category", "text"]
    cosine = two["category"]["cosine_to_rest"]
    assert two["text"]["cosine_to_rest"] == pytest.approx(cosine, rel=1e-5)
    assert -1 <= cosine <= 1 and cosine != pytest.approx(0, abs=1e-6)
