"""`m3i pretrain` and `m3i presets` end to end on the embedded `shapes` dataset."""

import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from m3i.cli import main
from m3i.config import load_config, preset_names, preset_values
from m3i.mi.posteriors import LossAndMI
from m3i.mi.targets.category import CategoryTarget
from m3i.train.pretrain import pretrain
from m3i.train.stopping import TrainingError

QUIET = ["monitor.every=0", "monitor.final_eval=[]"]  # no monitors, no final evaluation
FAST = ["model.depth=2", "decoder.depth=1", "data.num_train=512", "train.batch_size=32", *QUIET]


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def pretrain_cli(tmp_path, *args):
    return main(["pretrain", "--out", str(tmp_path), "--quiet", *args])


def test_30_steps_of_m3i_lower_every_target_loss(tmp_path):
    # 64 images seen again and again under new augmentations: 30 steps are enough to fit them
    run = ["data.num_train=64", "train.steps=30", "train.log_every=1", "train.warmup_steps=5"]
    sets = [f"--set={s}" for s in FAST + run]
    assert pretrain_cli(tmp_path, *sets) == 0
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 31))
    targets = load_config("m3i").active_targets()
    for name in targets:
        first = sum(r[f"loss/{name}"] for r in records[:5]) / 5
        last = sum(r[f"loss/{name}"] for r in records[-5:]) / 5
        assert last < first, f"{name}: {first:.4f} -> {last:.4f}"
        assert all(f"mi/{name}" in r for r in records)
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "backbone.safetensors",
        "checkpoint.pt",
        "tokenizer.json",
    ):
        assert (tmp_path / name).is_file()
    assert load_config(config_file=tmp_path / "config.yaml").train.steps == 30
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 30 and "teacher.module.vit.pos_embed" in state["model"]


def test_zero_steps_writes_the_initial_timm_backbone(tmp_path):
    assert (
        pretrain_cli(
            tmp_path,
            "--preset",
            "supervised",
            "--set=train.steps=0",
            "--set=model.depth=2",
            *[f"--set={s}" for s in QUIET],
        )
        == 0
    )
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2, num_classes=0
    )
    model.load_state_dict(load_file(tmp_path / "backbone.safetensors"))
    assert read_metrics(tmp_path) == []


def test_multistage_runs_each_stage_from_the_last_backbone(tmp_path):
    sets = [
        f"--set={s}" for s in FAST + ["train.steps=8", "train.log_every=1", "data.num_train=64"]
    ]
    assert pretrain_cli(tmp_path, "--preset", "multistage", *sets) == 0
    records = read_metrics(tmp_path)
    kinds = ["intra_view", "inter_view", "category", "text"]  # M3I's targets, one stage each
    assert [r["stage"] for r in records] == [f"m3i:{kind}" for kind in kinds for _ in range(2)]
    assert [r["step"] for r in records] == list(range(1, 9))
    stages = sorted((tmp_path / "stages").iterdir())
    assert [s.name for s in stages] == [f"{i}-m3i-{kind}" for i, kind in enumerate(kinds)]
    assert load_config(config_file=stages[2] / "config.yaml").init == str(
        stages[1] / "backbone.safetensors"
    )
    final, last_stage = (
        load_file(tmp_path / "backbone.safetensors"),
        load_file(stages[3] / "backbone.safetensors"),
    )
    assert all(torch.equal(final[k], last_stage[k]) for k in final)


def test_monitors_final_evaluation_and_report(tmp_path, capsys):
    monitor = ["monitor.every=4", "monitor.knn_train=64", "monitor.knn_val=32"]
    final = ["monitor.final_eval_num_train=64", "monitor.final_eval_num_val=32"]
    run = ["train.steps=8", "train.log_every=2", "data.num_train=64"]
    sets = [f"--set={s}" for s in FAST[:4] + monitor + final + run]
    assert pretrain_cli(tmp_path, "--preset", "supervised", *sets) == 0
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [0, 2, 4, 6, 8]
    for record in (records[0], records[2], records[4]):  # step 0 (the initial model), 4, 8
        assert 0 <= record["monitor/knn_top1"] <= 100
        assert 1 <= record["monitor/rankme"] <= 64  # at most min(N, D) = min(64, 192)
        assert record["monitor/feature_std"] > 0
    assert "monitor/rankme" not in records[1]
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines[0].startswith("m3i: knn on shapes: top1 ")
    assert lines[1].startswith("m3i: linear on shapes: top1 ")
    assert f"report in {tmp_path / 'report'}" in out.err
    evals = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [e["task"] for e in evals] == ["knn", "linear"]
    assert (tmp_path / "report" / "summary.md").is_file()
    assert (tmp_path / "report" / "monitors.png").stat().st_size > 0
    assert any(
        p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir()
    )


def test_presets_lists_one_line_each(capsys):
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == preset_names()
    for line in lines:
        name, description = line.split(maxsplit=1)
        assert description == preset_values(name)["description"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--set", "train.stepz=1"], "did you mean 'train.steps'"),
        (["--data", "folder:/does/not/exist"], "/does/not/exist"),
        (["--data", "imagenet"], "imagenet"),
    ],
)
def test_bad_input_is_one_line_before_any_work(tmp_path, capsys, args, message):
    assert pretrain_cli(tmp_path / "run", *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("m3i: error:")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_non_finite_losses_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = CategoryTarget.forward

    def sometimes_nan(self, ctx):
        calls["n"] += 1
        bound = original(self, ctx)
        if calls["n"] in (2, 3) or calls["n"] >= 5:
            return LossAndMI(bound.loss * float("nan"), bound.mi)
        return bound

    monkeypatch.setattr(CategoryTarget, "forward", sometimes_nan)
    cfg = load_config(
        "supervised",
        overrides=FAST + ["train.steps=20", "train.log_every=1", "train.max_bad_steps=4"],
    )
    with pytest.raises(TrainingError, match="4 non-finite losses or gradients in a row"):
        pretrain(cfg, tmp_path, progress=False)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert ["skipped" in r for r in records] == [False, True, True, False, True, True, True, True]


def test_a_finite_loss_with_non_finite_gradients_is_skipped(tmp_path, monkeypatch):
    original = CategoryTarget.forward

    def nan_gradient(self, ctx):
        bound = original(self, ctx)
        bound.loss.register_hook(lambda grad: grad * float("nan"))
        return bound

    monkeypatch.setattr(CategoryTarget, "forward", nan_gradient)
    cfg = load_config("supervised", overrides=FAST + ["train.steps=5", "train.max_bad_steps=3"])
    with pytest.raises(TrainingError, match="non-finite gradient norm"):
        pretrain(cfg, tmp_path, progress=False)
    assert [r["skipped"].startswith("non-finite gradient") for r in read_metrics(tmp_path)] == [
        True
    ] * 3
    assert not (tmp_path / "backbone.safetensors").exists()


@pytest.mark.parametrize("command", [["pretrain"], ["eval"], ["bench", "speed"]])
def test_every_configured_command_takes_set(capsys, command):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    help_text = capsys.readouterr().out
    assert "--set KEY=VALUE" in help_text
    if command == ["bench", "speed"]:  # the model and batch are config keys, not flags
        for flag in ("--model", "--img-size", "--patch-size", "--depth", "--batch", "--preset"):
            assert flag not in help_text, flag


def test_eval_help_lists_each_registered_task_and_its_needs(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for line in (
        "knn (needs labels)",
        "segment (needs labels, masks and boxes)",
        "zeroshot (needs a text tower, val labels)",
    ):
        assert line in help_text
