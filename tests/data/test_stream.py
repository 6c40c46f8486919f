"""The training stream: every epoch re-draws each sample's views, and a stream started at a
later batch continues the uninterrupted one."""

import pytest
import torch

from m3i.data.specs import open_source
from m3i.data.stream import batches, stream_batches
from m3i.data.views import ViewConfig, ViewDataset

SAMPLES, BATCH = 8, 4  # 2 batches per epoch
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def dataset() -> ViewDataset:
    source = open_source("shapes", "train", num_samples=SAMPLES, image_size=16)
    return ViewDataset(source, ViewConfig(), 16, seed=3)


def by_epoch(stream, epochs: int) -> list[dict[int, dict[str, torch.Tensor]]]:
    """Per epoch, each sample index's view1, box1 and flip1 from the stream."""
    per_epoch = SAMPLES // BATCH
    seen = [{} for _ in range(epochs)]
    for number in range(epochs * per_epoch):
        batch = next(stream)
        view1 = batch.views[0]
        for row, index in enumerate(batch.indices.tolist()):
            item = {"view1": view1.image[row], "box1": view1.box[row], "flip1": view1.flip[row]}
            assert index not in seen[number // per_epoch], "a sample twice in one epoch"
            seen[number // per_epoch][index] = item
    return seen


@pytest.mark.parametrize("workers", [0, 1])
def test_each_epoch_draws_new_views_of_every_sample(dataset, workers):
    first, second = by_epoch(batches(dataset, BATCH, 0, workers, CPU), epochs=2)
    assert first.keys() == second.keys() == set(range(SAMPLES))
    for index in range(SAMPLES):
        # a crop box is drawn from continuous ranges: the same box twice means the same draw
        assert not torch.equal(first[index]["box1"], second[index]["box1"]), index
        assert not torch.equal(first[index]["view1"], second[index]["view1"]), index


def test_a_stream_started_at_a_later_batch_continues_the_whole_stream(dataset):
    _, _, whole = by_epoch(batches(dataset, BATCH, 0, 0, CPU), epochs=3)
    (resumed,) = by_epoch(batches(dataset, BATCH, 0, 0, CPU, start=2 * SAMPLES // BATCH), 1)
    assert resumed.keys() == whole.keys()
    for index, item in whole.items():
        for key, value in item.items():
            assert torch.equal(resumed[index][key], value), (index, key)


class ThreadCounts(torch.utils.data.IterableDataset):
    """An endless stream of one-pixel view items labelled with the intra-op thread count each
    was read with."""

    def __iter__(self):
        while True:
            view = {"view1": torch.zeros(3, 1, 1), "box1": torch.zeros(4), "flip1": torch.tensor(0)}
            yield {**view, "label": torch.tensor(torch.get_num_threads())}


def test_a_shard_stream_makes_main_process_views_on_one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        stream = stream_batches(ThreadCounts(), batch_size=2, workers=0, device=CPU)
        assert next(stream).labels.tolist() == [1, 1]  # as in `batches`
        assert torch.get_num_threads() == 2  # the step keeps its threads
    finally:
        torch.set_num_threads(before)
