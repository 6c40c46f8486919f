"""Every number of the config and of the eval settings has a declared range."""

import math
from dataclasses import dataclass

import pytest

from m3i.config import Config
from m3i.eval.settings import EVAL_RANGES, EvalSettings
from m3i.ranges import (
    CONFIG_RANGES,
    Range,
    declared_ranges,
    numbers,
    out_of_range,
    range_of,
    ranged,
)


@pytest.mark.parametrize(
    ("schema", "ranges"), [(Config, CONFIG_RANGES), (EvalSettings, EVAL_RANGES)]
)
def test_every_number_has_a_range_and_the_defaults_are_in_it(schema, ranges):
    keys = [key for key, _ in numbers(schema())]
    assert "train.lr" in keys or "knn.k" in keys
    ranges = {**declared_ranges(schema()), **ranges}  # a field's own range, else the table's
    assert [key for key in keys if range_of(key, ranges) is None] == []
    assert out_of_range(schema(), ranges) is None


def test_numbers_walks_nested_optional_and_list_fields():
    found = dict(numbers(EvalSettings()))
    assert found["num_train"] == []  # None: nothing to check
    assert found["linear.lrs"] == [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
    assert found["knn.k"] == [20]
    assert "device" not in found and "zeroshot.templates" not in found  # strings
    assert "mix.isolate" not in dict(numbers(Config()))  # bools


@pytest.mark.parametrize(
    ("valid", "inside", "outside", "text"),
    [
        (Range(0, low_open=True), [1e-300, 5.0], [0.0, -1.0, math.inf, math.nan], "> 0"),
        (Range(0, note="0: off"), [0, 0.0, 7], [-1e-9, math.inf], ">= 0 (0: off)"),
        (Range(0, 1, high_open=True), [0.0, 0.999], [1.0, -0.1, math.nan], "in [0, 1)"),
        (Range(0, 1, low_open=True), [1.0, 0.5], [0.0, 1.5], "in (0, 1]"),
        (Range(high=2, high_open=True), [-5, 1.9], [2, math.inf], "< 2"),
    ],
)
def test_range_bounds_and_wording(valid, inside, outside, text):
    assert all(valid.holds(value) for value in inside)
    assert not any(valid.holds(value) for value in outside)
    assert valid.describe() == text


def test_a_targets_fields_declare_their_ranges_where_its_config_is():
    declared = declared_ranges(Config())
    assert declared["targets.category.weight"] == Range(0, note="0: off")  # TargetConfig's
    assert declared["targets.view_contrast.temperature"].describe() == "> 0"
    assert declared["targets.text.depth"] == Range(0, note="0: the mean of the token embeddings")
    assert not any(key.startswith("targets.") for key in CONFIG_RANGES)  # none in the table
    assert range_of("train.some_new_number", CONFIG_RANGES) is None


@dataclass
class Unranged:
    ratio: float = 0.5
    count: int = -3


@dataclass
class Declared:
    share: float = ranged(0.5, Range(0, 1))


def test_a_declared_range_is_checked_and_a_table_entry_overrides_it():
    assert out_of_range(Declared(share=2.0), {}) == "share must be in [0, 1], got 2.0"
    assert out_of_range(Declared(share=2.0), {"share": Range(0, 3)}) is None


def test_a_number_without_a_range_must_still_be_finite():
    assert out_of_range(Unranged(), {}) is None  # any finite value
    assert out_of_range(Unranged(ratio=math.inf), {}) == "ratio must be finite, got inf"
    assert out_of_range(Unranged(), {"count": Range(1)}) == "count must be >= 1, got -3"


def outside(valid: Range, example: float) -> list[float]:
    """Numbers just outside each end of `valid`, of the type of `example`."""
    step = 1 if isinstance(example, int) else 0.5
    values = []
    if valid.low is not None:
        values.append(valid.low if valid.low_open else valid.low - step)
    if valid.high is not None:
        values.append(valid.high if valid.high_open else valid.high + step)
    return [int(v) if isinstance(example, int) else float(v) for v in values]


def bounded_keys() -> list[tuple[str, float, bool]]:
    """(key, a number just outside one end of its range, whether the key holds a list) for
    every end of every number's range in the config."""
    cfg = Config()
    ranges = {**declared_ranges(cfg), **CONFIG_RANGES}
    found = []
    for key, values in numbers(cfg):
        valid = range_of(key, ranges)
        if valid is None:
            continue
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        example = values[0] if values else (1.0 if "weights" in key else 1)
        found += [(key, value, isinstance(node, list)) for value in outside(valid, example)]
    return found


def test_every_bounded_number_of_the_config_is_refused_outside_its_range():
    """Not only the keys a test names: each number, set just outside either end of its range
    with --set, is refused by load_config with a line naming that key."""
    from m3i.config import ConfigError, load_config

    keys = bounded_keys()
    assert len(keys) >= 80  # every section's numbers, the targets' included, both ends
    assert ("views.flip", 1.5, False) in keys and ("mix.ratio", 1.5, False) in keys
    for key, value, is_list in keys:
        text = f"{key}=[{value}]" if is_list else f"{key}={value}"
        with pytest.raises(ConfigError) as caught:
            load_config("m3i", overrides=[text])
        assert str(caught.value).startswith(f"{key} must be"), (text, str(caught.value))
