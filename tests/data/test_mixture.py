"""Mixtures of sources: the draws against the weights, each source read in epochs, the classes
of several labelled sources, H(Y) of a known mixture, images:, scans made once, and the one-line
refusals."""

import json
import logging
import math
from collections import Counter, deque
from itertools import islice

import numpy as np
import pytest
import torch

from m3i import runtime
from m3i.data.base import DataError, ImageSource, Sample
from m3i.data.mixture import Mixture, merge_classes, mixture_weights
from m3i.data.scan import SCAN_FILE, ScanCache, scan_key, shared_stream_scans, shared_verify
from m3i.data.shapes import ShapesDataset
from m3i.data.specs import eval_spec, open_source
from m3i.data.stream import SourceDraws, mixture_batches
from m3i.data.webdataset import WebDatasetStream
from tests.mixture_data import caption_shards, plain_images

CPU = torch.device("cpu")


class Fake(ImageSource):
    """An in-memory source: its classes, every sample's label and caption."""

    def __init__(self, name, classes, labels, captions=None, numbered=False):
        self.name, self.classes, self._labels = name, classes, labels
        self._captions = captions or [""] * len(labels)
        self.numbered_classes = numbered

    def __len__(self):
        return len(self._labels)

    def __getitem__(self, index):
        return Sample(torch.zeros(3, 4, 4, dtype=torch.uint8), self._labels[index], "")

    def labels(self):
        return list(self._labels)

    def captions(self, limit=None):
        return [c for c in self._captions if c]


class Items(torch.utils.data.Dataset):
    """View items of `length` samples whose label is `label_of(index)`; records the epoch each
    item was read in."""

    def __init__(self, length, label_of=lambda index: -1):
        self.length, self.label_of, self.epoch = length, label_of, 0

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        return {
            "view1": torch.zeros(3, 1, 1),
            "box1": torch.zeros(4),
            "flip1": torch.tensor(False),
            "label": torch.tensor(self.label_of(index)),
            "caption": "",
            "index": torch.tensor(index),
            "skipped": torch.tensor(self.epoch),  # the epoch it was read in, summed per batch
        }


def test_draw_counts_follow_the_weights_within_binomial_tolerance():
    weights = [0.2, 0.5, 0.3]
    draws = SourceDraws([2.0, 5.0, 3.0], seed=0, size=64)  # normalised
    batches = 300
    counts = sum(np.bincount(draws(b), minlength=3) for b in range(batches))
    n = batches * 64
    for count, p in zip(counts, weights, strict=True):
        assert abs(count - n * p) <= 4.5 * math.sqrt(n * p * (1 - p)), (count, n * p)
    assert counts.sum() == n
    assert np.array_equal(draws.counts_before(batches), counts)
    per_batch = {tuple(np.bincount(draws(b), minlength=3)) for b in range(20)}
    assert len(per_batch) > 1  # each slot is drawn, not a fixed quota per batch


def test_draws_are_a_function_of_the_seed_and_the_batch_alone():
    a, b = SourceDraws([1, 1], seed=3, size=32), SourceDraws([1, 1], seed=3, size=32)
    assert np.array_equal(a(17), b(17))
    assert np.array_equal(a.counts_before(40), b.counts_before(40))
    assert not np.array_equal(a(17), SourceDraws([1, 1], seed=4, size=32)(17))
    assert not np.array_equal(a(17), a(18))
    one = SourceDraws([5.0], seed=0, size=8)
    assert np.array_equal(one(3), np.zeros(8)) and one.counts_before(5).tolist() == [40]


def stream_items(parts, weights, batch_size, batches, start=0, maps=None, workers=0):
    stream = mixture_batches(parts, weights, batch_size, 0, workers, CPU, start, maps)
    return list(islice(stream, batches)), stream.draws


