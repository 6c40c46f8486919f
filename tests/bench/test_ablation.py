"""`m3i bench ablation` end to end with the tiny budget, and its summary arithmetic by hand."""

import json
import subprocess
import sys

import pytest
from matplotlib.image import imread

from m3i.bench.ablation import BUDGETS, METHODS, REMOVALS, method_config, plan_compute, tasks_for
from m3i.bench.ablation_compute import matched_steps
from m3i.bench.ablation_report import write_results
from m3i.bench.ablation_stats import mean_ranks, summarise
from m3i.bench.measure import train_step_flops
from m3i.cli import main
from m3i.data.shapes import CLASSES

PROVENANCE = {"command": "m3i bench ablation", "commit": "unknown", "date": "2026-01-01T00:00:00",
              "cpu_cores": 2, "device": "CPU", "wall_s": 60.0}  # fmt: skip


def supervised_flops_by_hand(n: int, classes: int) -> int:
    """One step of the tiny budget's supervised preset, matmul by matmul: a 1-block
    vit_tiny (D 192, 3 heads of 64, MLP 768) at 32 px, patch 4 (64 patches + the class token),
    GAP, the MLP head 192 -> 16 -> 8, logits against `classes` class embeddings. Backward: two
    matmuls per forward one (input and weight gradients), one for the patch embedding (the
    images need no gradient), five for attention (torch counts the recomputed scores)."""
    tokens, dim, mlp, heads, head_dim = 65, 192, 768, 3, 64
    patch_embed = 2 * n * 64 * (3 * 4 * 4) * dim
    attention = 2 * (2 * n * heads * tokens * tokens * head_dim)  # q @ k.T, scores @ v
    linears = 2 * n * tokens * (dim * 3 * dim + dim * dim + 2 * dim * mlp)  # qkv, proj, MLP
    linears += 2 * n * (dim * 16 + 16 * 8 + 8 * classes)  # head and logits
    return 2 * patch_embed + 7 * attention // 2 + 3 * linears


def within(flops: float, reference: float, share: float = 0.05) -> bool:
    return abs(flops / reference - 1) <= share


def assert_equal_flops(runs: list[dict]) -> None:
    """Every trained run spends M3I's training FLOPs on its data within 5%; M3I keeps the
    budget's steps; `random` trains nothing."""
    for record in runs:
        m3i = next(r for r in runs if r["method"] == "m3i" and r["data"] == record["data"])
        if record["method"] == "random":
            assert record["steps"] == record["train_flops"] == 0
        else:
            assert within(record["train_flops"], m3i["train_flops"]), record["method"]


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
    assert_equal_flops(results["runs"])
    runs = {r["method"]: r for r in results["runs"]}
    assert runs["m3i"]["steps"] == 8 and results["equal"] == "flops"
    assert results["flop_budget"] == {"shapes": runs["m3i"]["train_flops"]}
    supervised = runs["supervised"]
    assert supervised["flops_per_step"] == supervised_flops_by_hand(16, len(CLASSES))
    assert supervised["train_flops"] == supervised["steps"] * supervised["flops_per_step"]
    assert supervised["steps"] > 8  # a supervised step is cheaper than an M3I step
    stages = runs["multistage"]["stages"]
    assert [s["preset"] for s in stages] == ["data2vec", "siameseim", "supervised", "clip"]
    assert sum(s["steps"] for s in stages) == runs["multistage"]["steps"]
    for stage in stages:  # each stage has its own preset's cost per step and a quarter of the FLOPs
        assert stage["flops_per_step"] == runs[stage["preset"]]["flops_per_step"]
        assert within(stage["train_flops"], runs["m3i"]["train_flops"] / 4, 0.3)
    assert (tmp_path / "shapes" / "seed0" / "multistage" / "stages" / "0-data2vec").is_dir()
    markdown = (tmp_path / "results.md").read_text()
    assert markdown.split("\n\n")[2].startswith("Equal training FLOPs: every trained run spends")
    assert "| shapes | multistage | " + "+".join(str(s["steps"]) for s in stages) in markdown
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
    assert_equal_flops(runs)
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
    def run(data, method, top1, steps=10):
        return {"data": data, "method": method, "seed": 0, "metrics": {"knn/top1": top1},
                "mi": {}, "train_s": 1.0, "img_per_s": 10.0, "steps": steps,
                "flops_per_step": 100, "train_flops": 100 * steps}  # fmt: skip

    records = [run("shapes", "m3i", 30.0), run("shapes", "m3i-text", 20.0)]
    records += [run("fashion-mnist", "m3i", 50.0), run("fashion-mnist", "clip", 40.0, 12)]
    report = {"budget": "x", "provenance": PROVENANCE, "runs": records, "equal": "steps"}
    report["flop_budget"] = {"shapes": 1000, "fashion-mnist": 1000}
    markdown = write_results(tmp_path, report, ["clip", "m3i"], ["m3i-text", "m3i-category"])
    removal_part = markdown.split("## M3I minus one target")[1].split("## Final")[0]
    assert "**shapes**" in removal_part and "fashion-mnist" not in removal_part
    assert "| m3i-text | 20.0 |" in removal_part and "m3i-category" not in removal_part
    assert "| m3i | **30.0** |" in removal_part
    assert markdown.split("\n\n")[2].startswith("Equal steps: every method trains the budget's")
    assert "| fashion-mnist | clip | 12 | 1e-07 | 1.2e-06 | 1.200 |" in markdown


