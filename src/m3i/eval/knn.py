"""Weighted k-nearest-neighbour classification on frozen features (DINO's protocol)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_scores(
    memory: torch.Tensor,
    memory_labels: torch.Tensor,
    queries: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores (Q, C): each of the k most cosine-similar memory items votes for its label
    with weight exp(similarity / temperature)."""
    memory = F.normalize(memory.float(), dim=1)
    k = min(k, memory.shape[0])
    scores = []
    for start in range(0, queries.shape[0], chunk):
        query = F.normalize(queries[start : start + chunk].float(), dim=1)
        similarity, index = (query @ memory.T).topk(k, dim=1)
        weights = (similarity / temperature).exp()
        votes = torch.zeros(query.shape[0], num_classes)
        votes.scatter_add_(1, memory_labels[index], weights)
        scores.append(votes)
    return torch.cat(scores)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """Top-k accuracy in percent for each k (k capped at the number of classes)."""
    ranked = scores.argsort(dim=1, descending=True)
    return {
        f"top{k}": 100.0 * (ranked[:, :k] == labels[:, None]).any(dim=1).float().mean().item()
        for k in ks
    }
