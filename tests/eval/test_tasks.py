"""`m3i eval TASK` end to end on a tiny pre-trained run, and its one-line errors."""

import json
import math
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision.transforms.v2 import functional as TF

from m3i.cli import check_final_eval, main
from m3i.config import ConfigError, load_config
from m3i.data.shapes import ShapesDataset
from m3i.data.shapes_detect import ShapesDetection
from m3i.eval import detect, segment, tasks
from m3i.eval.features import extract, load_backbone
from m3i.eval.tasks import TASKS, Need, Task
from m3i.train import pretrain as pretraining
from tests.tiny import TINY_M3I

SMALL = [
    "num_train=128",
    "num_val=64",
    "linear.epochs=2",
    "finetune.epochs=1",
    "finetune.batch_size=32",
    "segment.epochs=2",
    "detect.epochs=2",
]
METRICS = {
    "knn": {"top1", "top5"},
    "linear": {"top1", "top5"},
    "finetune": {"top1", "top5"},
    "zeroshot": {"top1", "top5"},
    "segment": {"miou", "pixel_acc"},
    "detect": {"ap", "ap50"},
}


def pretrain(out: Path, preset: str, *overrides: str) -> Path:
    """A tiny run directory, without the online monitors and `m3i pretrain`'s final evaluation."""
    overrides = (*TINY_M3I, "monitor.every=0", "monitor.tensorboard=false", *overrides)
    cfg = load_config(preset, overrides=overrides)
    if preset == "m3i":
        assert {"category", "text"} <= set(cfg.active_targets())
    return pretraining.pretrain(cfg, out, progress=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """30 steps of the m3i preset (category and text targets active) on 256 shapes."""
    return pretrain(
        tmp_path_factory.mktemp("m3i") / "run",
        "m3i",
        "data.num_train=256",
        "train.batch_size=32",
        "train.steps=30",
        "train.log_every=10",
    )


@pytest.fixture(scope="module")
def supervised_run(tmp_path_factory) -> Path:
    """2 steps of the supervised preset: a backbone and checkpoint.pt, no text target."""
    return pretrain(
        tmp_path_factory.mktemp("supervised") / "run",
        "supervised",
        "data.num_train=32",
        "train.batch_size=16",
        "train.steps=2",
    )


def records(run: Path) -> list[dict]:
    path = run / "eval.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def eval_cli(task: str, checkpoint: Path | str, *extra: str, data: str = "shapes") -> list[str]:
    sets = [arg for s in SMALL for arg in ("--set", s)]
    return ["eval", task, "--checkpoint", str(checkpoint), "--data", data, *sets, *extra]


def check_result(result: dict, task: str, checkpoint: Path | str) -> None:
    assert {"task", "checkpoint", "data", "metrics"} <= set(result)
    assert result["task"] == task
    assert result["checkpoint"] == str(checkpoint)
    assert result["data"] == "shapes"
    metrics = result["metrics"]
    assert METRICS[task] <= set(metrics), metrics
    assert all(math.isfinite(value) for value in metrics.values()), metrics
    for name in METRICS[task]:
        assert math.isfinite(metrics[name]) and 0.0 <= metrics[name] <= 100.0, (name, metrics)


@pytest.mark.parametrize("task", TASKS)
def test_every_task_prints_json_and_records_it(run, capsys, task):
    before = records(run)
    assert main(eval_cli(task, run, "--json")) == 0
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    check_result(result, task, run)
    if task == "linear":
        assert result["chosen"]["lr"] in [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]  # the default sweep
    assert err.strip().splitlines()[-1].startswith(f"{task} on shapes:")
    after = records(run)
    assert len(after) == len(before) + 1
    assert after[-1]["task"] == task and after[-1]["metrics"] == result["metrics"]


@pytest.mark.parametrize("task", ["knn", "zeroshot"])
def test_checkpoint_can_be_the_backbone_file(run, capsys, task):
    backbone = run / "backbone.safetensors"
    before = records(run)
    assert main(eval_cli(task, backbone, "--json")) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    check_result(result, task, backbone)
    assert len(records(run)) == len(before) + 1  # recorded beside the backbone


def test_without_json_prints_a_summary_line(run, capsys):
    assert main(eval_cli("knn", run, "--set", "knn.k=5")) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert line.startswith("knn on shapes: top1 ")


def test_features_are_deterministic(run, capsys):
    results = []
    for _ in range(2):
        assert main(eval_cli("knn", run, "--json")) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["metrics"])
    assert results[0] == results[1]


def expect_one_line_error(capsys, argv: list[str], *fragments: str) -> str:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("m3i: error:")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not out.strip()
    return lines[0]


def test_missing_checkpoint(tmp_path, capsys):
    missing = tmp_path / "nope"
    expect_one_line_error(capsys, eval_cli("knn", missing), str(missing), "does not exist")
    expect_one_line_error(
        capsys, eval_cli("knn", missing / "backbone.safetensors"), "does not exist"
    )


