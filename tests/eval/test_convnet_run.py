"""`m3i pretrain --preset m3i_convnext` end to end: it trains, exports a backbone that timm
loads strictly from the file's own metadata, and `m3i eval` runs every task on it."""

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from m3i.cli import main
from m3i.eval.tasks import TASKS
from m3i.models.backbone import read_backbone_metadata
from tests.eval.test_tasks import check_result, eval_cli
from tests.tiny import TINY_M3I

HEADS = [s for s in TINY_M3I if not s.startswith("model.")]  # the preset's ConvNet, tiny heads


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("convnext") / "run"
    sets = [*HEADS, "data.num_train=64", "train.batch_size=16", "train.steps=4"]
    sets += ["monitor.every=0", "monitor.final_eval=[]", "monitor.tensorboard=false"]
    argv = ["pretrain", "--preset", "m3i_convnext", "--out", str(out)]
    assert main(argv + [arg for s in sets for arg in ("--set", s)]) == 0
    return out


def test_the_export_loads_strictly_into_timm_from_its_metadata(run):
    path = run / "backbone.safetensors"
    name, kwargs = read_backbone_metadata(path)
    assert (name, kwargs["output_stride"], kwargs["depths"]) == ("convnext_atto", 16, [1] * 4)
    model = timm.create_model(name, pretrained=False, **kwargs)
    model.load_state_dict(load_file(str(path)))  # strict
    assert model.forward_features(torch.zeros(1, 3, 64, 64)).shape == (1, 320, 4, 4)


@pytest.mark.parametrize("task", TASKS)
def test_every_eval_task_runs_on_the_convnet(run, capsys, task):
    assert main(eval_cli(task, run, "--json")) == 0
    check_result(json.loads(capsys.readouterr().out.strip().splitlines()[-1]), task, run)
