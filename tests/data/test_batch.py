"""The typed batch against torch's own default_collate and slicing."""

import pytest
import torch
from torch.utils.data import default_collate

from m3i.data.batch import Batch, collate
from m3i.data.shapes import ShapesDataset
from m3i.data.views import ViewConfig, ViewDataset


@pytest.fixture(scope="module")
def items() -> list[dict]:
    views = ViewDataset(ShapesDataset(num_samples=6), ViewConfig(), 16, seed=2)
    return [views[i] for i in range(6)]


def assert_matches(batch: Batch, reference: dict) -> None:
    """Every field of `batch` equals the dict default_collate made of the same items."""
    assert len(batch.views) == 2 and len(batch) == len(reference["index"])
    for number, view in enumerate(batch.views, start=1):
        assert torch.equal(view.image, reference[f"view{number}"])
        assert torch.equal(view.box, reference[f"box{number}"])
        assert torch.equal(view.flip, reference[f"flip{number}"])
        assert view.box.dtype == torch.float32 and view.flip.dtype == torch.bool
    assert torch.equal(batch.labels, reference["label"])
    assert torch.equal(batch.indices, reference["index"])
    assert batch.captions == list(reference["caption"])


def test_collate_holds_what_default_collate_holds(items):
    assert_matches(collate(items), default_collate(items))


def test_split_gives_consecutive_equal_parts(items):
    parts = collate(items).split(3)
    assert [len(part) for part in parts] == [2, 2, 2]
    for k, part in enumerate(parts):
        assert_matches(part, default_collate(items[2 * k : 2 * k + 2]))


def test_to_moves_tensors_and_keeps_captions(items):
    batch = collate(items).to(torch.device("meta"))
    assert batch.views[1].image.device.type == "meta" and batch.labels.device.type == "meta"
    assert batch.captions == [item["caption"] for item in items]


def test_views_by_name_and_a_clear_error(items):
    batch = collate(items)
    assert batch.view("view2") is batch.views[1]
    with pytest.raises(KeyError, match="no view 'view3'; it has view1, view2"):
        batch.view("view3")


def test_labels_and_captions_are_optional(items):
    without = [{k: v for k, v in item.items() if k not in ("label", "caption")} for item in items]
    batch = collate(without)
    assert batch.labels is None and batch.captions is None
    assert [len(part) for part in batch.split(2)] == [3, 3]
