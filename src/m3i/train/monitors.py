"""Live training monitors: collapse alarms (feature std, RankMe) and an online kNN accuracy."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from m3i.config import Config, ConfigError
from m3i.data.base import DataError, ImageSource
from m3i.data.specs import eval_spec
from m3i.data.views import eval_data_config, eval_transform
from m3i.eval.features import EvalError, open_split
from m3i.eval.knn import knn_scores, topk_accuracy
from m3i.models.backbone import Backbone

log = logging.getLogger("m3i.train")


def feature_std(features: torch.Tensor) -> float:
    """Mean over dimensions of the std over samples of L2-normalised features (SimSiam's
    collapse alarm): about 1/sqrt(D) for spread-out features, 0 when they collapse to a point."""
    return F.normalize(features.float(), dim=1).std(dim=0).mean().item()


def rankme(features: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al., 2023): exp of the entropy of the normalised singular values of
    the (N, D) feature matrix; from 1 (collapsed) to min(N, D) (full rank)."""
    singular = torch.linalg.svdvals(features.float())
    p = singular / singular.sum() + eps
    return (-(p * p.log()).sum()).exp().item()


class TrainingMonitor:
    """Pooled features of a fixed small set of train images (kNN memory) and of held-out val
    images (queries), computed every `monitor.every` steps with the backbone in eval mode."""

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.device = device
        view = eval_data_config(cfg.model.img_size)  # `m3i eval`'s default view
        memory = self._open(cfg, "train", cfg.monitor.knn_train)
        queries = self._open(cfg, "val", cfg.monitor.knn_val) if memory.classes else None
        self.memory = torch.stack([eval_transform(s.image, view) for s in memory])
        self.memory_labels = torch.tensor([s.label for s in memory])
        self.num_classes = len(memory.classes or [])
        self.queries = self.query_labels = None
        if queries is not None:
            self.queries = torch.stack([eval_transform(s.image, view) for s in queries])
            self.query_labels = torch.tensor([s.label for s in queries])

    @staticmethod
    def _open(cfg: Config, split: str, count: int) -> ImageSource | None:
        """`count` images of `split` of monitor.data, which must open (a ConfigError), else of
        the run's data (whose lack of a val split leaves the kNN off, with a warning)."""
        spec, data = cfg.monitor.data or eval_spec(cfg.data.spec), cfg.data
        try:
            return open_split(spec, split, count, data.image_size, data.seed)
        except (DataError, EvalError) as err:
            if cfg.monitor.data:
                raise ConfigError(f"monitor.data: {err}") from None
            if not isinstance(err, EvalError):
                raise
            log.warning("no online kNN monitor: %s; or give it monitor.data", err)
            return None

    @torch.no_grad()
    def _pooled(self, backbone: Backbone, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
        return torch.cat(
            [
                backbone.pooled(images[i : i + batch].to(self.device)).float().cpu()
                for i in range(0, images.shape[0], batch)
            ]
        )

    def __call__(self, backbone: Backbone) -> dict[str, float]:
        """`monitor/feature_std`, `monitor/rankme` and (with labelled val data)
        `monitor/knn_top1` in percent."""
        was_training = backbone.training
        backbone.eval()
        memory = self._pooled(backbone, self.memory)
        values = {"monitor/feature_std": feature_std(memory), "monitor/rankme": rankme(memory)}
        if self.queries is not None:
            scores = knn_scores(
                memory, self.memory_labels, self._pooled(backbone, self.queries), self.num_classes
            )
            values["monitor/knn_top1"] = topk_accuracy(scores, self.query_labels, (1,))["top1"]
        backbone.train(was_training)
        return values
