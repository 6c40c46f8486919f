"""Object detection from frozen patch tokens: a light centre-based (CenterNet-style) head.

Every object is predicted at one patch cell, the one holding its box centre: a class heatmap
says *what* is centred there and four box channels say how far (left, top, right, bottom) the
box edges lie from that cell's centre, as a fraction of the image side. The distances are
signed, not forced positive: a 2-pixel distractor may miss the centre of the 4-pixel cell that
holds its own centre, so one of its distances is negative.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics.detection import MeanAveragePrecision
from torchvision.ops import sigmoid_focal_loss

from m3i.eval.segment import FrozenStandardise, fit_dense_head, token_grid
from m3i.eval.settings import DetectSettings

PRIOR = 0.01  # initial heatmap probability (the focal-loss prior of RetinaNet / CenterNet)
BOX_WEIGHT = 5.0  # weight of the L1 box loss against the focal heatmap loss (as in DETR)


def box_ap(predictions: list[dict], targets: list[dict]) -> dict[str, float]:
    """COCO box `ap` (IoU 0.50:0.95) and `ap50`, in percent, with pycocotools.

    predictions: per image {boxes (K, 4) xyxy, scores (K,), labels (K,)};
    targets: per image {boxes (M, 4) xyxy, labels (M,)}.
    """
    metric = MeanAveragePrecision(iou_type="bbox", backend="pycocotools")
    metric.update(predictions, targets)
    result = metric.compute()
    return {"ap": 100.0 * result["map"].item(), "ap50": 100.0 * result["map_50"].item()}


class CentreHead(nn.Module):
    """Standardised tokens -> 3x3 conv + GELU -> 1x1 convs to heatmap logits and ltrb boxes."""

    def __init__(self, tokens: torch.Tensor, num_categories: int, hidden_dim: int) -> None:
        super().__init__()
        self.standardise = FrozenStandardise(tokens)
        self.trunk = nn.Sequential(nn.Conv2d(tokens.shape[-1], hidden_dim, 3, padding=1), nn.GELU())
        self.heatmap = nn.Conv2d(hidden_dim, num_categories, 1)
        self.box = nn.Conv2d(hidden_dim, 4, 1)
        nn.init.constant_(self.heatmap.bias, -math.log((1 - PRIOR) / PRIOR))

    def forward(self, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D, g, g) -> heatmap logits (N, C, g, g) and box distances (N, 4, g, g)."""
        hidden = self.trunk(self.standardise(grid))
        return self.heatmap(hidden), self.box(hidden)


def _cell_centres(grid: int, image_size: int) -> torch.Tensor:
    """Pixel (x, y) centres of the g x g cells, as (g*g, 2) in row-major cell order."""
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) * (image_size / grid)
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=1)


def encode_targets(
    boxes_list: list[torch.Tensor],
    labels_list: list[torch.Tensor],
    grid: int,
    image_size: int,
    num_categories: int,
) -> torch.Tensor:
    """Dense targets (N, C + 5, g, g): channels [0, C) a one-hot heatmap (1 at the cell holding
    each box centre, in its category's channel; no Gaussian), [C, C + 4) the box distances
    (left, top, right, bottom) from that cell's centre over image_size, [C + 4] the positive
    mask. When two objects share a cell only the larger box is kept."""
    stride = image_size / grid
    centres = _cell_centres(grid, image_size)
    targets = torch.zeros(len(boxes_list), num_categories + 5, grid * grid)
    for i, (boxes, labels) in enumerate(zip(boxes_list, labels_list, strict=True)):
        boxes = boxes.float().cpu()
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        for k in area.argsort(descending=True).tolist():
            column, row = ((boxes[k, :2] + boxes[k, 2:]) / 2 / stride).long().clamp(0, grid - 1)
            cell = int(row) * grid + int(column)
            if targets[i, -1, cell] > 0:  # a larger object already holds this cell
                continue
            targets[i, int(labels[k]), cell] = 1.0
            ltrb = torch.cat([centres[cell] - boxes[k, :2], boxes[k, 2:] - centres[cell]])
            targets[i, num_categories : num_categories + 4, cell] = ltrb / image_size
            targets[i, -1, cell] = 1.0
    return targets.reshape(len(boxes_list), num_categories + 5, grid, grid)


