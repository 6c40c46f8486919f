"""`m3i bench ablation` end to end with the tiny budget, and its summary arithmetic by hand."""

import json
import subprocess
import sys

import pytest
from matplotlib.image import imread

from m3i.bench.ablation import BUDGETS, METHODS, REMOVALS, tasks_for
from m3i.bench.ablation_report import mean_ranks, summarise, write_results
from m3i.cli import main


def test_tiny_ablation_writes_results(tmp_path, capsys):
    assert main(["bench", "ablation", "--budget", "tiny", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in results["runs"]] == list(METHODS)
    for record in results["runs"]:
        expected = tasks_for(record["method"], "shapes", BUDGETS["tiny"])
        assert {k.split("/")[0] for k in record["metrics"]} == set(expected)
        assert all(0 <= v <= 100 for v in record["metrics"].values())
    m3i = next(r for r in results["runs"] if r["method"] == "m3i")
    assert set(m3i["mi"]) == {"category", "text", "intra_view", "inter_view"}
    markdown = (tmp_path / "results.md").read_text()
    assert markdown.strip() in out or markdown.splitlines()[0] in out
    for method in METHODS:
        assert f"| {method} |" in markdown
    assert imread(tmp_path / "ablation.png").shape[0] > 100


def test_quick_budget_in_ci(tmp_path):
    """The real `--budget quick` (minutes): both data specs, the removals on shapes, the files."""
    command = [sys.executable, "-m", "m3i", "bench", "ablation", "--budget", "quick"]
    done = subprocess.run(
        [*command, "--out", str(tmp_path)], capture_output=True, text=True, timeout=1500
    )
    assert done.returncode == 0, done.stderr[-2000:]
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    plan = {(r["data"], r["method"]) for r in runs}
    assert plan == {("shapes", m) for m in [*METHODS, *REMOVALS]} | {
        ("fashion-mnist", m) for m in METHODS
    }
    for record in runs:
        expected = tasks_for(record["method"], record["data"], BUDGETS["quick"])
        assert {k.split("/")[0] for k in record["metrics"]} == set(expected)
    markdown = (tmp_path / "results.md").read_text()
    assert "## M3I minus one target" in markdown and "**fashion-mnist**" in markdown
    assert imread(tmp_path / "ablation.png").shape[0] > 100


def test_summary_and_mean_rank_by_hand():
    records = [
        {"data": "d", "method": "a", "metrics": {"x": 10.0, "y": 1.0}},
        {"data": "d", "method": "a", "metrics": {"x": 20.0, "y": 3.0}},
        {"data": "d", "method": "b", "metrics": {"x": 12.0, "y": 5.0}},
    ]
    summary = summarise(records)
    assert summary["d"]["a"]["x"] == {"mean": 15.0, "min": 10.0, "max": 20.0, "n": 2}
    # x: a (15) first, b (12) second; y: b (5) first, a (2) second -> both rank 1.5
    assert mean_ranks(summary, ["a", "b"]) == pytest.approx({"a": 1.5, "b": 1.5})


def test_removal_table_only_where_removals_ran(tmp_path):
    def run(data, method, top1):
        return {"data": data, "method": method, "seed": 0, "metrics": {"knn/top1": top1},
                "mi": {}, "train_s": 1.0, "img_per_s": 10.0}  # fmt: skip

    records = [run("shapes", "m3i", 30.0), run("shapes", "m3i-text", 20.0)]
    records += [run("fashion-mnist", "m3i", 50.0), run("fashion-mnist", "clip", 40.0)]
    report = {"budget": "x", "wall_s": 1.0, "runs": records}
    markdown = write_results(tmp_path, report, ["clip", "m3i"], ["m3i-text", "m3i-category"])
    removal_part = markdown.split("## M3I minus one target")[1].split("## Final")[0]
    assert "**shapes**" in removal_part and "fashion-mnist" not in removal_part
    assert "| m3i-text | 20.0 |" in removal_part and "m3i-category" not in removal_part
    assert "| m3i | **30.0** |" in removal_part


def test_information_table_says_bound_or_estimate(tmp_path):
    records = [
        {"data": "shapes", "method": "m3i", "seed": seed, "metrics": {"knn/top1": 30.0},
         "mi": {"category": 0.25 + seed, "intra_view": 4.0}, "train_s": 1.0, "img_per_s": 10.0}
        for seed in (0, 1)
    ]  # fmt: skip
    markdown = write_results(tmp_path, {"budget": "x", "wall_s": 1.0, "runs": records}, ["m3i"], [])
    table = markdown.split("## Final information per target (nats)")[1]
    assert "| data | method | category (lower bound) | intra_view (estimate) |" in table
    assert "| shapes | m3i | 0.75 | 4.00 |" in table


def test_bad_seed_count_is_one_line(capsys):
    assert main(["bench", "ablation", "--budget", "tiny", "--seeds", "0"]) == 2
    assert capsys.readouterr().err.startswith("m3i: error: --seeds")
