"""Multistage runs: one data stream across the stages, new masks in each stage, the run's
overrides in every stage (or a one-line refusal), warm-up and steps per stage."""

import pytest
import torch

import m3i.train.step
from m3i.cli import main
from m3i.config import ConfigError, load_config
from m3i.data.stream import BatchStream
from m3i.train.pretrain import pretrain
from m3i.train.stages import stage_configs
from tests.tiny import TINY_M3I

RUN = [
    *TINY_M3I,
    "model.depth=1",
    "data.num_train=40",  # 5 batches of 8 per epoch: 7 steps cross into a second epoch
    "train.batch_size=8",
    "train.steps=7",
    "monitor.every=0",
    "monitor.final_eval=[]",
    "monitor.tensorboard=false",
]


@pytest.fixture
def spy(monkeypatch):
    """Every batch the runs read ("index" and "view1") and every mix drawn (image A's
    positions), in order."""
    seen = {"index": [], "view1": [], "positions_a": []}
    take, split = BatchStream.__next__, m3i.train.step.split_positions

    def next_batch(self):
        batch = take(self)
        seen["index"].append(batch.indices.tolist())
        seen["view1"].append(batch.views[0].image.clone())
        return batch

    def split_positions(*args, **kwargs):
        positions_a, positions_b = split(*args, **kwargs)
        seen["positions_a"].append(positions_a.clone())
        return positions_a, positions_b

    monkeypatch.setattr(BatchStream, "__next__", next_batch)
    monkeypatch.setattr(m3i.train.step, "split_positions", split_positions)
    return seen


@pytest.mark.parametrize("stage_steps", [[], [3, 0, 4]])
def test_stages_read_the_batches_of_one_run_and_draw_their_own_masks(tmp_path, spy, stage_steps):
    stages = "stages=[data2vec,mae,data2vec]"
    multistage = load_config("multistage", overrides=[*RUN, stages, f"stage_steps={stage_steps}"])
    pretrain(multistage, tmp_path / "multistage", progress=False)
    staged = {key: list(values) for key, values in spy.items()}
    for values in spy.values():
        values.clear()
    pretrain(load_config("data2vec", overrides=RUN), tmp_path / "single", progress=False)

    assert len(staged["index"]) == 7
    assert staged["index"] == spy["index"]  # the same samples, in the same order
    assert len({i for batch in staged["index"] for i in batch}) == 40  # a whole epoch read
    assert all(torch.equal(a, b) for a, b in zip(staged["view1"], spy["view1"], strict=True))
    first, last = stage_steps[0] if stage_steps else 2, stage_steps[-1] if stage_steps else 3
    # stage 0 draws the masks of a single run; the last stage (data2vec again) draws new ones
    masks_first, masks_last = staged["positions_a"][:first], staged["positions_a"][-last:]
    assert torch.equal(masks_first[0], spy["positions_a"][0])
    assert not any(torch.equal(a, b) for a, b in zip(masks_first, masks_last, strict=False))


def test_run_overrides_reach_every_stage():
    cfg = load_config(
        "multistage",
        overrides=["teacher.momentum=0.9", "mix.isolate=false", "targets.text.width=16"],
    )
    configs = stage_configs(cfg)
    assert [c.preset for c in configs] == ["data2vec", "siameseim", "supervised", "clip"]
    for stage in configs:
        assert stage.teacher.momentum == 0.9
        assert stage.mix.isolate is False
        assert stage.targets.text.width == 16
    # what makes each stage its objective stays the preset's
    assert [c.mix.ratio for c in configs] == [0.4, 0.75, 1.0, 1.0]
    assert [set(c.active_targets()) for c in configs] == [
        {"intra_view"},
        {"inter_view"},
        {"category"},
        {"text"},
    ]


@pytest.mark.parametrize("key", ["targets.category.weight=2", "mix.ratio=0.3"])
def test_per_stage_keys_are_refused_in_one_line(tmp_path, capsys, key):
    out = tmp_path / "run"
    args = ["pretrain", "--preset", "multistage", "--quiet", "--out", str(out), "--set", key]
    args += [f"--set={s}" for s in ["train.steps=0", "monitor.every=0", "monitor.final_eval=[]"]]
    assert main(args) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    name = key.split("=")[0]
    assert error.startswith(f"m3i: error: {name} cannot be set on a multistage run")
    assert "stages=[...]" in error
    assert not (out / "config.yaml").exists()  # refused before any work


def test_stage_steps_warmup_and_first_batch():
    cfg = load_config(
        "multistage",
        overrides=["train.steps=100", "train.warmup_steps=20", "stage_steps=[10,20,30,40]"],
    )
    configs = stage_configs(cfg)
    assert [c.train.steps for c in configs] == [10, 20, 30, 40]
    assert [c.train.warmup_steps for c in configs] == [2, 4, 6, 8]  # 20 x steps / 100
    assert [c.train.first_batch for c in configs] == [0, 10, 30, 60]
    # the default: an equal split, the remainder to the last stage
    cfg = load_config("multistage", overrides=["train.steps=10", "train.warmup_steps=5"])
    configs = stage_configs(cfg)
    assert [c.train.steps for c in configs] == [2, 2, 2, 4]
    assert [c.train.warmup_steps for c in configs] == [1, 1, 1, 2]
    assert [c.train.first_batch for c in configs] == [0, 2, 4, 6]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["stage_steps=[1,2]"], "stage_steps [1, 2] must give one step count for each of the 4"),
        (["stage_steps=[1,2,3,-1]", "train.steps=5"], "stage_steps must be >= 0, got -1"),
        (["stage_steps=[1,2,3,4]"], "sum to 10, but train.steps is 200; set train.steps=10"),
        (["stages=[supervised,multistage]"], "stage 'multistage' is not a single-stage preset"),
        (["stages=[]", "stage_steps=[3]"], "stage_steps needs stages"),
        (["train.first_batch=-1"], "train.first_batch must be >= 0"),
    ],
)
def test_bad_stage_settings_fail_with_one_line(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config("multistage", overrides=overrides)
    assert message in str(error.value) and "\n" not in str(error.value)