def test_matched_steps_carry_the_rounding_by_hand():
    # 120 FLOPs in three equal shares of 40: 40 / 10 = 4 steps (40 spent); (80 - 40) / 25 = 1.6
    # -> 2 (90 spent); (120 - 90) / 7 = 4.3 -> 4 (118 spent). Without the carry: 4, 2, 6 (132).
    assert matched_steps(120, [10, 25, 7]) == [4, 2, 4]
    assert matched_steps(12 * 5, [5]) == [12]


def test_step_flops_against_a_hand_count_and_the_same_for_every_seed():
    budget = BUDGETS["tiny"]
    flops = train_step_flops(method_config("supervised", "shapes", 0, budget))
    assert flops == supervised_flops_by_hand(16, len(CLASSES))
    assert train_step_flops(method_config("supervised", "shapes", 3, budget)) == flops


def test_equal_steps_gives_every_method_the_budget_steps():
    plans, budget_flops = plan_compute(BUDGETS["tiny"], "shapes", list(METHODS), "steps")
    steps = {m: [s.steps for s in plan] for m, plan in plans.items()}
    assert steps == {m: [8] for m in METHODS if m not in ("random", "multistage")} | {
        "random": [0],
        "multistage": [2, 2, 2, 2],
    }
    assert budget_flops == plans["m3i"][0].train_flops


def test_information_table_says_bound_or_estimate(tmp_path):
    records = [
        {"data": "shapes", "method": "m3i", "seed": seed, "metrics": {"knn/top1": 30.0},
         "mi": {"category": 0.25 + seed, "intra_view": 4.0, "view_regress": None},
         "train_s": 1.0, "img_per_s": 10.0, "steps": 10, "flops_per_step": 100,
         "train_flops": 1000}
        for seed in (0, 1)
    ]  # fmt: skip
    report = {"budget": "x", "provenance": PROVENANCE, "runs": records, "equal": "flops"}
    report["flop_budget"] = {"shapes": 1000}
    markdown = write_results(tmp_path, report, ["m3i"], [])
    table = markdown.split("## Final information per target (nats)")[1]
    assert "| data | method | category (lower bound) | intra_view (estimate) |" in table
    assert "| shapes | m3i | 0.75 | 4.00 |" in table


def test_bad_seed_count_is_one_line(capsys):
    assert main(["bench", "ablation", "--budget", "tiny", "--seeds", "0"]) == 2
    assert capsys.readouterr().err.startswith("m3i: error: --seeds")


def test_tiny_ablation_runs_every_method_on_a_convnet(tmp_path):
    convnet = ["model.name=convnext_atto", "model.img_size=32", "model.patch_size=8"]
    sets = [arg for s in convnet for arg in ("--set", s)]
    assert main(["bench", "ablation", "--budget", "tiny", "--out", str(tmp_path), *sets]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in results["runs"]] == list(METHODS)
    assert_equal_flops(results["runs"])
    for record in results["runs"]:
        expected = tasks_for(record["method"], "shapes", BUDGETS["tiny"])
        assert {k.split("/")[0] for k in record["metrics"]} == set(expected)
        config = (tmp_path / "shapes" / "seed0" / record["method"] / "config.yaml").read_text()
        assert "name: convnext_atto" in config, record["method"]
