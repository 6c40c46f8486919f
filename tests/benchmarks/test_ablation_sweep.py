"""benchmarks/ablation_sweep.py: tiny variants pre-trained and evaluated on another shapes set."""

import json
import os
import subprocess
import sys
from pathlib import Path

from m3i.bench.ablation import BUDGETS
from m3i.eval.settings import load_settings
from m3i.eval.tasks import evaluate

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def sweep(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "benchmarks" / "ablation_sweep.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)


def test_tiny_sweep_writes_one_line_per_variant(tmp_path):
    done = sweep("--budget", "tiny", "--device", "cpu", "--out", str(tmp_path),
                 "m3i+mix:mix.ratio=0.75", "supervised")  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["name"] for r in lines] == ["m3i+mix", "supervised"]
    assert lines[0]["overrides"] == ["mix.ratio=0.75"]
    for record in lines:
        assert {k.split("/")[0] for k in record["metrics"]} == {"knn", "linear", "segment"}
        assert all(0 <= v <= 100 for v in record["metrics"].values())
    saved = (tmp_path / "sweep.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in saved] == lines
    # the override reached the run's config; nothing was recorded beside the run
    assert "ratio: 0.75" in (tmp_path / "m3i+mix" / "config.yaml").read_text()
    assert not (tmp_path / "m3i+mix" / "eval.jsonl").exists()
    # the evaluation is the one of shapes data seed 1 (not the reported seed-0 val split)
    settings = load_settings(BUDGETS["tiny"].evaluation + ["data_seed=1", "device=cpu"])
    knn = evaluate(["knn"], tmp_path / "supervised", "shapes", settings, record=False)[0]
    assert round(knn["metrics"]["top1"], 2) == lines[1]["metrics"]["knn/top1"]


def test_the_reported_val_split_is_refused(tmp_path):
    done = sweep("--data-seed", "0", "--out", str(tmp_path), "m3i")
    assert done.returncode != 0 and "--data-seed 0" in done.stderr
