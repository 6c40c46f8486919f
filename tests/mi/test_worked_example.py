"""The worked example of docs/architecture.md: a new target is one file plus a preset. The doc
shows tests/plugins/colour.py and colour.yaml verbatim; registered from here, with no other
file changed, the target is configured, checked, built, trained and logged like the others."""

import importlib
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

from m3i.cli import main
from m3i.config import ConfigError, config_from_dict, load_config
from m3i.data.batch import collate
from m3i.data.specs import open_source
from m3i.data.views import ViewDataset
from m3i.mi.targets import TARGETS, information
from m3i.train.build import build_model
from m3i.train.pretrain import pretrain
from tests.tiny import TINY_M3I

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "tests" / "plugins" / "colour.py"
PRESET = ROOT / "tests" / "plugins" / "colour.yaml"
TINY = [*TINY_M3I, "model.img_size=16", "model.patch_size=4", "targets.text.vocab_size=100"]


def doc_blocks(language: str) -> list[str]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


def test_the_doc_shows_the_example_files_verbatim():
    assert PLUGIN.read_text() in doc_blocks("python")
    assert PRESET.read_text() in doc_blocks("yaml")


@pytest.fixture
def colour():
    """The plug-in registered by importing its file, and the registry as it was afterwards."""
    before = dict(TARGETS)
    assert "colour" not in before  # nothing in the package knows it
    sys.modules.pop("tests.plugins.colour", None)
    module = importlib.import_module("tests.plugins.colour")
    yield module
    TARGETS.clear()
    TARGETS.update(before)
    sys.modules.pop("tests.plugins.colour", None)


def test_the_preset_configures_and_checks_the_new_target(colour):
    cfg = load_config(config_file=PRESET, overrides=TINY)
    assert list(cfg.active_targets()) == ["category", "text", "intra_view", "inter_view", "colour"]
    assert cfg.targets.colour == colour.ColourTargetConfig(weight=0.5)
    assert information()["colour"] == "estimate"
    with pytest.raises(ConfigError, match="targets.colour.hidden_dim must be >= 0"):
        load_config(config_file=PRESET, overrides=["targets.colour.hidden_dim=-1"])
    with pytest.raises(ConfigError, match="did you mean 'targets.colour.hidden_dim'"):
        load_config(config_file=PRESET, overrides=["targets.colour.hiden_dim=4"])


def test_the_new_targets_loss_is_the_mse_to_each_views_mean_colour(colour):
    cfg = load_config(config_file=PRESET, overrides=TINY)
    source = open_source("shapes", "train", num_samples=8, image_size=16)
    torch.manual_seed(0)
    model = build_model(cfg, source)
    batch = collate(
        [ViewDataset(source, cfg.views, cfg.model.img_size, seed=0)[i] for i in range(4)]
    )
    ctx = model.encode(batch)
    target = model.targets["colour"]
    by_hand = []
    for stream in ctx.streams.values():  # the pooled tokens of each image, its view's mean RGB
        for row, sample in enumerate(stream.samples.tolist()):
            image = batch.views[0].image[sample]
            mean = torch.stack([image[c].sum() / image[c].numel() for c in range(3)])
            error = target.head(stream.tokens[row].mean(dim=0)) - mean
            by_hand.append((error**2).mean())
    torch.testing.assert_close(target(ctx).loss, torch.stack(by_hand).mean())


def test_pretrain_trains_and_logs_the_new_target(colour, tmp_path):
    run = [*TINY, "data.num_train=16", "train.batch_size=8", "train.steps=2", "train.log_every=1"]
    run += ["monitor.every=0", "monitor.final_eval=[]", "monitor.tensorboard=false"]
    pretrain(load_config(config_file=PRESET, overrides=run), tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss/colour" in r]
    assert len(logged) == 2 and all(r["loss/colour"] > 0 for r in logged)


@pytest.fixture
def fresh_registry():
    """The registry without the plug-in, and afterwards as it was: the plug-in module imported
    from its file by the config loader is forgotten too."""
    before = dict(TARGETS)
    yield
    TARGETS.clear()
    TARGETS.update(before)
    for name, module in list(sys.modules.items()):
        if getattr(module, "__file__", None) and Path(module.__file__).resolve() == PLUGIN:
            del sys.modules[name]


def test_the_preset_names_its_plugin_and_the_command_line_trains_it(fresh_registry, tmp_path):
    run = [*TINY, "data.num_train=16", "train.batch_size=8", "train.steps=2", "train.log_every=1"]
    run += ["monitor.every=0", "monitor.final_eval=[]", "monitor.tensorboard=false"]
    args = ["pretrain", "--config", str(PRESET), "--out", str(tmp_path / "run"), "--quiet"]
    assert main(args + [arg for override in run for arg in ("--set", override)]) == 0
    records = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert sum("loss/colour" in json.loads(line) for line in records) == 2
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["plugins"] == [str(PLUGIN)]  # absolute: the run reloads from anywhere
    TARGETS.pop("colour")  # a new process: the saved config imports the plug-in again
    for name, module in list(sys.modules.items()):
        if getattr(module, "__file__", None) and Path(module.__file__).resolve() == PLUGIN:
            del sys.modules[name]
    assert config_from_dict(saved).targets.colour.weight == 0.5


def test_a_plugin_is_named_in_a_config_file_only_and_a_missing_one_is_one_line(
    fresh_registry, tmp_path
):
    with pytest.raises(ConfigError, match=r"must be named in a config file \(--config\)"):
        load_config("m3i", overrides=["plugins=[elsewhere.py]"])
    missing = tmp_path / "missing.yaml"
    missing.write_text("base: m3i\nplugins: [nowhere.py]\n")
    with pytest.raises(ConfigError, match=r"^plugin '.*nowhere\.py': no such file; give a \.py"):
        load_config(config_file=missing)
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('needs a GPU')\n")
    missing.write_text("base: m3i\nplugins: [broken.py, no_such_module_m3i]\n")
    with pytest.raises(ConfigError, match=r"failed to import: RuntimeError: needs a GPU$"):
        load_config(config_file=missing)
    missing.write_text("base: m3i\nplugins: [no_such_module_m3i]\n")
    with pytest.raises(ConfigError, match="plugin 'no_such_module_m3i': no such module"):
        load_config(config_file=missing)
