import math
from collections import Counter

import pytest
import torch
from torchvision.ops import box_iou

from m3i.data.shapes_detect import ShapesDetection
from m3i.eval.detect import SLOTS, CentreHead, box_ap, decode, detect_probe, encode_targets
from m3i.eval.settings import DetectSettings

NUM_CATEGORIES = 10  # the shape classes
SIZE, GRID = 32, 8


def _det(boxes, scores, labels):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels),
    }


def _gt(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)}


def _annotations(split: str, n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    data = ShapesDetection(split, n, SIZE)
    annotations = [data.annotations(i) for i in range(n)]
    return [a["boxes"] for a in annotations], [a["box_labels"] for a in annotations]


def test_box_ap_perfect_detection():
    result = box_ap([_det([[2, 3, 12, 15]], [0.9], [1])], [_gt([[2, 3, 12, 15]], [1])])
    assert result == pytest.approx({"ap": 100.0, "ap50": 100.0})


def test_box_ap_iou_062_passes_three_of_ten_thresholds():
    # truth 10x10 (area 100), detection 10x6.2 inside it: IoU = 62 / 100 = 0.62. pycocotools
    # matches when IoU >= threshold: 0.50, 0.55, 0.60 pass, 0.65..0.95 fail -> ap = 3/10.
    result = box_ap([_det([[0, 0, 10, 6.2]], [0.9], [0])], [_gt([[0, 0, 10, 10]], [0])])
    assert result == pytest.approx({"ap": 30.0, "ap50": 100.0})


def test_box_ap_wrong_label_scores_zero():
    # label 1 has a truth but no detection (AP 0); label 2 has no truth, so it is not averaged
    result = box_ap([_det([[2, 3, 12, 15]], [0.9], [2])], [_gt([[2, 3, 12, 15]], [1])])
    assert result == pytest.approx({"ap": 0.0, "ap50": 0.0})


def test_box_ap_ranked_false_positive_101_point_interpolation():
    # image 1: exact hit at 0.9; image 2: false positive at 0.8, exact hit at 0.7.
    # Ranked: TP (P 1, R 1/2), FP (P 1/2, R 1/2), TP (P 2/3, R 1). Interpolated precision is
    # 1 at the 51 recall points 0.00..0.50 and 2/3 at the 50 points 0.51..1.00:
    # AP = (51 + 50 * 2/3) / 101 = 253 / 303 at every IoU threshold.
    predictions = [
        _det([[0, 0, 10, 10]], [0.9], [0]),
        _det([[20, 20, 30, 30], [0, 0, 8, 8]], [0.8, 0.7], [0, 0]),
    ]
    targets = [_gt([[0, 0, 10, 10]], [0]), _gt([[0, 0, 8, 8]], [0])]
    expected = 100.0 * 253 / 303
    assert box_ap(predictions, targets) == pytest.approx({"ap": expected, "ap50": expected})


def _perfect_maps(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Head outputs that say exactly what the targets say: logits +-20, the targets' boxes."""
    heatmap = targets[:, :, :NUM_CATEGORIES]
    return 20.0 * (2 * heatmap - 1), targets[:, :, NUM_CATEGORIES:-1]


@pytest.mark.parametrize("grid", [4, 8])
def test_encode_then_decode_perfect_maps_recovers_the_boxes(grid):
    boxes, labels = _annotations("train", 40)
    cells = [
        Counter(
            (int((x0 + x1) / 2 * grid // SIZE), int((y0 + y1) / 2 * grid // SIZE))
            for x0, y0, x1, y1 in image_boxes.tolist()
        )
        for image_boxes in boxes
    ]
    targets = encode_targets(boxes, labels, grid, SIZE, NUM_CATEGORIES)
    assert targets.shape == (40, SLOTS, NUM_CATEGORIES + 5, grid, grid)
    positive = targets[:, :, -1]
    assert torch.equal(targets[:, :, :NUM_CATEGORIES].sum(dim=2), positive)
    # a cell holds up to SLOTS objects; the coarse grid here has cells with 2, 3 and 4
    kept = [sum(min(count, SLOTS) for count in image.values()) for image in cells]
    assert positive.flatten(1).sum(dim=1).tolist() == kept
    shared = sum(count > 1 for image in cells for count in image.values())
    assert positive[:, 1].sum() == shared and (grid == 8 or shared > 0)
    fits = [i for i, image in enumerate(cells) if max(image.values()) <= SLOTS]
    assert len(fits) >= 38
    boxes, labels, targets = [boxes[i] for i in fits], [labels[i] for i in fits], targets[fits]
    decoded = decode(*_perfect_maps(targets), SIZE, max_detections=10)
    for detection, truth, label in zip(decoded, boxes, labels, strict=True):
        confident = detection["scores"] > 0.5
        assert confident.sum() == len(truth)
        iou = box_iou(truth, detection["boxes"][confident])
        best = iou.argmax(dim=1)
        assert torch.allclose(detection["boxes"][confident][best], truth, atol=1e-4)
        assert torch.equal(detection["labels"][confident][best], label)
    truth = [{"boxes": b, "labels": k} for b, k in zip(boxes, labels, strict=True)]
    assert box_ap(decoded, truth) == pytest.approx({"ap": 100.0, "ap50": 100.0})


def test_encode_fills_a_cells_slots_by_decreasing_area():
    # all three centred in cell 0 of the 8x8 grid (4-pixel cells, centre (2, 2))
    boxes = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 4.0, 4.0], [0.0, 1.0, 4.0, 3.0]])
    targets = encode_targets([boxes], [torch.tensor([0, 1, 2])], GRID, SIZE, 3)
    assert targets[0, 0, :, 0, 0].tolist() == [0.0, 1.0, 0.0] + [2 / SIZE] * 4 + [1.0]
    assert targets[0, 1, :, 0, 0].tolist() == [0.0, 0.0, 1.0] + [2 / SIZE, 1 / SIZE] * 2 + [1.0]
    assert targets[0, :, -1].sum() == 2  # the smallest is left out


def test_decode_drops_a_same_class_duplicate_but_keeps_other_classes():
    # three confident boxes: cell (0, 0) slot 0 class 0, box [0, 0, 8, 8]; cell (0, 1) slot 0
    # class 0, box [1, 0, 9, 8] (IoU 56/72 = 0.78 with the first: dropped, lower score); cell
    # (0, 1) slot 1 class 1, the same box (another class: kept)
    heatmap = torch.full((1, SLOTS, 2, 2, 2), -20.0)
    box = torch.zeros(1, SLOTS, 4, 2, 2)
    heatmap[0, 0, 0, 0, 0], heatmap[0, 0, 0, 0, 1], heatmap[0, 1, 1, 0, 1] = 3.0, 2.0, 1.0
    # 2x2 grid: cell centres at (8, 8) and (24, 8)
    box[0, 0, :, 0, 0] = torch.tensor([8.0, 8.0, 0.0, 0.0]) / SIZE
    box[0, 0, :, 0, 1] = torch.tensor([23.0, 8.0, -15.0, 0.0]) / SIZE
    box[0, 1, :, 0, 1] = box[0, 0, :, 0, 1]
    (detections,) = decode(heatmap, box, SIZE, max_detections=10)
    confident = detections["scores"] > 0.5
    assert detections["boxes"][confident].tolist() == [[0, 0, 8, 8], [1, 0, 9, 8]]
    assert detections["labels"][confident].tolist() == [0, 1]
    assert detections["scores"][confident].tolist() == pytest.approx(
        torch.tensor([3.0, 1.0]).sigmoid().tolist()
    )


def _target_tokens(boxes: list[torch.Tensor], labels: list[torch.Tensor]) -> torch.Tensor:
    """Tokens that carry the answer: each cell's encoded target, plus a little noise."""
    targets = encode_targets(boxes, labels, GRID, SIZE, NUM_CATEGORIES)
    tokens = targets.flatten(1, 2).flatten(2).transpose(1, 2)
    return tokens + 0.01 * torch.randn(tokens.shape, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("hidden_dim", [32, 0])  # 0: the linear head
def test_detect_probe_learns_from_informative_tokens(hidden_dim):
    train_boxes, train_labels = _annotations("train", 128)
    val_boxes, val_labels = _annotations("val", 32)
    settings = DetectSettings(epochs=20, batch_size=8, lr=1e-2, hidden_dim=hidden_dim)
    result = detect_probe(
        _target_tokens(train_boxes, train_labels),
        train_boxes,
        train_labels,
        _target_tokens(val_boxes, val_labels),
        val_boxes,
        val_labels,
        NUM_CATEGORIES,
        SIZE,
        settings,
    )
    assert result["ap50"] > 50.0
    assert 0.0 <= result["ap"] <= result["ap50"] <= 100.0


def test_detect_probe_on_random_tokens_is_finite():
    boxes, labels = _annotations("train", 16)
    tokens = torch.randn(16, GRID * GRID, 8, generator=torch.Generator().manual_seed(1))
    settings = DetectSettings(epochs=1, batch_size=8, hidden_dim=8)
    result = detect_probe(
        tokens[:8], boxes[:8], labels[:8], tokens[8:], boxes[8:], labels[8:], 10, SIZE, settings
    )
    assert all(math.isfinite(v) and 0.0 <= v <= 100.0 for v in result.values())
    assert set(result) == {"ap", "ap50"}


@pytest.mark.parametrize("hidden_dim, changed", [(DetectSettings().hidden_dim, 1), (8, 9)])
def test_head_sees_one_cell_when_linear_and_its_3x3_neighbours_otherwise(hidden_dim, changed):
    """A change of one token moves the linear head's outputs at its own cell only, and the
    3x3-conv head's at the 9 cells around it; the default probe is the linear one."""
    width, grid = 6, 5
    tokens = torch.randn(4, grid * grid, width, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    head = CentreHead(tokens, NUM_CATEGORIES, hidden_dim)
    maps = tokens[:1].transpose(1, 2).reshape(1, width, grid, grid)
    moved = maps.clone()
    moved[0, :, 2, 2] += 1.0
    with torch.no_grad():
        (heat, box), (heat2, box2) = head(maps), head(moved)
    differs = ((heat2 - heat).abs().amax(dim=(0, 1, 2)) > 0) & (
        (box2 - box).abs().amax(dim=(0, 1, 2)) > 0
    )
    assert differs.sum().item() == changed and differs[2, 2]
    if changed == 1:  # affine in the tokens, with the two 1x1 convs' parameters only
        linear_parameters = (width + 1) * SLOTS * (NUM_CATEGORIES + 4)  # weights and biases
        assert sum(p.numel() for p in head.parameters()) == linear_parameters
        with torch.no_grad():
            (heat0, _), (heat3, _) = head(torch.zeros_like(maps)), head(3 * maps)
        torch.testing.assert_close(heat3 - heat, 2 * (heat - heat0), rtol=1e-4, atol=1e-4)
