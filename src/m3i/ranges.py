"""The valid values of every config and eval-settings field, declared on the field itself.

A number's field declares its interval (`ranged`), a word's field its allowed values (`one_of`);
`value_problem` checks a whole nested dataclass against what its fields declare. A number
without a declared range must still be finite. ``None`` is always allowed where a field may be
None (it has its own meaning, e.g. "the whole split"). Relations between fields (a minimum below
its maximum) are checked where the config is validated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
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
CHOICES = "m3i.choices"  # ... and of the allowed values of a word


def ranged(default: Any, valid: Range) -> Any:
    """A dataclass field with its default and the range its numbers must lie in (a list
    default: each element)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={RANGE: valid})
    return field(default=default, metadata={RANGE: valid})


def one_of(default: str, choices: tuple[str, ...]) -> Any:
    """A dataclass field holding one of `choices`, `default` by default."""
    if default not in choices:
        raise ValueError(f"default {default!r} is not one of {choices}")
    return field(default=default, metadata={CHOICES: tuple(choices)})


def _declared(obj: Any, kind: str, prefix: str = "") -> dict[str, Any]:
    found = {}
    for f in fields(obj):
        key, value = f"{prefix}{f.name}", getattr(obj, f.name)
        if is_dataclass(value):
            found.update(_declared(value, kind, key + "."))
        elif kind in f.metadata:
            found[key] = f.metadata[kind]
    return found


def declared_ranges(obj: Any) -> dict[str, Range]:
    """The ranges that the fields of a nested config dataclass declare (`ranged`), by key."""
    return _declared(obj, RANGE)


def declared_choices(obj: Any) -> dict[str, tuple[str, ...]]:
    """The allowed values that the fields of a nested config dataclass declare (`one_of`)."""
    return _declared(obj, CHOICES)


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


def _value(obj: Any, key: str) -> Any:
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def value_problem(obj: Any) -> str | None:
    """A one-line message for the first value of a nested config dataclass outside what its
    field declares (a number without a declared range: not finite), or None if all are valid.
    Run it before any check that divides by one of them."""
    ranges = declared_ranges(obj)
    for key, values in numbers(obj):
        valid = ranges.get(key, Range())
        for value in values:
            if not valid.holds(value):
                what = valid.describe(isinstance(value, float)) if valid != Range() else "finite"
                return f"{key} must be {what}, got {value!r}"
    for key, choices in declared_choices(obj).items():
        value = _value(obj, key)
        if value not in choices:
            words = (
                f"{', '.join(choices[:-1])} or {choices[-1]}" if len(choices) > 1 else choices[0]
            )
            return f"{key} must be {words}, got {value!r}"
    return None