def centre_loss(outputs: tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Focal loss on the heatmap + weighted L1 on positive cells' boxes, both per positive."""
    heatmap_logits, box_out = outputs
    c = heatmap_logits.shape[1]
    heatmap, ltrb, positive = targets[:, :c], targets[:, c : c + 4], targets[:, c + 4] > 0
    num_positives = positive.sum().clamp_min(1)
    focal = sigmoid_focal_loss(heatmap_logits, heatmap, reduction="sum")
    l1 = (box_out - ltrb).abs().sum(dim=1)[positive].sum()
    return (focal + BOX_WEIGHT * l1) / num_positives


def decode(
    heatmap_logits: torch.Tensor, box_out: torch.Tensor, image_size: int, max_detections: int
) -> list[dict[str, torch.Tensor]]:
    """Per image the top `max_detections` 3x3 heatmap peaks (over cells x categories) as
    {boxes (K, 4) xyxy pixels clipped to the image, scores (K,), labels (K,)}."""
    n, c, g, _ = heatmap_logits.shape
    scores = heatmap_logits.sigmoid()
    peaks = scores * (F.max_pool2d(scores, 3, stride=1, padding=1) == scores)
    top_scores, top = peaks.flatten(1).topk(min(max_detections, c * g * g), dim=1)
    labels, cells = top // (g * g), top % (g * g)
    centres = _cell_centres(g, image_size).to(box_out.device)[cells]  # (N, K, 2)
    ltrb = box_out.flatten(2).gather(2, cells[:, None].expand(-1, 4, -1)).transpose(1, 2)
    ltrb = ltrb * image_size
    boxes = torch.cat([centres - ltrb[..., :2], centres + ltrb[..., 2:]], dim=-1)
    boxes = boxes.clamp(0, image_size)
    boxes[..., 2:] = torch.maximum(boxes[..., 2:], boxes[..., :2])  # no inverted boxes
    return [
        {"boxes": boxes[i][keep], "scores": top_scores[i][keep], "labels": labels[i][keep]}
        for i, keep in enumerate(top_scores > 0)  # suppressed non-peaks score 0
    ]


def detect_probe(
    train_tokens: torch.Tensor,
    train_boxes: list[torch.Tensor],
    train_labels: list[torch.Tensor],
    val_tokens: torch.Tensor,
    val_boxes: list[torch.Tensor],
    val_labels: list[torch.Tensor],
    num_categories: int,
    image_size: int,
    settings: DetectSettings,
    seed: int = 0,
    chunk: int = 512,
) -> dict[str, float]:
    """Train a CentreHead on frozen (N, P, D) tokens; `ap` and `ap50` (percent) on val."""
    torch.manual_seed(seed)
    grid = token_grid(train_tokens[:1]).shape[-1]
    targets = encode_targets(train_boxes, train_labels, grid, image_size, num_categories)
    targets = targets.to(train_tokens.device)
    head = CentreHead(train_tokens, num_categories, settings.hidden_dim).to(train_tokens.device)
    fit_dense_head(head, train_tokens, targets, centre_loss, settings, seed)
    with torch.no_grad():
        predictions = [
            detection
            for i in range(0, val_tokens.shape[0], chunk)
            for detection in decode(
                *head(token_grid(val_tokens[i : i + chunk])), image_size, settings.max_detections
            )
        ]
    truth = [{"boxes": b, "labels": k} for b, k in zip(val_boxes, val_labels, strict=True)]
    return box_ap(predictions, truth)
