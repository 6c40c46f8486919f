"""The target registry: a target's name -> its `TargetSpec`. Each target's module registers
itself on import (`m3i.mi.targets` imports the built-in ones); the config's `targets` section,
its checks, the run's data checks and the model's targets are all made from here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import torch

from m3i.mi.targets.base import RunContext, Target, TargetConfig


class TrainingData(Protocol):
    """What a run's training data (m3i.data.mixture.Mixture) tells the targets."""

    classes: list[str]

    def label_prior(self) -> torch.Tensor | None: ...

    def all_captions(self) -> list[str]: ...


class DataInfo:
    """What the training data offers the targets: its classes, the label prior as the data is
    drawn and its captions, each read once, on first use; `spec` names the data in messages."""

    def __init__(self, spec: str | list[str], data: TrainingData) -> None:
        self.spec = spec if isinstance(spec, str) else " + ".join(spec)
        self.data = data

    @property
    def classes(self) -> list[str]:
        return list(self.data.classes or [])

    @cached_property
    def label_prior(self) -> torch.Tensor | None:
        """(num_classes,) the labels' frequencies as the run draws them; None without any
        labelled sample."""
        return self.data.label_prior()

    @cached_property
    def captions(self) -> list[str]:
        """The non-empty captions of the training samples (a stream's: its scan's sample)."""
        return self.data.all_captions()


def no_config_problem(section: Any, cfg: Any) -> str | None:
    return None


def no_data_problem(section: Any, data: DataInfo) -> str | None:
    return None


def nothing_to_give(section: Any, data: DataInfo) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class TargetSpec:
    """A target as the rest of the package sees it.

    `target` is the class (its attributes say what it reads, `Target`), built as
    `target(section, run)`; `check_config(section, cfg)` and `check_data(section, data)` return
    a one-line problem or None; `prepare(section, data)` gives the `RunContext` fields that the
    target makes from the data (a tokenizer, a label prior); `save(target, run_dir)` writes what
    a later reader of the run needs besides the checkpoint."""

    name: str
    config: type[TargetConfig]
    target: type[Target]
    information: str  # what its `mi/<name>` figure is: "lower bound" or "estimate"
    check_config: Callable[[Any, Any], str | None] = no_config_problem
    check_data: Callable[[Any, DataInfo], str | None] = no_data_problem
    prepare: Callable[[Any, DataInfo], dict[str, Any]] = nothing_to_give
    save: Callable[[Any, Path], None] | None = field(default=None)


TARGETS: dict[str, TargetSpec] = {}


def register(spec: TargetSpec) -> TargetSpec:
    """Add a target to the registry (once per name)."""
    if spec.name in TARGETS:
        raise ValueError(f"target {spec.name!r} is registered twice; give the new one its own name")
    if spec.information not in ("lower bound", "estimate"):
        raise ValueError(
            f"target {spec.name!r}: information must be 'lower bound' or 'estimate', "
            f"got {spec.information!r}"
        )
    TARGETS[spec.name] = spec
    return spec


def information() -> dict[str, str]:
    """What each registered target's `mi/<name>` figure is (docs/information.md): a lower
    bound on the mutual information (Boltzmann family) or a Gaussian-channel estimate of it."""
    return {name: spec.information for name, spec in TARGETS.items()}


def build_targets(active: dict[str, Any], run: RunContext) -> dict[str, Target]:
    """The targets of the active config sections (weight != 0), by name."""
    return {name: TARGETS[name].target(section, run) for name, section in active.items()}
