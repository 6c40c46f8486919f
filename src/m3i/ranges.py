"""The valid values of every number in the config and the eval settings, checked up-front.

A field may declare its range where it is defined (`ranged`, as every target's config does);
otherwise a key's range is found in a table by its full dotted name, else by a pattern. ``None``
is always allowed where a field may be None (it has its own meaning, e.g. "the whole split").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from fnmatch import fnmatchcase
from typing import Any, get_args, get_origin, get_type_hints


@dataclass(frozen=True)
class Range:
    """An interval of finite numbers; a None end is unbounded."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself excluded
    high_open: bool = False
    note: str = ""  # what a special value means, e.g. "0: off"

    def holds(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self, finite: bool = False) -> str:
        """`> 0`, `in [0, 1)`, ... (`and finite` for floats), then what a special value means."""
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            text = f"in {left}{self.low:g}, {self.high:g}{right}"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {self.low:g}"
        else:
            text = f"{'<' if self.high_open else '<='} {self.high:g}"
        text += " and finite" if finite and (self.low is None or self.high is None) else ""
        return f"{text} ({self.note})" if self.note else text


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
PROBABILITY = Range(0, 1)
FRACTION = Range(0, 1, low_open=True)  # a share that cannot be empty
COUNT = Range(1)

RANGE = "m3i.range"  # the field metadata key of a declared range


def ranged(default: Any, valid: Range) -> Any:
    """A dataclass field with its default and the range its numbers must lie in."""
    return field(default=default, metadata={RANGE: valid})


def declared_ranges(obj: Any, prefix: str = "") -> dict[str, Range]:
    """The ranges that the fields of a nested config dataclass declare (`ranged`), by key."""
    found = {}
    for f in fields(obj):
        key, value = f"{prefix}{f.name}", getattr(obj, f.name)
        if is_dataclass(value):
            found.update(declared_ranges(value, key + "."))
        elif RANGE in f.metadata:
            found[key] = f.metadata[RANGE]
    return found


CONFIG_RANGES: dict[str, Range] = {
    "model.img_size": COUNT,
    "model.patch_size": COUNT,
    "model.depth": Range(1, note="null: the timm model's own"),
    "model.drop_path": Range(0, 1, high_open=True),
    "views.scale_min": FRACTION,
    "views.scale_max": FRACTION,
    "views.flip": PROBABILITY,
    "views.color_jitter": NON_NEGATIVE,
    "views.hue": Range(0, 0.5),
    "views.grayscale": PROBABILITY,
    "mix.ratio": FRACTION,
    "teacher.momentum": PROBABILITY,
    "teacher.momentum_final": PROBABILITY,
    "decoder.dim": Range(4),
    "decoder.depth": COUNT,  # without a block no query sees the encoder tokens
    "decoder.heads": COUNT,
    "data.num_train": Range(1, note="null: the whole train split"),
    "data.image_size": COUNT,  # `shapes` itself asks for 16 or more
    "data.seed": NON_NEGATIVE,
    "data.workers": NON_NEGATIVE,
    "data.weights": POSITIVE,
    "data.max_corrupt_fraction": Range(0, 1, high_open=True),  # 1: all unreadable, no sample
    "data.scan_samples": COUNT,
    "train.steps": NON_NEGATIVE,
    "train.batch_size": COUNT,
    "train.lr": POSITIVE,
    "train.min_lr": NON_NEGATIVE,
    "train.weight_decay": NON_NEGATIVE,
    "train.warmup_steps": NON_NEGATIVE,
    "train.grad_clip": Range(0, note="0: no clipping"),
    "train.log_every": COUNT,
    "train.checkpoint_every": COUNT,
    "train.seed": NON_NEGATIVE,
    "train.max_bad_steps": COUNT,
    "train.first_batch": Range(0, note="the global batch a stage's first step reads"),
    "stage_steps": NON_NEGATIVE,
    "train.keep_checkpoints": COUNT,
    "train.accum_steps": COUNT,
    "train.dist_timeout": COUNT,
    "monitor.every": Range(0, note="0: no monitors"),
    "monitor.knn_train": COUNT,
    "monitor.knn_val": COUNT,
    "monitor.final_eval_num_train": COUNT,
    "monitor.final_eval_num_val": COUNT,
}


def range_of(key: str, ranges: dict[str, Range]) -> Range | None:
    """The range of a dotted key: its own entry, else the first pattern that matches it."""
    if key in ranges:
        return ranges[key]
    return next((r for pattern, r in ranges.items() if fnmatchcase(key, pattern)), None)


def numbers(obj: Any, prefix: str = "") -> list[tuple[str, list[float]]]:
    """(dotted key, its numbers) for every int or float field of a nested config dataclass: a
    list field gives its elements, a None gives none; bool and str fields are left out."""
    found = []
    hints = get_type_hints(type(obj))
    for f in fields(obj):
        key, value, hint = f"{prefix}{f.name}", getattr(obj, f.name), hints[f.name]
        if is_dataclass(value):
            found += numbers(value, key + ".")
            continue
        kinds = {hint, *get_args(hint)}
        if get_origin(hint) is list:
            kinds.add(get_args(hint)[0])
        if kinds & {int, float}:
            values = value if isinstance(value, list) else [value]
            found.append((key, [v for v in values if v is not None]))
    return found


def out_of_range(obj: Any, ranges: dict[str, Range]) -> str | None:
    """A one-line message for the first number outside its range, declared by its field or
    else found in `ranges` (a number without a range must still be finite), or None if all are
    valid."""
    ranges = {**declared_ranges(obj), **ranges}
    for key, values in numbers(obj):
        valid = range_of(key, ranges) or Range()
        for value in values:
            if not valid.holds(value):
                what = valid.describe(isinstance(value, float)) if valid != Range() else "finite"
                return f"{key} must be {what}, got {value!r}"
    return None


def config_value_problem(cfg: Any) -> str | None:
    """The first number of a config out of its range (declared, or in CONFIG_RANGES) or not
    fitting the numbers it goes with (`cfg`: an m3i.config.Config, which imports this module),
    as a one-line message; None if there is none. Run before any check that divides by one of
    them (a target's own relations are its spec's check_config)."""
    problem = out_of_range(cfg, CONFIG_RANGES)
    if problem:
        return problem
    relations = [
        (
            cfg.views.scale_min <= cfg.views.scale_max,
            f"views.scale_min ({cfg.views.scale_min}) must be <= views.scale_max "
            f"({cfg.views.scale_max})",
        ),
        (
            cfg.train.min_lr <= cfg.train.lr,
            f"train.min_lr ({cfg.train.min_lr}) must be <= train.lr ({cfg.train.lr}): the "
            "schedule warms up from min_lr to lr and decays back",
        ),
    ]
    return next((message for ok, message in relations if not ok), None)
