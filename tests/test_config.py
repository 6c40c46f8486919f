"""Config: presets, overrides and the errors for bad keys and values."""

import pytest
import torch

from m3i.config import (
    ConfigError,
    load_config,
    parse_override,
    preset_names,
    preset_values,
    to_dict,
)
from m3i.data.views import ViewConfig
from m3i.train.batches import training_source, training_stream

PRESETS = [
    "m3i",
    "supervised",
    "clip",
    "mae",
    "data2vec",
    "siameseim",
    "byol",
    "moco",
    "multistage",
    "multistage_classic",
]


def test_every_required_preset_ships_and_loads():
    assert set(PRESETS) <= set(preset_names())
    for name in PRESETS:
        cfg = load_config(name)
        assert cfg.preset == name
        assert preset_values(name)["description"]


def test_presets_switch_targets_by_weight():
    active = {name: set(load_config(name).active_targets()) for name in PRESETS[:-2]}
    assert active["m3i"] == {"category", "text", "intra_view", "inter_view"}
    assert active["supervised"] == {"category"}
    assert active["clip"] == {"text"}
    assert active["mae"] == {"pixels"}
    assert active["data2vec"] == {"intra_view"}
    assert active["siameseim"] == {"inter_view"}
    assert active["byol"] == {"view_regress"}
    assert active["moco"] == {"view_contrast"}
    assert load_config("multistage").stages == [
        "m3i:intra_view", "m3i:inter_view", "m3i:category", "m3i:text"
    ]  # fmt: skip
    classic = ["data2vec", "siameseim", "supervised", "clip"]
    assert load_config("multistage_classic").stages == classic


def test_nested_overrides_are_typed():
    cfg = load_config(
        "m3i",
        overrides=[
            "train.steps=20",
            "train.lr=1e-3",
            "model.name=vit_small_patch16_224",
            "targets.text.weight=0",
            "model.depth=3",
            "mix.isolate=false",
        ],
    )
    assert cfg.train.steps == 20 and isinstance(cfg.train.lr, float)
    assert cfg.model.name == "vit_small_patch16_224" and cfg.model.depth == 3
    assert cfg.targets.text.weight == 0.0 and "text" not in cfg.active_targets()
    assert cfg.mix.isolate is False
    assert parse_override("a.b.c=[1, 2]") == {"a": {"b": {"c": [1, 2]}}}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.stpes=3"], "unknown config key 'train.stpes'; did you mean 'train.steps'"),
        (
            ["views.scale_mn=0.5"],
            "unknown config key 'views.scale_mn'; did you mean 'views.scale_min'",
        ),
        (["views.size=64"], "unknown config key 'views.size'"),  # the model's img_size
        (["views.mean=[0, 0, 0]"], "unknown config key 'views.mean'"),
        (["targets.txt.weight=0"], "unknown config key 'targets.txt'; did you mean 'targets.text'"),
        (["train.steps=many"], "config key 'train.steps' expects int"),
        (["train=3"], "config key 'train' is a section"),
        (["train.steps"], "is not key=value"),
        (["mix.ratio=0"], "mix.ratio must be in (0, 1]"),
        (["model.img_size=30"], "must be a multiple of model.patch_size"),
        (
            [
                "targets.category.weight=0",
                "targets.text.weight=0",
                "targets.intra_view.weight=0",
                "targets.inter_view.weight=0",
            ],
            "no active target",
        ),
        (["mix.ratio=1.0"], "targets.inter_view needs image B"),
        (["train.checkpoint_every=0"], "train.checkpoint_every must be >= 1"),
        (
            ["init=/no/such/backbone.safetensors"],
            "init '/no/such/backbone.safetensors' does not exist",
        ),
        (["decoder.dim=30"], "decoder.dim (30) must be a multiple of 4 and of decoder.heads"),
        (["mix.isolate=false", "train.batch_size=63"], "mix.isolate=false needs an even"),
        (["targets.intra_view.norm=batch"], "targets.intra_view.norm must be layer or instance"),
        (["targets.inter_view.layers=3"], "targets.inter_view.layers=3 needs norm=instance"),
        (
            ["targets.intra_view.norm=instance", "targets.intra_view.layers=0"],
            "targets.intra_view.layers must be >= 1",
        ),
        (["targets.inter_view.decorrelation=-1"], "targets.inter_view.decorrelation must be >= 0"),
        (
            ["targets.view_regress.weight=1", "train.batch_size=4", "train.accum_steps=4"],
            "targets.view_regress normalises its projector with BatchNorm",
        ),
        (
            ["targets.view_contrast.weight=1", "targets.view_contrast.hidden_dim=0"],
            "targets.view_contrast.hidden_dim must be >= 1, got 0",
        ),
        (
            ["targets.view_contrast.weight=1", "targets.view_contrast.temperature=0"],
            "targets.view_contrast.temperature must be > 0",
        ),
    ],
)
def test_bad_overrides_fail_with_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("m3i", overrides=overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_preset_names_the_closest():
    with pytest.raises(ConfigError, match="unknown preset 'sueprvised'; did you mean supervised"):
        load_config("sueprvised")


def test_config_file_with_base_preset(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("base: clip\ntrain:\n  steps: 7\n")
    cfg = load_config(config_file=path)
    assert cfg.train.steps == 7 and set(cfg.active_targets()) == {"text"}
    path.write_text("train:\n  stepz: 7\n")
    with pytest.raises(ConfigError, match="train.stepz"):
        load_config(config_file=path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(config_file=tmp_path / "missing.yaml")


def test_views_section_is_the_data_view_config():
    """Same keys and defaults as the config's views section always had (written in config.yaml,
    compared on resume), and the views of the training stream follow it at the model's size."""
    assert to_dict(load_config("m3i"))["views"] == {
        "scale_min": 0.35, "scale_max": 1.0, "flip": 0.5, "color_jitter": 0.4, "hue": 0.1,
        "grayscale": 0.1,
    }  # fmt: skip
    overrides = ["views.flip=1", "model.img_size=16", "data.num_train=8", "train.batch_size=4"]
    cfg = load_config("m3i", overrides=overrides)
    assert type(cfg.views) is ViewConfig and cfg.views.flip == 1.0
    batch = next(training_stream(cfg, training_source(cfg), 0, torch.device("cpu")))
    view1, view2 = batch.views
    assert view1.image.shape == view2.image.shape == (4, 3, 16, 16)
    assert view1.flip.all() and view2.flip.all()