def test_text_file_is_not_a_backbone(tmp_path, capsys):
    path = tmp_path / "backbone.safetensors"
    path.write_text("not a safetensors file\n")
    expect_one_line_error(capsys, eval_cli("knn", path), str(path), "not an m3i backbone")
    expect_one_line_error(capsys, eval_cli("knn", tmp_path), str(path), "not an m3i backbone")


def test_safetensors_without_m3i_metadata(tmp_path, capsys):
    path = tmp_path / "backbone.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    expect_one_line_error(capsys, eval_cli("knn", tmp_path), "not an m3i backbone", "timm_name")


def test_captions_without_val_file(run, tmp_path, capsys):
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "a.png")
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"image": "a.png", "caption": "a red square", "label": 0}) + "\n")
    before = records(run)
    expect_one_line_error(
        capsys, eval_cli("knn", run, data=f"captions:{train}"), "no usable val split"
    )
    assert records(run) == before


def test_folder_without_val(run, tmp_path, capsys):
    (tmp_path / "train" / "red").mkdir(parents=True)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "train" / "red" / "a.png")
    before = records(run)
    expect_one_line_error(
        capsys, eval_cli("linear", run, data=f"folder:{tmp_path}"), "no usable val split"
    )
    assert records(run) == before


def test_zeroshot_without_text_target(supervised_run, capsys):
    expect_one_line_error(
        capsys,
        eval_cli("zeroshot", supervised_run),
        "zeroshot needs a run trained with a text target",
        "(targets.text.weight=0)",
    )


def test_zeroshot_on_a_run_whose_text_weight_is_zero(run, supervised_run, tmp_path, capsys):
    # a tokenizer alone does not make a text target: the config says weight 0
    crafted = tmp_path / "crafted"
    shutil.copytree(supervised_run, crafted)
    shutil.copy(run / "tokenizer.json", crafted / "tokenizer.json")
    expect_one_line_error(
        capsys, eval_cli("zeroshot", crafted), "targets.text.weight=0", "supervised"
    )


def test_unknown_task(run, capsys):
    expect_one_line_error(capsys, eval_cli("knnn", run), "unknown eval task 'knnn'", "knn?")


@pytest.mark.parametrize(
    ("setting", "fragment"),
    [
        ("knn.kk=3", "knn.kk"),
        ("knn.k=0", "knn.k must be >= 1"),
        ("detect.hidden_dim=-1", "detect.hidden_dim must be >= 0 (0: a linear head)"),
        ("zeroshot.templates=[a photo]", "{}"),
        ("crop_pct=0", "crop_pct must be in (0, 1]"),
        ("crop_pct=1.2", "crop_pct must be in (0, 1]"),
        ("workers=-1", "workers must be >= 0"),
    ],
)
def test_bad_setting(run, capsys, setting, fragment):
    before = records(run)
    expect_one_line_error(capsys, eval_cli("knn", run, "--set", setting), fragment)
    assert records(run) == before


@pytest.mark.parametrize("task", ["segment", "detect"])
def test_dense_tasks_need_shapes(run, capsys, task):
    before = records(run)
    argv = eval_cli(task, run, data="fashion-mnist")
    expect_one_line_error(capsys, argv, "fashion-mnist", "no masks or boxes")
    assert records(run) == before


@pytest.mark.parametrize(("crop_pct", "resized"), [(0.875, 36), (1.0, 32)])
def test_segment_scores_the_masks_where_its_views_show_them(
    run, capsys, monkeypatch, crop_pct, resized
):
    """The masks follow the views' geometry (tests/data/test_views.py checks it against timm's):
    the 32-pixel masks resized to `resized` by pixel-centre nearest neighbour, the central 32."""
    seen = {}

    def probe(train_tokens, train_masks, val_tokens, val_masks, num_classes, settings, seed):
        seen.update(val=val_masks)
        return {"miou": 0.0, "pixel_acc": 0.0}

    monkeypatch.setattr(segment, "segment_probe", probe)
    assert main(eval_cli("segment", run, "--json", "--set", f"crop_pct={crop_pct}")) == 0
    shapes = ShapesDataset("val", 64, 32)
    raw = torch.stack([shapes.annotations(i)["mask"] for i in range(64)])
    nearest = TF.resize(raw, [resized] * 2, interpolation=TF.InterpolationMode.NEAREST_EXACT)
    assert torch.equal(seen["val"], TF.center_crop(nearest, [32, 32]))
    if crop_pct == 1.0:
        assert torch.equal(seen["val"], raw)


