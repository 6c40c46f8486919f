"""Object detection from frozen patch tokens: a linear centre-based (CenterNet-style) head.

By default (detect.hidden_dim=0) the head is linear per token, as the segmentation probe is:
it measures what the tokens hold. With detect.hidden_dim > 0 a 3x3 convolution of that width
and a GELU come first; that head learns the shapes from random tokens by itself (docs/
evaluation.md: random init scores 23.45 AP with it, a 200-step backbone less), so it is an
option, not the probe.

Every object is predicted at the patch cell holding its box centre, in one of SLOTS slots per
cell (the larger object of a cell in slot 0, the next in slot 1): two objects may share a cell
on a coarse grid (4x4 for a ConvNet at 32 px holds two centres for about 8% of the objects of
the detection scenes, three for 0.3%). Per slot, a class heatmap says *what* is centred there
and four box channels say how far (left, top, right, bottom) the box edges lie from the cell's
centre, as a fraction of the image side. The distances are signed, not forced positive: a small
or partly hidden object may miss the centre of the cell that holds its own centre.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchmetrics.detection import MeanAveragePrecision
from torchvision.ops import batched_nms, sigmoid_focal_loss

from m3i.eval.segment import FrozenStandardise, fit_dense_head, token_grid
from m3i.eval.settings import DetectSettings

PRIOR = 0.01  # initial heatmap probability (the focal-loss prior of RetinaNet / CenterNet)
BOX_WEIGHT = 5.0  # weight of the L1 box loss against the focal heatmap loss (as in DETR)
SLOTS = 2  # objects one cell can hold (by decreasing box area)
NMS_IOU = 0.6  # a detection overlapping a higher-scored one of its class by more is dropped


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
    """Standardised tokens -> 1x1 convs to SLOTS heatmaps and ltrb boxes (hidden_dim 0: a
    linear head per token, as the segmentation probe's); with hidden_dim > 0, a 3x3 conv of
    that width + GELU first."""

    def __init__(self, tokens: torch.Tensor, num_categories: int, hidden_dim: int) -> None:
        super().__init__()
        self.standardise = FrozenStandardise(tokens)
        width = tokens.shape[-1]
        self.trunk: nn.Module = nn.Identity()
        if hidden_dim:
            self.trunk = nn.Sequential(nn.Conv2d(width, hidden_dim, 3, padding=1), nn.GELU())
            width = hidden_dim
        self.heatmap = nn.Conv2d(width, SLOTS * num_categories, 1)
        self.box = nn.Conv2d(width, SLOTS * 4, 1)
        nn.init.constant_(self.heatmap.bias, -math.log((1 - PRIOR) / PRIOR))

    def forward(self, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D, g, g) -> heatmap logits (N, SLOTS, C, g, g), box distances (N, SLOTS, 4, g, g)."""
        hidden = self.trunk(self.standardise(grid))
        n, _, g, _ = hidden.shape
        return self.heatmap(hidden).view(n, SLOTS, -1, g, g), self.box(hidden).view(
            n, SLOTS, 4, g, g
        )


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
    """Dense targets (N, SLOTS, C + 5, g, g): per slot, channels [0, C) a one-hot heatmap (1 at
    the cell holding each box centre, in its category's channel; no Gaussian), [C, C + 4) the
    box distances (left, top, right, bottom) from that cell's centre over image_size, [C + 4]
    the positive mask. A cell's objects fill its slots by decreasing box area; objects beyond
    SLOTS in one cell are left out."""
    stride = image_size / grid
    centres = _cell_centres(grid, image_size)
    targets = torch.zeros(len(boxes_list), SLOTS, num_categories + 5, grid * grid)
    for i, (boxes, labels) in enumerate(zip(boxes_list, labels_list, strict=True)):
        boxes = boxes.float().cpu()
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        for k in area.argsort(descending=True, stable=True).tolist():
            column, row = ((boxes[k, :2] + boxes[k, 2:]) / 2 / stride).long().clamp(0, grid - 1)
            cell = int(row) * grid + int(column)
            free = (targets[i, :, -1, cell] == 0).nonzero()
            if len(free) == 0:  # every slot of this cell holds a larger object
                continue
            slot = int(free[0])
            targets[i, slot, int(labels[k]), cell] = 1.0
            ltrb = torch.cat([centres[cell] - boxes[k, :2], boxes[k, 2:] - centres[cell]])
            targets[i, slot, num_categories : num_categories + 4, cell] = ltrb / image_size
            targets[i, slot, -1, cell] = 1.0
    return targets.reshape(len(boxes_list), SLOTS, num_categories + 5, grid, grid)


def centre_loss(outputs: tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Focal loss on the heatmaps + weighted L1 on positive slots' boxes, both per positive."""
    heatmap_logits, box_out = outputs
    c = heatmap_logits.shape[2]
    heatmap, ltrb = targets[:, :, :c], targets[:, :, c : c + 4]
    positive = targets[:, :, c + 4] > 0
    num_positives = positive.sum().clamp_min(1)
    focal = sigmoid_focal_loss(heatmap_logits, heatmap, reduction="sum")
    l1 = (box_out - ltrb).abs().sum(dim=2)[positive].sum()
    return (focal + BOX_WEIGHT * l1) / num_positives


def decode(
    heatmap_logits: torch.Tensor, box_out: torch.Tensor, image_size: int, max_detections: int
) -> list[dict[str, torch.Tensor]]:
    """Per image the `max_detections` best (slot, category, cell) scores that survive per-class
    NMS at IoU NMS_IOU (torchvision's batched_nms), as {boxes (K, 4) xyxy pixels clipped to the
    image, scores (K,), labels (K,)}. Inputs as CentreHead's outputs."""
    n, slots, c, g, _ = heatmap_logits.shape
    scores = heatmap_logits.sigmoid().flatten(1)  # (N, slots * C * g * g)
    candidates = min(4 * max_detections, scores.shape[1])
    top_scores, top = scores.topk(candidates, dim=1)
    slot, labels, cells = top // (c * g * g), top // (g * g) % c, top % (g * g)
    centres = _cell_centres(g, image_size).to(box_out.device)[cells]  # (N, K, 2)
    ltrb = box_out.flatten(3)[torch.arange(n)[:, None], slot, :, cells] * image_size  # (N, K, 4)
    boxes = torch.cat([centres - ltrb[..., :2], centres + ltrb[..., 2:]], dim=-1)
    boxes = boxes.clamp(0, image_size)
    boxes[..., 2:] = torch.maximum(boxes[..., 2:], boxes[..., :2])  # no inverted boxes
    detections = []
    for i in range(n):
        keep = batched_nms(boxes[i], top_scores[i], labels[i], NMS_IOU)[:max_detections]
        detections.append(
            {"boxes": boxes[i][keep], "scores": top_scores[i][keep], "labels": labels[i][keep]}
        )
    return detections


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
