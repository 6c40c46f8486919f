"""Mixtures of sources: one run's data drawn from several specs at set weights.

A run's `data.spec` is one spec or a list of them; `data.weights` gives each source's share of
the samples drawn (default: indexable sources in proportion to their sizes; a mixture with a
`wds:` stream, equal shares). Each sample keeps the modalities its source has (a label, a
caption, or neither), so each target learns from the samples that carry its own.

Classes of several labelled sources combine by name (:func:`merge_classes`): sources with the
same class list share it; otherwise the mixture's classes are the union of the names, in the
order the sources were given (each source's own order, new names appended). A source whose
classes are only numbers (a `captions:` file's labels) has no names to match, so it mixes with
another labelled source only when both have the same class list.

The label prior (H(Y) of the category target) is the labels' distribution as the mixture draws
them: source k's class frequencies weighted by its share (:meth:`Mixture.label_prior`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from m3i.data.base import DataError, SourceScan
from m3i.data.scan import Source
from m3i.data.webdataset import WebDatasetStream


@dataclass(frozen=True)
class ClassMerge:
    """The mixture's classes and, per source, the mixture class of each of its own classes
    (None for a source without classes)."""

    classes: list[str]
    maps: list[list[int] | None]


def merge_classes(sources: Sequence[Source]) -> ClassMerge:
    """Combine the class lists of the labelled sources (module docstring); DataError for two
    numbered class lists that differ, or a numbered one beside a named one."""
    labelled = [s for s in sources if s.classes]
    if not labelled:
        return ClassMerge([], [None] * len(sources))
    first = list(labelled[0].classes)
    if all(list(s.classes) == first for s in labelled):
        return ClassMerge(first, [list(range(len(first))) if s.classes else None for s in sources])
    numbered = next((s for s in labelled if getattr(s, "numbered_classes", False)), None)
    if numbered is not None:
        other = next(s for s in labelled if s is not numbered)
        raise DataError(
            f"data {numbered.name!r} numbers its classes 0..{len(numbered.classes) - 1} and "
            f"{other.name!r} has other classes ({len(other.classes)}): numbers are no names "
            "to match classes by; give both the same class list, or mix only one labelled source"
        )
    index: dict[str, int] = {}  # class name -> mixture class, in order of first appearance
    for source in labelled:
        for name in source.classes:
            index.setdefault(name, len(index))
    maps = [[index[name] for name in s.classes] if s.classes else None for s in sources]
    return ClassMerge(list(index), maps)


def mixture_weights(sources: Sequence[Source], weights: Sequence[float]) -> list[float]:
    """Each source's share of the samples drawn: `weights` normalised, or by default the
    sources' sizes (all indexable) or equal shares (any stream); DataError for a wrong count."""
    if len(sources) == 1 and not weights:
        return [1.0]
    if weights:
        if len(weights) != len(sources):
            raise DataError(
                f"data.weights has {len(weights)} weights for {len(sources)} data sources; give "
                "one weight per --data, in the same order"
            )
        shares = [float(w) for w in weights]
    elif any(isinstance(s, WebDatasetStream) for s in sources):
        shares = [1.0] * len(sources)
    else:
        shares = [float(len(s)) for s in sources]
    if not all(math.isfinite(w) and w > 0 for w in shares):
        raise DataError(f"data.weights must be finite and > 0, got {list(weights)}")
    total = sum(shares)
    return [w / total for w in shares]


class Mixture:
    """The sources of a run, their shares and their combined classes.

    `labels[k]` / `captions[k]` are what the run knows of source k's labels (every sample's,
    in the source's own class numbering; a stream's: those of its scan's bounded sample) and
    its non-empty captions, each read on first use."""

    def __init__(
        self,
        sources: Sequence[Source],
        weights: Sequence[float],
        scans: Sequence[SourceScan] | None = None,
    ) -> None:
        self.sources = list(sources)
        self.weights = mixture_weights(self.sources, weights)
        merge = merge_classes(self.sources)
        self.classes, self.label_maps = merge.classes, merge.maps
        self.scans = list(scans or [SourceScan() for _ in self.sources])

    @cached_property
    def labels(self) -> list[list[int]]:
        return [
            scan.labels if isinstance(source, WebDatasetStream) else source.labels()
            for source, scan in zip(self.sources, self.scans, strict=True)
        ]

    @cached_property
    def captions(self) -> list[list[str]]:
        return [
            scan.captions if isinstance(source, WebDatasetStream) else source.captions()
            for source, scan in zip(self.sources, self.scans, strict=True)
        ]

    @property
    def names(self) -> list[str]:
        return [source.name for source in self.sources]

    def label_prior(self) -> torch.Tensor | None:
        """P(y) of the labelled samples as the mixture draws them: sum_k w_k n_k(y) / N_k over
        the sources, normalised over the labelled ones (n_k(y): source k's samples of class y,
        N_k: all its samples, labelled or not); None when no source has a labelled sample."""
        prior = torch.zeros(len(self.classes), dtype=torch.float64)
        for weight, labels, mapping in zip(self.weights, self.labels, self.label_maps, strict=True):
            known = torch.tensor([label for label in labels if label >= 0], dtype=torch.long)
            if mapping is None or not len(labels) or not len(known):
                continue
            counts = torch.bincount(known, minlength=len(mapping)).double()
            prior.index_add_(0, torch.tensor(mapping), weight * counts / len(labels))
        return prior / prior.sum() if prior.sum() > 0 else None

    def all_captions(self) -> list[str]:
        """The non-empty captions that the run knows of, source by source."""
        return [caption for captions in self.captions for caption in captions]

    def describe(self) -> str:
        """One line: each source with its share, e.g. `folder:in (0.75), wds:cc (0.25)`."""
        return ", ".join(
            f"{name} ({weight:.3g})" for name, weight in zip(self.names, self.weights, strict=True)
        )
