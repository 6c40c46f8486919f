"""Weighted kNN on frozen features against a brute-force reference and hand-checked cases."""

import math

import numpy as np
import pytest
import torch

from m3i.eval.knn import knn_scores, topk_accuracy


def brute_force_knn(
    memory: np.ndarray,
    memory_labels: np.ndarray,
    queries: np.ndarray,
    num_classes: int,
    k: int,
    temperature: float,
) -> np.ndarray:
    """One query at a time: cosine similarity to every memory item, sort, vote with the top k."""
    scores = np.zeros((len(queries), num_classes))
    for q, query in enumerate(queries):
        similarities = []
        for m, item in enumerate(memory):
            cosine = float(query @ item) / (np.linalg.norm(query) * np.linalg.norm(item))
            similarities.append((cosine, m))
        similarities.sort(reverse=True)
        for cosine, m in similarities[:k]:
            scores[q, memory_labels[m]] += math.exp(cosine / temperature)
    return scores


@pytest.fixture(scope="module")
def toy() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    memory = torch.randn(50, 8, generator=generator)
    labels = torch.randint(0, 3, (50,), generator=generator)
    queries = torch.randn(20, 8, generator=generator)
    return memory, labels, queries


@pytest.mark.parametrize("k", [1, 5, 50, 200])  # 200 > 50 memory items: every item votes
@pytest.mark.parametrize("chunk", [1024, 7])  # 7 < 20 queries: three chunks, the last short
@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_knn_scores_match_brute_force(toy, k, chunk, temperature):
    memory, labels, queries = toy
    scores = knn_scores(memory, labels, queries, 3, k=k, temperature=temperature, chunk=chunk)
    expected = brute_force_knn(
        memory.double().numpy(), labels.numpy(), queries.double().numpy(), 3, k, temperature
    )
    assert scores.shape == (20, 3)
    np.testing.assert_allclose(scores.double().numpy(), expected, rtol=1e-4)


def test_knn_scores_with_k_above_memory_use_every_item(toy):
    memory, labels, queries = toy
    scores = knn_scores(memory, labels, queries, 3, k=1000, temperature=0.5)
    # every memory item votes once: the class sums of exp(cosine / T) over the whole memory
    cosine = (
        torch.nn.functional.normalize(queries, dim=1)
        @ torch.nn.functional.normalize(memory, dim=1).T
    )
    for c in range(3):
        torch.testing.assert_close(
            scores[:, c], (cosine[:, labels == c] / 0.5).exp().sum(dim=1), rtol=1e-5, atol=0
        )


def test_knn_two_separated_clusters_by_hand():
    # three items on the x axis (class 0), three on the y axis (class 1)
    memory = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, 2.0], [0.0, 5.0]])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    queries = torch.tensor([[4.0, 0.0], [0.0, 0.5], [1.0, 1.0]])
    scores = knn_scores(memory, labels, queries, num_classes=2, k=3, temperature=0.5)
    # query on the x axis: its 3 nearest are the x-axis items at cosine 1 -> 3 e^(1/0.5) for
    # class 0, nothing for class 1; and the mirror image for the query on the y axis
    e2 = math.exp(2.0)
    torch.testing.assert_close(scores[0], torch.tensor([3 * e2, 0.0]))
    torch.testing.assert_close(scores[1], torch.tensor([0.0, 3 * e2]))
    # the diagonal query is at cosine 1/sqrt(2) from all six; topk keeps 3 of the tie, each
    # worth e^(sqrt(2)); the two class scores add up to three votes
    assert scores[2].sum().item() == pytest.approx(3 * math.exp(2 / math.sqrt(2)), rel=1e-5)
    assert topk_accuracy(scores[:2], torch.tensor([0, 1]), ks=(1,)) == {"top1": 100.0}


def test_topk_accuracy_by_hand():
    scores = torch.tensor(
        [
            # ranking 2 > 0 > 1 > 3 > 4 > 5 ; label 2: top1 hit
            [0.5, 0.3, 0.9, 0.2, 0.1, 0.0],
            # ranking 0 > 1 > 2 > 3 > 4 > 5 ; label 4: fifth -> top5 hit only
            [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],
            # ranking 5 > 4 > 3 > 2 > 1 > 0 ; label 0: last -> miss both
            [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],
            # ranking 1 > ... ; label 3 second -> top5 hit only
            [0.0, 0.9, 0.1, 0.8, 0.2, 0.3],
        ]
    )
    labels = torch.tensor([2, 4, 0, 3])
    result = topk_accuracy(scores, labels)
    assert result == pytest.approx({"top1": 25.0, "top5": 75.0})
    assert topk_accuracy(scores, labels, ks=(1, 2, 6)) == pytest.approx(
        {"top1": 25.0, "top2": 50.0, "top6": 100.0}
    )


def test_topk_accuracy_caps_k_at_the_number_of_classes():
    scores = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    labels = torch.tensor([1, 1, 0])
    assert topk_accuracy(scores, labels) == pytest.approx({"top1": 100.0 / 3, "top5": 100.0})
