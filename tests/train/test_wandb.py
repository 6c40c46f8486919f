"""monitor.wandb: what a run logs to Weights & Biases, read back from its offline files with
wandb's own reader (`wandb leet inspect`), against metrics.jsonl; one W&B run across a resume;
finished as failed when the run fails; a one-line refusal when wandb is not installed."""

import json
import subprocess
import sys

import pytest
import yaml

from m3i.cli import main
from m3i.data.base import DataError
from m3i.train import trainer
from tests.tiny import TINY_M3I

pytest.importorskip("wandb")

RUN = [*TINY_M3I, "data.num_train=32", "train.batch_size=16", "train.log_every=2"]
RUN += ["monitor.every=2", "monitor.knn_train=20", "monitor.knn_val=10", "monitor.final_eval=[]"]
RUN += ["monitor.tensorboard=false", "monitor.wandb=true"]


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """wandb offline, its settings and caches in tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))


def inspect(run_dir, *flags: str) -> str:
    """What `wandb leet inspect --json` prints for one offline run directory."""
    command = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", *flags, str(run_dir)]
    return subprocess.run(command, capture_output=True, text=True, check=True, timeout=120).stdout


def summary(run_dir) -> dict:
    """The run's state, exit code, config, name, ... (`--summary`: one JSON object)."""
    return json.loads(inspect(run_dir, "--summary"))


def history(run_dir) -> dict[int, dict]:
    """{step: what was logged at it}, wandb's own entries (`_step`, `_runtime`, ...) left out."""
    lines = [json.loads(line) for line in inspect(run_dir).splitlines() if line.strip()]
    records = [r["history"] for r in lines if r["type"] == "history"]
    return {
        r.get("step", {}).get("num", 0): {
            k: v for k, v in r["item"].items() if not k.startswith("_")
        }
        for r in records
    }


def pretrain(out, *sets: str, resume: bool = False) -> int:
    where = ["--resume", str(out)] if resume else ["--out", str(out)]
    return main(["pretrain", "--quiet", *where, *[f"--set={s}" for s in sets]])


def test_wandb_gets_what_metrics_jsonl_gets_and_a_resume_continues_its_run(tmp_path):
    out = tmp_path / "run"
    configs = []  # the resolved config of each start, as its config.yaml holds it
    assert pretrain(out, *RUN, "train.steps=4") == 0
    configs.append(yaml.safe_load((out / "config.yaml").read_text()))
    assert pretrain(out, "train.steps=6", resume=True) == 0
    configs.append(yaml.safe_load((out / "config.yaml").read_text()))
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2  # the start and the resume, one W&B run id
    run_id = (out / "wandb" / "run-id").read_text()
    logged = {}
    for run_dir, config in zip(runs, configs, strict=True):
        run = summary(run_dir)
        assert (run["run_id"], run["name"], run["project"]) == (run_id, "run", "m3i")
        assert run["state"] == "finished" and run["exit_code"] == 0
        assert run["config"] == config
        logged.update(history(run_dir))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4, 6]
    expected = {
        r["step"]: {k: v for k, v in r.items() if k != "step" and v is not None} for r in records
    }
    assert logged == expected
    assert "monitor/knn_top1" in logged[0] and "loss" in logged[6]


def test_a_run_that_fails_finishes_its_wandb_run_as_failed(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise DataError("shards went away")

    monkeypatch.setattr(trainer, "training_stream", broken)  # fails after wandb.init
    out = tmp_path / "run"
    assert pretrain(out, *RUN, "train.steps=2") == 2
    run = summary(next((out / "wandb").glob("offline-run-*")))
    assert run["state"] == "failed" and run["exit_code"] == 1


def test_monitor_wandb_without_wandb_is_one_line_before_the_model_is_built(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError

    def never(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(trainer, "build_model", never)
    out = tmp_path / "run"
    assert pretrain(out, *RUN, "train.steps=2") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("m3i: error: monitor.wandb=true needs wandb")
    assert 'pip install -e ".[wandb]"' in line
    assert not out.exists()
