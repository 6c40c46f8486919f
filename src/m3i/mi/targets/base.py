"""What every target is and reads: the step's shared pieces (`StepContext`), the run's
(`RunContext`), the `Target` module, and a target's result when it has no sample and as a mean
over parts.

A target reads what the step computed once for all of them and returns a `LossAndMI`: its loss
and its information figure in nats, a lower bound (Boltzmann family) or a Gaussian-channel estimate
(Gaussian family). Its class attributes say what it reads, so the step computes only that:

    stream       "a" | "b" | "pooled" (pooled features of every encoded image)
    queries      None | "masked" (A's hidden positions, same view) | "other_view" (B's v_B')
    teacher      None | "view1" | "view2" (dense EMA-teacher tokens, LayerNorm'd)
    teacher_layers  0 | K (also the MLP outputs of the teacher's last K blocks on that view)
    pooled_teacher  () | views, e.g. ("view1", "view2") (pooled EMA-teacher features)
    pooled_student  None | "view2" (the student's pooled features of the whole other view)
    pool         "mean" | "cls" (what the pooled features are: the mean of the image's tokens,
                 or its class token after the final norm, `class_token` and `*_class_token`)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import nn

from m3i.data.batch import Batch
from m3i.mi.posteriors import LossAndMI
from m3i.models.text import TextTokenizer
from m3i.ranges import Range, ranged


@dataclass
class TargetConfig:
    """The fields every target's config has; a target's config dataclass extends it."""

    weight: float = ranged(0.0, Range(0, note="0: off"))


@dataclass(frozen=True)
class RunContext:
    """What a target may need from the run: what the data gave (its specs' `prepare`) and the
    model's sizes (filled in by the model that builds the targets)."""

    encoder_dim: int = 0
    decoder_dim: int = 0
    # width of the dense teacher tokens (`teacher_dense`): 0 for encoder_dim, decoder_dim when
    # an EMA projector maps them (decoder.projector_depth, SiameseIM)
    dense_dim: int = 0
    patch_size: int = 0
    num_classes: int = 0
    label_prior: torch.Tensor | None = None  # (num_classes,) the training labels' frequencies
    tokenizer: Tokenizer | TextTokenizer | None = None  # the captions' tokenizer


@dataclass
class Stream:
    """One image role of the mixed input: its encoder tokens and where they sit."""

    tokens: torch.Tensor  # (N, L, D)
    positions: torch.Tensor  # (N, L) grid indices in the input view
    samples: torch.Tensor  # (N,) batch index of the image each row holds
    class_token: torch.Tensor | None = None  # (N, D) each image's own, when a target reads it

    @property
    def pooled(self) -> torch.Tensor:
        return self.tokens.mean(dim=1)


@dataclass
class StepContext:
    """Everything the step computed once for all the targets of one batch."""

    batch: Batch
    streams: dict[str, Stream]
    patch_size: int
    masked_positions: torch.Tensor | None = None  # (N, Q) view-1 positions image A did not see
    decoded: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_dense: dict[str, torch.Tensor] = field(default_factory=dict)  # in batch order
    teacher_pooled: dict[str, torch.Tensor] = field(default_factory=dict)  # in batch order
    # the MLP outputs of the teacher's last blocks, (N, P, D) each in block order, batch order
    teacher_layers: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    student_pooled: dict[str, torch.Tensor] = field(default_factory=dict)  # in batch order
    # the class tokens (N, D) of the same views, when a target pools with them (pool "cls")
    teacher_class_token: dict[str, torch.Tensor] = field(default_factory=dict)
    student_class_token: dict[str, torch.Tensor] = field(default_factory=dict)
    measure: bool = True  # compute the Gaussian estimates (they cost; NaN when False)


def no_samples(like: torch.Tensor) -> LossAndMI:
    """No sample carries this target in the batch: a zero loss that keeps the graph connected
    (no gradient), and no figure (NaN: the log writes null, and means over micro-batches and
    ranks leave it out rather than count a 0)."""
    return LossAndMI(like.sum() * 0.0, torch.full((), float("nan"), device=like.device))


def mean_loss_and_mi(bounds: list[LossAndMI]) -> LossAndMI:
    """The mean of results over parts (the two image streams of a mix, two directions): the
    parts read the same images (stream B holds stream A's images in reverse order), so the
    standard error of the mean, where every part has one, is taken as the mean standard error,
    its upper bound (sd(X + Y) <= sd X + sd Y)."""
    count = len(bounds)
    errors = [b.se for b in bounds]
    se = None if None in errors else sum(errors) / count
    return LossAndMI(sum(b.loss for b in bounds) / count, sum(b.mi for b in bounds) / count, se)


def row_images(positions: torch.Tensor) -> torch.Tensor:
    """(N, Q) per-row queries -> (N, Q) the image of each: every row holds one image."""
    rows = torch.arange(positions.shape[0], device=positions.device)
    return rows[:, None].expand_as(positions)


class Target(nn.Module):
    """A target: source + target encoder + head + posterior + weight."""

    stream: str = "pooled"
    queries: str | None = None
    teacher: str | None = None
    teacher_layers: int = 0
    pooled_teacher: tuple[str, ...] = ()
    pooled_student: str | None = None
    pool: str = "mean"

    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, ctx: StepContext) -> LossAndMI:
        raise NotImplementedError

    def momentum_update(self, momentum: float) -> None:
        """Update this target's own EMA heads, if it has any."""

    def after_optimizer_step(self) -> None:
        """Project this target's parameters back into their allowed range, if it has any."""


_RENAMED = {"mean_bound": "mean_loss_and_mi", "zero_bound": "no_samples"}


def __getattr__(name: str) -> Any:
    """The old names of renamed helpers, with a DeprecationWarning (docs/migration.md)."""
    if name in _RENAMED:
        warnings.warn(
            f"m3i.mi.targets.base.{name} is now {_RENAMED[name]}",
            DeprecationWarning,
            stacklevel=2,
        )
        return globals()[_RENAMED[name]]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
