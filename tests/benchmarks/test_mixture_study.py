"""benchmarks/mixture_study.py: the split of Fashion-MNIST into three one-modality sources, and
equal training FLOPs for the two methods."""

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from m3i.data.sources import FASHION_MNIST_DIR, FashionMNIST
from m3i.data.specs import open_source

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import mixture_study  # noqa: E402

needs_fashion = pytest.mark.skipif(
    not (Path(FASHION_MNIST_DIR) / "train-labels-idx1-ubyte.gz").exists(),
    reason="dataset-fashion-mnist missing",
)


@needs_fashion
def test_the_study_data_splits_the_labels_and_repeats_the_rest(tmp_path):
    specs = mixture_study.write_study_data(tmp_path, 0.1, seed=0, limit=1000)
    train = FashionMNIST(FASHION_MNIST_DIR, "train", 1000, "f")
    per_class = Counter(train.labels())
    labelled = open_source(specs["labelled"])
    plain = open_source(specs["plain"])
    captioned = open_source(specs["captioned"])
    counts = Counter(labelled.classes[label] for label in labelled.labels())
    for label, count in per_class.items():  # 10% of each class keeps its label
        name = mixture_study.class_folder(train.classes[label])
        assert counts[name] == round(0.1 * count)
    assert len(labelled) + len(plain) == 1000 and len(captioned) == len(plain)
    assert plain.labels() == [-1] * len(plain) and captioned.labels() == [-1] * len(plain)
    lines = [json.loads(line) for line in Path(specs["captioned"][9:]).read_text().splitlines()]
    for line in lines[:50]:  # the captioned 90% are the plain images, with their class's caption
        index = int(Path(line["image"]).stem)
        assert (tmp_path / line["image"]).is_file() and line["caption"] == train[index].caption
    assert len(open_source(specs["labelled"], "val")) == 1000


@needs_fashion
def test_supervised_gets_the_training_flops_of_the_m3i_run(tmp_path):
    specs = mixture_study.write_study_data(tmp_path, 0.1, seed=0, limit=300)
    runs = mixture_study.configs(specs, steps=10, seed=0)

    class Counts:  # FLOPs per step by hand: M3I's step costs 2.5 supervised steps
        def per_step(self, cfg):
            return {"m3i": 250, "supervised": 100}[cfg.preset]

    plan = mixture_study.equal_flops(runs, Counts())
    assert runs["supervised"].train.steps == 25 and plan["supervised"]["train_gflop"] == 2500e-9
    assert plan["m3i"]["steps"] == 10 and runs["supervised"].train.warmup_steps == 2
    assert runs["m3i"].data.spec == [specs["labelled"], specs["plain"], specs["captioned"]]
    assert runs["supervised"].data.spec == specs["labelled"]