def test_each_source_is_read_in_whole_epochs_and_each_slot_holds_its_drawn_source():
    parts = [Items(7), Items(11)]
    got, draws = stream_items(parts, [0.4, 0.6], batch_size=8, batches=30)
    reads = {0: [], 1: []}
    for number, batch in enumerate(got):
        assert batch.sources.tolist() == draws(number).tolist()
        for source, index in zip(batch.sources.tolist(), batch.indices.tolist(), strict=True):
            reads[source].append(index)
    for source, length in ((0, 7), (1, 11)):
        seen = reads[source]
        assert len(seen) >= 3 * length
        for epoch in range(len(seen) // length):  # every epoch is a permutation of the source
            assert sorted(seen[epoch * length : (epoch + 1) * length]) == list(range(length))
        assert seen[:length] != seen[length : 2 * length]  # a new order each epoch


def test_a_stream_started_at_a_later_batch_continues_the_whole_stream():
    parts = [Items(7), Items(11)]
    whole, _ = stream_items(parts, [0.4, 0.6], batch_size=8, batches=12)
    later, _ = stream_items(parts, [0.4, 0.6], batch_size=8, batches=5, start=7)
    for a, b in zip(whole[7:], later, strict=True):
        assert a.indices.tolist() == b.indices.tolist()
        assert a.sources.tolist() == b.sources.tolist()
        assert a.skipped == b.skipped  # the same epochs


def test_workers_give_the_batches_in_the_same_order():
    parts = [Items(7), Items(11)]
    main, _ = stream_items(parts, [0.4, 0.6], batch_size=4, batches=9)
    workers, _ = stream_items(parts, [0.4, 0.6], batch_size=4, batches=9, workers=2)
    assert [b.indices.tolist() for b in main] == [b.indices.tolist() for b in workers]
    assert [b.sources.tolist() for b in main] == [b.sources.tolist() for b in workers]


def test_each_rank_reads_its_own_slots_of_the_global_batch(monkeypatch):
    parts = [Items(7), Items(11)]
    monkeypatch.setattr(runtime, "world_size", lambda: 1)
    monkeypatch.setattr(runtime, "rank", lambda: 0)
    (whole,), _ = stream_items(parts, [0.4, 0.6], batch_size=8, batches=1, start=5)
    monkeypatch.setattr(runtime, "world_size", lambda: 2)
    halves = []
    for rank in (0, 1):
        monkeypatch.setattr(runtime, "rank", lambda rank=rank: rank)
        (half,), _ = stream_items(parts, [0.4, 0.6], batch_size=4, batches=1, start=5)
        halves.append(half)
    assert halves[0].indices.tolist() + halves[1].indices.tolist() == whole.indices.tolist()
    assert halves[0].sources.tolist() + halves[1].sources.tolist() == whole.sources.tolist()


def test_labels_are_mapped_into_the_mixture_classes():
    parts = [Items(5, lambda index: index % 2), Items(5, lambda index: -1)]
    got, _ = stream_items(parts, [0.5, 0.5], 8, 4, maps=[[2, 0], None])
    for batch in got:
        for source, index, label in zip(batch.sources, batch.indices, batch.labels, strict=True):
            expected = {0: [2, 0][int(index) % 2], 1: -1}[int(source)]
            assert int(label) == expected


def test_classes_of_labelled_sources_combine_by_name():
    a = Fake("a", ["cat", "dog"], [0, 1])
    plain = Fake("plain", None, [-1])
    c = Fake("c", ["dog", "fox"], [0, 1])
    merge = merge_classes([a, plain, c])
    assert merge.classes == ["cat", "dog", "fox"]
    assert merge.maps == [[0, 1], None, [1, 2]]
    same = merge_classes([a, Fake("a2", ["cat", "dog"], [1])])
    assert same.classes == ["cat", "dog"] and same.maps == [[0, 1], [0, 1]]
    numbered = Fake("captions:x.jsonl", ["0", "1"], [0, 1], numbered=True)
    assert merge_classes([numbered, Fake("y", ["0", "1"], [1], numbered=True)]).maps == [
        [0, 1],
        [0, 1],
    ]


@pytest.mark.parametrize("other", [["cat", "dog"], ["0", "1", "2"]])
def test_numbered_classes_beside_other_classes_are_refused(other):
    numbered = Fake("captions:x.jsonl", ["0", "1"], [0, 1], numbered=True)
    with pytest.raises(DataError) as caught:
        merge_classes([numbered, Fake("folder:y", other, [0], numbered=other[0] == "0")])
    message = str(caught.value)
    assert "\n" not in message and "captions:x.jsonl" in message and "folder:y" in message


def test_the_label_prior_is_the_labels_as_the_mixture_draws_them():
    """cat 3/4 and dog 1/4 of source a (weight 1/2), no label in the plain source (1/4), dog and
    fox 1/2 each in c (1/4): P = (cat 3/8, dog 1/8 + 1/8, fox 1/8) / (3/4) = (1/2, 1/3, 1/6)."""
    a = Fake("a", ["cat", "dog"], [0, 0, 0, 1])
    plain = Fake("plain", None, [-1] * 4)
    c = Fake("c", ["dog", "fox"], [0, 1, 0, 1])
    mixture = Mixture([a, plain, c], [2.0, 1.0, 1.0])
    prior = mixture.label_prior()
    torch.testing.assert_close(prior, torch.tensor([1 / 2, 1 / 3, 1 / 6], dtype=torch.float64))
    entropy = -(0.5 * math.log(0.5) + math.log(1 / 3) / 3 + math.log(1 / 6) / 6)  # 1.0114 nats
    assert float(-(prior * prior.log()).sum()) == pytest.approx(entropy, abs=1e-12)
    equal = Mixture([a, plain, c], [1.0, 1.0, 2.0]).label_prior()  # the weights move it
    torch.testing.assert_close(
        equal, torch.tensor([3 / 16, 1 / 16 + 1 / 4, 1 / 4], dtype=torch.float64) / (3 / 4)
    )
    assert Mixture([plain], []).label_prior() is None


def test_default_weights_are_the_sizes_or_equal_shares_with_a_stream(tmp_path):
    small, large = Fake("s", None, [-1] * 10), Fake("l", None, [-1] * 30)
    assert mixture_weights([small, large], []) == [0.25, 0.75]
    assert mixture_weights([small, large], [3, 1]) == [0.75, 0.25]
    spec = caption_shards(tmp_path / "cc", 4, 2)
    stream = WebDatasetStream(spec.partition(":")[2], None, 16, seed=0)
    assert mixture_weights([small, stream], []) == [0.5, 0.5]
    for weights in ([1.0], [1.0, -1.0], [1.0, math.nan]):
        with pytest.raises(DataError, match="data.weights"):
            mixture_weights([small, large], weights)


def test_images_reads_every_image_under_the_folder_without_labels(tmp_path):
    root = plain_images(tmp_path / "plain", 6)
    source = open_source(f"images:{root}")
    assert len(source) == 6 and source.classes is None
    assert source.labels() == [-1] * 6 and source.captions() == []
    assert source[1].image.shape == (3, 32, 32)  # a file one folder deeper
    assert len(open_source(f"images:{root}", num_samples=4)) == 4
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no image")
    for spec, split, words in (
        (f"images:{tmp_path / 'empty'}", "train", "no images"),
        (f"images:{tmp_path / 'missing'}", "train", "no such folder"),
        (f"images:{root}", "val", "has no val split"),
    ):
        with pytest.raises(DataError) as caught:
            open_source(spec, split)
        assert words in str(caught.value) and "\n" not in str(caught.value)


def test_the_scans_are_made_once_and_cached_in_the_run_folder(tmp_path, monkeypatch):
    spec = caption_shards(tmp_path / "cc", 6, 3)
    stream = WebDatasetStream(spec.partition(":")[2], None, 16, seed=0)
    calls = []
    real = WebDatasetStream.scan
    monkeypatch.setattr(
        WebDatasetStream, "scan", lambda self, *args: calls.append(args) or real(self, *args)
    )
    key = scan_key([stream], {"specs": [spec], "limit": 4})
    cache = ScanCache(tmp_path / SCAN_FILE, key)
    (first,) = shared_stream_scans([stream], cache, 4, 0)
    assert len(first.labels) == 4 and len(first.captions) == 4  # the bounded sample
    assert len(calls) == 1
    saved = json.loads((tmp_path / SCAN_FILE).read_text())
    assert saved["key"] == key and saved["key"]["sources"][0][1] == 2  # two shards
    (again,) = shared_stream_scans([stream], cache, 4, 0)
    assert again == first and len(calls) == 1  # read back, not scanned again
    other = ScanCache(tmp_path / SCAN_FILE, {**key, "limit": 5})
    shared_stream_scans([stream], other, 5, 0)
    assert len(calls) == 2  # another key: scanned again
    more = caption_shards(tmp_path / "cc", 9, 3)  # a third shard under the same folder
    grown = WebDatasetStream(more.partition(":")[2], None, 16, seed=0)
    assert scan_key([grown], {"limit": 5}) != scan_key([stream], {"limit": 5})


def test_the_stream_scan_takes_a_share_of_every_shard(tmp_path):
    """The bounded scan takes as many samples from each shard (the start of each), so that
    shards written class by class would still show every class."""
    spec = caption_shards(tmp_path / "cc", 40, 10)  # 4 shards of 10
    stream = WebDatasetStream(spec.partition(":")[2], None, 16, seed=0)
    scan = stream.scan(8, seed=0)
    captions = ShapesDataset("train", 40, 32, 3).captions()  # caption_shards' images
    shard_of = {caption: index // 10 for index, caption in enumerate(captions)}
    per_shard = Counter(shard_of[caption] for caption in scan.captions)
    assert len(scan.labels) == 8 and per_shard == {0: 2, 1: 2, 2: 2, 3: 2}
    assert stream.scan(3, seed=1).labels == [-1, -1, -1]  # 3 shards, one sample each


def test_the_images_are_checked_in_shares_and_skipping_them_is_counted(tmp_path):
    root = plain_images(tmp_path / "plain", 200)
    broken = sorted(root.rglob("*.png"))[5]
    broken.write_bytes(b"not a png")
    source = open_source(f"images:{root}")
    cache = ScanCache(tmp_path / SCAN_FILE, scan_key([source], {}))
    shared_verify([source], cache)
    assert source.corrupt_indices() == [5]
    (found,) = json.loads((tmp_path / SCAN_FILE).read_text())["corrupt"]
    assert [index for index, _ in found] == [5]
    fresh = open_source(f"images:{root}")
    shared_verify([fresh], cache)  # as a resume: from the cache, no image read
    assert fresh.corrupt_indices() == [5]
    assert fresh[5].skipped == 1 and fresh[4].skipped == 0
    assert torch.equal(fresh[5].image, fresh[6].image)


def test_an_unreadable_shard_sample_is_skipped_counted_and_named_once(tmp_path, caplog):
    spec = caption_shards(tmp_path / "cc", 8, 4, truncated=(2,))
    stream = WebDatasetStream(spec.partition(":")[2], _views(), 16, seed=0)
    with caplog.at_level(logging.WARNING, logger="m3i.data"):
        items = list(islice(iter(stream), 60))
    skipped = sum(int(item["skipped"]) for item in items)
    assert skipped >= 1  # 60 draws from 8 samples, resampled: sample 2 came up
    named = [r.getMessage() for r in caplog.records if "000002" in r.getMessage()]
    assert len(named) == 1 and "skipped an unreadable sample" in named[0]
    stream.max_corrupt_fraction = 0.0
    with pytest.raises(DataError) as caught:
        list(islice(iter(stream), 60))
    message = str(caught.value)
    assert "\n" not in message and "data.max_corrupt_fraction=0" in message


def _views():
    from m3i.data.views import ViewConfig

    return ViewConfig()


def test_the_skipped_counts_are_the_reads_missing_from_the_stream(tmp_path):
    """An item's `index` numbers the samples its reader read, skipped ones included: the
    indices missing between the items are the unreadable reads, which `skipped` must count."""
    spec = caption_shards(tmp_path / "cc", 16, 4, truncated=(5,))
    stream = WebDatasetStream(spec.partition(":")[2], _views(), 16, seed=0)
    got = list(islice(mixture_batches([stream], [1.0], 8, 0, 0, CPU), 5))
    indices = [i for batch in got for i in batch.indices.tolist()]
    missing = set(range(indices[-1])) - set(indices)
    assert sum(batch.skipped for batch in got) == len(missing) > 0


def test_the_window_stops_only_past_its_share_of_the_last_reads():
    stream = WebDatasetStream.__new__(WebDatasetStream)
    stream.max_corrupt_fraction = 0.01  # more than 10 of the last 1,000
    error = DataError("x.tar: sample 7: unreadable image")
    window = deque([False] * 990 + [True] * 10, maxlen=1000)
    stream._check_window(window, error)  # 10 of the last 1,000: allowed
    window.append(True)  # 11
    with pytest.raises(DataError, match="11 unreadable samples among the last 1000 read"):
        stream._check_window(window, error)
    old = deque([True] * 11 + [False] * 989, maxlen=1000)
    old.append(False)  # the oldest unreadable one leaves the window: 10
    stream._check_window(old, error)
    early = deque([True] * 10, maxlen=1000)  # the first 10 reads all bad: not yet past 10
    stream._check_window(early, error)


def test_a_labelled_stream_without_class_names_counts_as_unlabelled_in_a_mixture():
    parts = [Items(4, lambda index: 1), Items(4, lambda index: 3)]
    got, _ = stream_items(parts, [0.5, 0.5], 8, 3, maps=[[5, 6], None])
    for batch in got:
        expected = [6 if source == 0 else -1 for source in batch.sources.tolist()]
        assert batch.labels.tolist() == expected


def test_a_source_alone_reads_its_seeded_permutations_in_whole_batches():
    """The order single-source runs have always read: global batch b is slice b % per_epoch of
    torch.randperm(n, generator seeded seed * 1000003 + epoch), the tail dropped."""
    seed, n, size = 5, 10, 4  # 2 batches per epoch, 2 samples dropped
    got, _ = stream_items([Items(n)], [1.0], size, 6)
    expected = []
    for epoch in range(3):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        expected += [order[0:4].tolist(), order[4:8].tolist()]
    stream = mixture_batches([Items(n)], [1.0], size, seed, 0, CPU)
    assert [next(stream).indices.tolist() for _ in range(6)] == expected
    assert len(got) == 6


def test_a_mixture_is_evaluated_on_its_first_source_with_labelled_splits():
    assert eval_spec(["wds:/cc/{0..9}.tar", "images:/raw", "folder:/in", "shapes"]) == "folder:/in"
    assert eval_spec(["images:/raw", "fashion-mnist"]) == "fashion-mnist"
    assert eval_spec("wds:/cc/{0..9}.tar") == "wds:/cc/{0..9}.tar"  # alone: its own refusal
    assert eval_spec(["wds:/a.tar", "images:/raw"]) == "wds:/a.tar"
