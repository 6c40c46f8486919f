"""Collapse monitors against hand-checked cases and a NumPy reference; the online monitor."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from m3i.config import load_config
from m3i.models.backbone import Backbone
from m3i.train.monitors import TrainingMonitor, feature_std, rankme


def numpy_rankme(features: np.ndarray, eps: float = 1e-7) -> float:
    singular = np.linalg.svd(features.astype(np.float64), compute_uv=False)
    p = singular / singular.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


def test_rankme_of_equal_singular_values_is_the_dimension():
    # 8 orthonormal rows scaled alike: 8 equal singular values, entropy log 8, RankMe 8
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))
    assert rankme(3.0 * q) == pytest.approx(8.0, rel=1e-4)


def test_rankme_of_rank_one_features_is_one():
    features = torch.outer(torch.arange(1.0, 21.0), torch.randn(16))
    assert rankme(features) == pytest.approx(1.0, abs=1e-3)


def test_rankme_matches_numpy():
    features = torch.randn(50, 12, generator=torch.Generator().manual_seed(1))
    features[:, 6:] *= 0.1  # six strong and six weak directions
    assert rankme(features) == pytest.approx(numpy_rankme(features.numpy()), rel=1e-4)


def test_feature_std_by_hand():
    # collapsed: every row the same direction -> 0
    assert feature_std(torch.ones(10, 4) * torch.tensor([1.0, 2.0, 3.0, 4.0])) == 0.0
    # rows e1 and -e1 (normalised already): per-dimension std over 2 samples (ddof 1)
    # dim 0: values 1, -1 -> std sqrt(2); dims 1, 2: 0 -> mean sqrt(2) / 3
    features = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    assert feature_std(features) == pytest.approx(math.sqrt(2) / 3)


def tiny_config(*overrides: str):
    return load_config(
        "supervised",
        overrides=[
            "model.depth=1",
            "monitor.knn_train=40",
            "monitor.knn_val=20",
            "data.image_size=16",
            "model.img_size=16",
            *overrides,
        ],
    )


def test_monitor_knn_matches_a_brute_force_vote_on_the_same_features():
    cfg = tiny_config()
    backbone = Backbone(cfg.model)
    monitor = TrainingMonitor(cfg, torch.device("cpu"))
    values = monitor(backbone)
    assert set(values) == {"monitor/feature_std", "monitor/rankme", "monitor/knn_top1"}
    assert backbone.training  # left as it was found
    with torch.no_grad():
        backbone.eval()
        memory = backbone(monitor.memory).mean(dim=1)
        queries = backbone(monitor.queries).mean(dim=1)
    assert values["monitor/rankme"] == pytest.approx(numpy_rankme(memory.numpy()), rel=1e-3)
    memory = memory / memory.norm(dim=1, keepdim=True)
    queries = queries / queries.norm(dim=1, keepdim=True)
    correct = 0
    for query, label in zip(queries, monitor.query_labels, strict=True):
        similarity = memory @ query
        top = similarity.argsort(descending=True)[:20]
        votes = torch.zeros(monitor.num_classes)
        for index in top:
            votes[monitor.memory_labels[index]] += math.exp(similarity[index] / 0.07)
        correct += int(votes.argmax() == label)
    assert values["monitor/knn_top1"] == pytest.approx(100 * correct / 20)


def test_monitor_without_a_val_split_has_no_knn(tmp_path):
    for index in range(4):
        folder = tmp_path / "train" / f"class{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (index * 60, 0, 0)).save(folder / f"{index}.png")
    cfg = tiny_config(f"data.spec=folder:{tmp_path}", "monitor.knn_train=4")
    values = TrainingMonitor(cfg, torch.device("cpu"))(Backbone(cfg.model))
    assert set(values) == {"monitor/feature_std", "monitor/rankme"}
