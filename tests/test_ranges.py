"""Every number and every word with a fixed set of values, of the config and of the eval
settings, declares what is valid on its own field; load_config refuses anything else."""

import math
from dataclasses import dataclass

import pytest

from m3i.config import Config, ConfigError, load_config
from m3i.eval.settings import EvalSettings, load_settings
from m3i.ranges import (
    Range,
    declared_choices,
    declared_ranges,
    numbers,
    one_of,
    ranged,
    value_problem,
)


@pytest.mark.parametrize("schema", [Config, EvalSettings])
def test_every_number_declares_its_range_and_the_defaults_are_in_it(schema):
    keys = [key for key, _ in numbers(schema())]
    assert "train.lr" in keys or "knn.k" in keys
    assert [key for key in keys if key not in declared_ranges(schema())] == []
    assert value_problem(schema()) is None


def test_the_words_with_fixed_values_declare_them():
    assert declared_choices(Config()) == {
        "model.attention": ("separate", "packed"),
        "mix.masking": ("random", "block", "inverse_block"),
        "teacher.schedule": ("cosine", "linear"),
        "decoder.norm": ("layer", "batch"),
        "train.device": ("auto", "cpu", "cuda"),
        "train.precision": ("fp32", "bf16", "fp16"),
        "train.strategy": ("ddp", "fsdp"),
        "targets.category.head": ("mlp", "linear"),
        "targets.text.head": ("mlp", "linear"),
        "targets.text.tower": ("scratch", "minilm", "open_clip"),
        "targets.intra_view.norm": ("layer", "instance"),
        "targets.inter_view.norm": ("layer", "instance"),
        "targets.view_contrast.pool": ("mean", "cls"),
        "targets.view_regress.pool": ("mean", "cls"),
    }
    assert declared_choices(EvalSettings()) == {"device": ("auto", "cpu", "cuda")}


@pytest.mark.parametrize("key", sorted(declared_choices(Config())))
def test_a_word_outside_its_choices_is_refused_naming_the_key(key):
    with pytest.raises(ConfigError) as caught:
        load_config("m3i", overrides=[f"{key}=nonsense"])
    assert str(caught.value).startswith(f"{key} must be ")
    assert str(caught.value).endswith("got 'nonsense'")


def test_relations_between_fields_are_checked_after_the_ranges():
    with pytest.raises(ConfigError, match=r"views.scale_min \(0.9\) must be <= views.scale_max"):
        load_config("m3i", overrides=["views.scale_min=0.9", "views.scale_max=0.5"])
    with pytest.raises(ConfigError, match=r"train.min_lr \(0.1\) must be <= train.lr"):
        load_config("m3i", overrides=["train.min_lr=0.1"])
    with pytest.raises(ConfigError, match=r"finetune.min_lr \(0.1\) must be <= finetune.lr"):
        load_settings(["finetune.min_lr=0.1"])
    with pytest.raises(ConfigError, match="^device must be auto, cpu or cuda, got 'tpu'$"):
        load_settings(["device=tpu"])


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


@dataclass
class Unranged:
    ratio: float = 0.5
    count: int = -3


@dataclass
class Declared:
    share: float = ranged(0.5, Range(0, 1))
    shares: list[float] = ranged([0.5], Range(0, 1, low_open=True))
    kind: str = one_of("a", ("a", "b"))


def test_a_declared_range_and_choice_are_checked():
    assert value_problem(Declared()) is None
    assert value_problem(Declared(share=2.0)) == "share must be in [0, 1], got 2.0"
    assert value_problem(Declared(shares=[0.5, 0.0])) == "shares must be in (0, 1], got 0.0"
    assert value_problem(Declared(kind="c")) == "kind must be a or b, got 'c'"
    assert Declared().shares is not Declared().shares  # a list default is not shared


def test_a_number_without_a_range_must_still_be_finite():
    assert value_problem(Unranged()) is None  # any finite value, even -3
    assert value_problem(Unranged(ratio=math.inf)) == "ratio must be finite, got inf"


def test_a_default_outside_its_choices_is_a_programming_error():
    with pytest.raises(ValueError, match="default 'c' is not one of"):
        one_of("c", ("a", "b"))


def outside(valid: Range, example: float) -> list[float]:
    """Numbers just outside each end of `valid`, of the type of `example`."""
    step = 1 if isinstance(example, int) else 0.5
    values = []
    if valid.low is not None:
        values.append(valid.low if valid.low_open else valid.low - step)
    if valid.high is not None:
        values.append(valid.high if valid.high_open else valid.high + step)
    return [int(v) if isinstance(example, int) else float(v) for v in values]


def bounded_keys(schema: type) -> list[tuple[str, float, bool]]:
    """(key, a number just outside one end of its range, whether the key holds a list) for
    every end of every number's range in the config (`schema`: Config or EvalSettings)."""
    cfg = schema()
    ranges = declared_ranges(cfg)
    found = []
    for key, values in numbers(cfg):
        valid = ranges[key]
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        example = values[0] if values else (1.0 if "weights" in key else 1)
        found += [(key, value, isinstance(node, list)) for value in outside(valid, example)]
    return found


@pytest.mark.parametrize(
    ("schema", "load", "least"),
    [
        (Config, lambda text: load_config("m3i", overrides=[text]), 80),
        (EvalSettings, lambda text: load_settings([text]), 40),
    ],
)
def test_every_bounded_number_is_refused_outside_its_range(schema, load, least):
    """Not only the keys a test names: each number, set just outside either end of its range
    with --set, is refused with a line naming that key."""
    keys = bounded_keys(schema)
    assert len(keys) >= least  # every section's numbers, the targets' included, both ends
    for key, value, is_list in keys:
        text = f"{key}=[{value}]" if is_list else f"{key}={value}"
        with pytest.raises(ConfigError) as caught:
            load(text)
        assert str(caught.value).startswith(f"{key} must be"), (text, str(caught.value))


def test_the_bounded_keys_reach_both_ends_of_a_range():
    keys = bounded_keys(Config)
    assert ("views.flip", 1.5, False) in keys and ("views.flip", -0.5, False) in keys
    assert ("mix.ratio", 0.0, False) in keys and ("mix.ratio", 1.5, False) in keys
    assert ("data.weights", 0.0, True) in keys