def cropped_boxes(boxes: torch.Tensor, labels: torch.Tensor, resized: int):
    """By hand: 32-pixel boxes resized to `resized` pixels, then the central 32 (xyxy, clipped);
    the boxes left under a pixel wide or tall go, with their labels."""
    offset = round((resized - 32) / 2)
    moved = (boxes * resized / 32 - offset).clamp(0, 32)
    kept = (moved[:, 2] - moved[:, 0] >= 1) & (moved[:, 3] - moved[:, 1] >= 1)
    return moved[kept], labels[kept]


@pytest.mark.parametrize(("crop_pct", "resized"), [(0.875, 36), (1.0, 32)])
def test_detect_trains_and_scores_on_the_detection_scenes(
    run, capsys, monkeypatch, crop_pct, resized
):
    """The probe sees the scenes' boxes where its views show them: timm's resize of the
    32-pixel scenes to floor(32 / crop_pct) and the central 32 pixels."""
    seen = {}

    def probe(train_tokens, train_boxes, train_labels, val_tokens, val_boxes, val_labels,
              num_categories, image_size, settings, seed):  # fmt: skip
        seen.update(train=(train_tokens, train_boxes), val=(val_tokens, val_boxes))
        seen.update(labels=val_labels, categories=num_categories, size=image_size)
        return {"ap": 0.0, "ap50": 0.0}

    monkeypatch.setattr(detect, "detect_probe", probe)
    assert main(eval_cli("detect", run, "--json", "--set", f"crop_pct={crop_pct}")) == 0
    assert (seen["categories"], seen["size"]) == (10, 32)
    for split, count in (("train", 128), ("val", 64)):
        tokens, boxes = seen[split]
        scenes = ShapesDetection(split, count, 32)
        assert tokens.shape[0] == count
        for i in range(count):
            truth = scenes.annotations(i)
            expected, _ = cropped_boxes(truth["boxes"], truth["box_labels"], resized)
            torch.testing.assert_close(boxes[i], expected)
    truth = ShapesDetection("val", 64, 32).annotations(5)
    assert torch.equal(
        seen["labels"][5], cropped_boxes(truth["boxes"], truth["box_labels"], resized)[1]
    )
    val = ShapesDetection("val", 64, 32)
    features = extract(load_backbone(run), val, dense=True, crop_pct=crop_pct)
    assert torch.allclose(seen["val"][0], features.dense, atol=1e-5)


def test_eval_never_unpickles(run, capsys, monkeypatch):
    calls = []
    original = torch.load

    def checked_load(*args, **kwargs):
        assert kwargs.get("weights_only") is True, kwargs
        calls.append(args[0])
        return original(*args, **kwargs)

    def no_pickle(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(torch, "load", checked_load)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    for task in ("zeroshot", "knn"):
        assert main(eval_cli(task, run, "--json")) == 0
    assert [Path(c).name for c in calls] == ["checkpoint.pt"]  # zeroshot only


def test_a_new_task_is_one_registry_line(run, capsys, monkeypatch):
    """A task added to the registry alone: `m3i eval` runs it, final_eval may name it."""

    def val_count(session) -> dict[str, float]:
        return {"images": float(len(session.split("val")))}

    with pytest.raises(ConfigError, match="may only list"):
        check_final_eval(["val_count"])
    monkeypatch.setitem(TASKS, "val_count", Task(val_count, frozenset()))
    check_final_eval(["knn", "val_count"])
    assert main(eval_cli("val_count", run, "--json")) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["task"] == "val_count" and result["metrics"] == {"images": 64.0}  # num_val=64


@pytest.mark.parametrize(
    ("needs", "data", "fragment"),
    [
        ({Need.TEXT_TOWER}, "shapes", "needs a run trained with a text target"),
        ({Need.ANNOTATIONS}, "fashion-mnist", "no masks or boxes"),
    ],
)
def test_needs_are_checked_before_the_runner(
    supervised_run, capsys, monkeypatch, needs, data, fragment
):
    """The registry's needs, not the runner, refuse data or a run that lacks them: the runner
    and the feature extraction never start."""

    def never(*args, **kwargs):
        raise AssertionError("work started before the needs were checked")

    monkeypatch.setitem(TASKS, "needy", Task(never, frozenset(needs)))
    monkeypatch.setattr(tasks, "extract", never)
    expect_one_line_error(capsys, eval_cli("needy", supervised_run, data=data), fragment)


def test_every_task_declares_what_its_protocol_reads():
    """By hand: the classification tasks read labels, segment masks too, detect the detection
    scenes (their own images and boxes, no labels), zeroshot the text tower and the val labels
    only (it trains nothing)."""
    needs = {name: task.needs for name, task in TASKS.items()}
    assert needs == {
        "knn": {Need.LABELS},
        "linear": {Need.LABELS},
        "finetune": {Need.LABELS},
        "segment": {Need.LABELS, Need.ANNOTATIONS},
        "detect": {Need.SCENES},
        "zeroshot": {Need.TEXT_TOWER, Need.VAL_LABELS},
    }
