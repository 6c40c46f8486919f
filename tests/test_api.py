"""The public API of `import m3i`, and the snippets of docs/api.md run as written."""

import re
from pathlib import Path

import torch
from safetensors.torch import load_file

import m3i
from m3i.config import load_config
from m3i.method import M3IModel
from tests.tiny import TINY_M3I

API_DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def snippet(heading: str) -> str:
    after = API_DOC.read_text().split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", after, re.DOTALL).group(1)


def test_the_api_names_are_the_modules_own():
    assert m3i.load_config is load_config and m3i.M3IModel is M3IModel
    assert sorted(m3i.__all__) == ["M3IModel", "load_backbone", "load_config", "pretrain"]


def test_pretrain_from_python_evaluates_and_reports_as_the_cli_does(tmp_path):
    code = snippet("## The whole job").replace("runs/api", str(tmp_path / "api"))
    tiny = [*TINY_M3I, "train.steps=2", "train.batch_size=8", "data.num_train=32"]
    tiny += ["monitor.every=0", "monitor.final_eval_num_val=32"]
    code = code.replace('"train.steps=20"', ", ".join(f'"{o}"' for o in tiny))
    namespace: dict = {}
    exec(code, namespace)
    run = namespace["run"]
    assert (run / "eval.jsonl").is_file() and '"task": "knn"' in (run / "eval.jsonl").read_text()
    assert (run / "report" / "summary.md").is_file()
    weights = load_file(run / "backbone.safetensors")
    state = namespace["backbone"].state_dict()
    assert state.keys() == weights.keys()
    assert all(torch.equal(state[k], weights[k]) for k in weights)


def test_m3imodel_trains_in_a_loop_of_ones_own():
    namespace: dict = {}
    exec(snippet("## M3IModel in your own training loop"), namespace)
    model, cfg = namespace["model"], namespace["cfg"]
    # after the loop the teacher is the EMA of the student: one more update at momentum 0
    # makes it the student exactly (the update is teacher <- m teacher + (1 - m) student)
    student = model.backbone.state_dict()
    teacher = model.teacher.module.state_dict()
    assert any(not torch.equal(teacher[k], student[k]) for k in student)
    model.momentum_update(0.0)
    teacher = model.teacher.module.state_dict()
    assert all(torch.equal(teacher[k], student[k]) for k in student)
    assert torch.isfinite(namespace["loss"]) and cfg.preset == "m3i"
