"""Multistage runs: one data stream across the stages, new masks in each stage, the run's
overrides in every stage (or a one-line refusal), warm-up and steps per stage; `multistage` is
M3I but for the staging, `multistage_classic` the classic presets in sequence."""

import pytest
import torch

import m3i.method
from m3i.cli import main
from m3i.config import ConfigError, load_config, to_dict
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
    take, split = BatchStream.__next__, m3i.method.split_positions

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
    monkeypatch.setattr(m3i.method, "split_positions", split_positions)
    return seen


@pytest.mark.parametrize(
    ("stages", "single", "stage_steps"),
    [
        ("data2vec,mae,data2vec", "data2vec", []),
        ("data2vec,mae,data2vec", "data2vec", [3, 0, 4]),
        ("m3i:intra_view,m3i:category,m3i:intra_view", "m3i", [3, 1, 3]),
    ],
)
def test_stages_read_the_batches_of_one_run_and_draw_their_own_masks(
    tmp_path, spy, stages, single, stage_steps
):
    overrides = [*RUN, f"stages=[{stages}]", f"stage_steps={stage_steps}"]
    pretrain(load_config("multistage", overrides=overrides), tmp_path / "staged", progress=False)
    staged = {key: list(values) for key, values in spy.items()}
    for values in spy.values():
        values.clear()
    pretrain(load_config(single, overrides=RUN), tmp_path / "single", progress=False)

    assert len(staged["index"]) == 7
    assert staged["index"] == spy["index"]  # the same samples, in the same order
    assert len({i for batch in staged["index"] for i in batch}) == 40  # a whole epoch read
    assert all(torch.equal(a, b) for a, b in zip(staged["view1"], spy["view1"], strict=True))
    first, last = stage_steps[0] if stage_steps else 2, stage_steps[-1] if stage_steps else 3
    # stage 0 draws the masks of a single run; the last (stage 0's objective again) new ones
    masks_first, masks_last = staged["positions_a"][:first], staged["positions_a"][-last:]
    assert torch.equal(masks_first[0], spy["positions_a"][0])
    assert not any(torch.equal(a, b) for a, b in zip(masks_first, masks_last, strict=False))


def test_classic_stages_are_the_presets_with_the_run_overrides():
    """Each stage of `multistage_classic` is its preset (targets, mix, masks, teacher, decoder)
    with the run's changes, and the stage's share of the schedule."""
    run = ["teacher.momentum=0.9", "mix.isolate=false", "targets.text.width=16"]
    run += ["decoder.depth=1", "train.steps=10", "train.warmup_steps=5"]
    configs = stage_configs(load_config("multistage_classic", overrides=run))
    classic = ["data2vec", "siameseim", "supervised", "clip"]
    schedule = [(2, 1, 0), (2, 1, 2), (2, 1, 4), (4, 2, 6)]  # as in the m3i test below
    for stage, preset, (steps, warmup, first) in zip(configs, classic, schedule, strict=True):
        mine = [f"train.steps={steps}", f"train.warmup_steps={warmup}"]
        expected = load_config(preset, overrides=[*run, *mine, f"train.first_batch={first}"])
        assert to_dict(stage) == to_dict(expected), preset
    assert [c.teacher.momentum for c in configs] == [0.9] * 4
    assert [c.decoder.depth for c in configs] == [1] * 4


def test_multistage_stages_are_m3i_with_one_target_each():
    """Each stage of `multistage` is the m3i preset (target definitions, mix, views, teacher,
    the run's changes) with the other three targets' weights 0, and nothing else changed."""
    run = ["train.steps=10", "train.warmup_steps=5", "teacher.momentum=0.9"]
    configs = stage_configs(load_config("multistage", overrides=run))
    kinds = ["intra_view", "inter_view", "category", "text"]
    # 10 steps in four: 2, 2, 2, 4 (the remainder last); warm-up round(5 x steps / 10)
    schedule = [(2, 1, 0), (2, 1, 2), (2, 1, 4), (4, 2, 6)]
    for stage, kind, (steps, warmup, first) in zip(configs, kinds, schedule, strict=True):
        others = [f"targets.{other}.weight=0" for other in kinds if other != kind]
        mine = [f"train.steps={steps}", f"train.warmup_steps={warmup}"]
        mine.append(f"train.first_batch={first}")
        expected = to_dict(load_config("m3i", overrides=[*run, *others, *mine]))
        got = to_dict(stage)
        assert (got.pop("preset"), got.pop("description")) == (
            f"m3i:{kind}",
            f"m3i with its {kind} target alone",
        )
        del expected["preset"], expected["description"]
        assert got == expected, kind
        assert set(stage.active_targets()) == {kind}


def test_one_backbone_passes_through_the_stages():
    """A stage's preset may name another backbone (m3i_convnext: convnext_atto at 64 px); the
    stages train the run's, which passes from stage to stage."""
    cfg = load_config("multistage", overrides=["stages=[m3i_convnext:text,supervised]"])
    convnext, supervised = stage_configs(cfg)
    assert to_dict(convnext)["model"] == to_dict(supervised)["model"] == to_dict(cfg)["model"]
    assert convnext.model.name == "vit_tiny_patch16_224"  # the default, not convnext_atto


def test_a_stage_that_cannot_run_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    sets = ["stages=[supervised,byol]", "train.batch_size=1", "train.steps=0"]
    sets += ["monitor.every=0", "monitor.final_eval=[]"]
    args = ["pretrain", "--preset", "multistage", "--quiet", "--out", str(out)]
    assert main(args + [f"--set={s}" for s in sets]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1
    assert error[0].startswith("m3i: error: stage 1 (byol) cannot run: targets.view_regress ")
    assert "at least 2 images per micro-batch" in error[0]
    assert not out.exists()  # refused before any work


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
        (
            ["stages=[supervised,multistage]"],
            "stage 'multistage': 'multistage' is not a single-stage preset; valid: byol, clip,",
        ),
        (["stages=[multistage_classic:text]"], "'multistage_classic' is not a single-stage"),
        (["stages=[m3:text]"], "stage 'm3:text': 'm3' is not a single-stage preset"),
        (
            ["stages=[m3i:pixels]"],
            "stage 'm3i:pixels': 'pixels' is not one of m3i's targets; valid: m3i:category, "
            "m3i:text, m3i:intra_view, m3i:inter_view",
        ),
        (["stages=[clip:category]"], "'category' is not one of clip's targets; valid: clip:text"),
        (["stages=['m3i:']"], "stage 'm3i:': '' is not one of m3i's targets"),
        (["stages=[]", "stage_steps=[3]"], "stage_steps needs stages"),
        (["train.first_batch=-1"], "train.first_batch must be >= 0"),
    ],
)
def test_bad_stage_settings_fail_with_one_line(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config("multistage", overrides=overrides)
    assert message in str(error.value) and "\n" not in str(error.value)
