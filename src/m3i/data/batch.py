"""The training batch: typed, collated from view items by the DataLoader, moved and split whole.

A view item (:func:`m3i.data.views.view_item`) is one sample's dict; `collate` stacks a list of
them into a :class:`Batch`, the one object the data gives the step, its targets and the loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class View:
    """One augmented view of every sample of a batch and where it came from."""

    image: torch.Tensor  # (N, 3, H, W) normalised
    box: torch.Tensor  # (N, 4) float32 (top, left, height, width) as fractions of the image
    flip: torch.Tensor  # (N,) bool, whether the view was flipped horizontally

    def to(self, device: torch.device) -> View:
        return View(*(x.to(device, non_blocking=True) for x in (self.image, self.box, self.flip)))

    def rows(self, rows: slice) -> View:
        return View(self.image[rows], self.box[rows], self.flip[rows])


@dataclass
class Batch:
    """N samples: their views (view 1 first), labels (-1: none), captions ("" if none), their
    indices in their source and which source of the run's mixture each came from; labels,
    captions, indices and sources are None where nothing made them. `skipped` counts the
    unreadable samples passed over to make the batch."""

    views: list[View]
    labels: torch.Tensor | None = None  # (N,) int64
    captions: list[str] | None = None
    indices: torch.Tensor | None = None  # (N,) int64
    sources: torch.Tensor | None = None  # (N,) int64, 0.. in the order the sources were given
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.views[0].image)

    def view(self, name: str) -> View:
        """A view by the name the targets give it: "view1", "view2", ..."""
        names = [f"view{number}" for number in range(1, len(self.views) + 1)]
        if name not in names:
            raise KeyError(f"the batch has no view {name!r}; it has {', '.join(names)}")
        return self.views[names.index(name)]

    def to(self, device: torch.device) -> Batch:
        """The batch on `device` (captions stay a list of strings)."""
        labels, indices, sources = (
            None if x is None else x.to(device, non_blocking=True)
            for x in (self.labels, self.indices, self.sources)
        )
        views = [view.to(device) for view in self.views]
        return Batch(views, labels, self.captions, indices, sources, self.skipped)

    def rows(self, rows: slice) -> Batch:
        """The samples `rows` of the batch (`skipped` stays with the first rows)."""
        labels, captions, indices, sources = (
            None if x is None else x[rows]
            for x in (self.labels, self.captions, self.indices, self.sources)
        )
        skipped = self.skipped if rows.start in (None, 0) else 0
        views = [view.rows(rows) for view in self.views]
        return Batch(views, labels, captions, indices, sources, skipped)

    def split(self, parts: int) -> list[Batch]:
        """`parts` equal consecutive slices (gradient accumulation's micro-batches)."""
        size = len(self) // parts
        return [self.rows(slice(i * size, (i + 1) * size)) for i in range(parts)]


def collate(items: Sequence[dict[str, torch.Tensor | str]]) -> Batch:
    """The DataLoader's collate_fn: view items (view1, box1, flip1, view2, ..., label, caption,
    index, source, skipped) stacked into a Batch."""
    first = items[0]

    def stack(key: str) -> torch.Tensor | None:
        return torch.stack([item[key] for item in items]) if key in first else None

    count = sum(1 for key in first if key.startswith("view"))
    views = [
        View(*(stack(f"{k}{n}") for k in ("view", "box", "flip"))) for n in range(1, count + 1)
    ]
    captions = [item["caption"] for item in items] if "caption" in first else None
    skipped = sum(int(item["skipped"]) for item in items if "skipped" in item)
    return Batch(views, stack("label"), captions, stack("index"), stack("source"), skipped)
