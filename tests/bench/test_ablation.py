"""`m3i bench ablation` end to end with the tiny budget, and its summary arithmetic by hand."""

import importlib.resources
import json
import subprocess
import sys

import pytest
import yaml
from matplotlib.image import imread
from torch.utils._python_dispatch import _disable_current_modes

from m3i.bench import ablation_compute
from m3i.bench.ablation import (
    BUDGETS,
    METHODS,
    MULTISTAGE,
    REMOVALS,
    method_config,
    plan_compute,
    tasks_for,
)
from m3i.bench.ablation_compute import matched_steps
from m3i.bench.ablation_report import write_results
from m3i.bench.ablation_stats import mean_ranks, summarise
from m3i.bench.measure import train_step_flops
from m3i.cli import main
from m3i.data.shapes import CLASSES
from m3i.method import M3IModel
from m3i.mi.targets.text import TextTarget

PROVENANCE = {"command": "m3i bench ablation", "commit": "unknown", "date": "2026-01-01T00:00:00",
              "cpu_cores": 2, "device": "CPU", "wall_s": 60.0}  # fmt: skip


def supervised_flops_by_hand(n: int, classes: int) -> int:
    """One step of the tiny budget's supervised preset, matmul by matmul: a 1-block
    vit_tiny (D 192, 3 heads of 64, MLP 768) at 32 px, patch 4 (64 patches + the class token),
    GAP, timm's linear classifier 192 -> `classes` (head=linear: the budget's category.hidden_dim
    and embed_dim are the MLP head's, unread; its bias adds no matmul). Backward: two
    matmuls per forward one (input and weight gradients), one for the patch embedding (the
    images need no gradient), five for attention (torch counts the recomputed scores)."""
    tokens, dim, mlp, heads, head_dim = 65, 192, 768, 3, 64
    patch_embed = 2 * n * 64 * (3 * 4 * 4) * dim
    attention = 2 * (2 * n * heads * tokens * tokens * head_dim)  # q @ k.T, scores @ v
    linears = 2 * n * tokens * (dim * 3 * dim + dim * dim + 2 * dim * mlp)  # qkv, proj, MLP
    linears += 2 * n * dim * classes  # the classifier
    return 2 * patch_embed + 7 * attention // 2 + 3 * linears


def mae_flops_by_hand(n: int) -> int:
    """One step of the tiny budget's mae preset, matmul by matmul, by the rules of
    `supervised_flops_by_hand` (backward: two per forward matmul, one where the input needs no
    gradient, five halves of the forward's two for attention). The patch embedding runs on all
    64 patches; the 1-block vit_tiny encodes image A's 16 kept patches (25%) + the class token,
    no image B; the decoder (dim 32, 1 block, 2 heads of 16, MLP 128) embeds those 16 tokens
    192 -> 32 and runs them with 48 <mask> queries (64 tokens); the queries' geometry (3 -> 32)
    is a constant input; the pixel head maps the 48 queries 32 -> 4 * 4 * 3. Not the Gaussian
    information estimate: a monitor of logged steps only."""
    kept, hidden, dim, mlp, heads, head_dim = 16, 48, 192, 768, 3, 64
    patch_embed = 2 * n * 64 * (3 * 4 * 4) * dim
    tokens = kept + 1  # the class token
    attention = 2 * (2 * n * heads * tokens * tokens * head_dim)
    linears = 2 * n * tokens * (dim * 3 * dim + dim * dim + 2 * dim * mlp)
    d_dim, d_tokens, d_heads = 32, kept + hidden, 2
    attention += 2 * (2 * n * d_heads * d_tokens * d_tokens * (d_dim // d_heads))
    linears += 2 * n * kept * dim * d_dim  # the decoder's embedding of the encoder's tokens
    linears += 2 * n * d_tokens * (d_dim * 3 * d_dim + d_dim * d_dim + 2 * d_dim * 4 * d_dim)
    linears += 2 * n * hidden * d_dim * (4 * 4 * 3)  # the pixel head
    geometry = 2 * n * 3 * d_dim  # no input gradient: forward and the weight's gradient
    return 2 * patch_embed + 2 * geometry + 7 * attention // 2 + 3 * linears


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
    zeroshot = {r["method"] for r in results["runs"] if "zeroshot" in str(r["metrics"])}
    assert zeroshot == {"clip", "multistage", "multistage_classic", "m3i"}  # a text target each
    m3i = next(r for r in results["runs"] if r["method"] == "m3i")
    assert set(m3i["mi"]) == {"category", "text", "intra_view", "inter_view"}
    assert_equal_flops(results["runs"])
    runs = {r["method"]: r for r in results["runs"]}
    assert runs["m3i"]["steps"] == 8 and results["equal"] == "flops"
    assert results["flop_budget"] == {"shapes": runs["m3i"]["train_flops"]}
    assert runs["mae"]["flops_per_step"] == mae_flops_by_hand(16)
    for record in results["runs"]:  # M3I's training FLOPs over each run's own cost per step
        if record["method"] not in ("random", *MULTISTAGE):
            steps = round(runs["m3i"]["train_flops"] / record["flops_per_step"])
            assert record["steps"] == steps, record["method"]
            assert record["train_flops"] == steps * record["flops_per_step"], record["method"]
    for staged in MULTISTAGE:
        spent, stages = 0, runs[staged]["stages"]
        for done, stage in enumerate(stages, start=1):  # equal shares, the rounding carried
            share = runs["m3i"]["train_flops"] * done / len(stages) - spent
            assert stage["steps"] == round(share / stage["flops_per_step"]), stage["preset"]
            spent += stage["steps"] * stage["flops_per_step"]
    supervised = runs["supervised"]
    assert supervised["flops_per_step"] == supervised_flops_by_hand(16, len(CLASSES))
    assert supervised["train_flops"] == supervised["steps"] * supervised["flops_per_step"]
    assert supervised["steps"] > 8  # a supervised step is cheaper than an M3I step
    kinds = ["intra_view", "inter_view", "category", "text"]  # M3I's own targets, one a stage
    names = {"multistage": [f"m3i:{kind}" for kind in kinds],
             "multistage_classic": ["data2vec", "siameseim", "supervised", "clip"]}  # fmt: skip
    markdown = (tmp_path / "results.md").read_text()
    for staged, presets in names.items():
        stages = runs[staged]["stages"]
        assert [s["preset"] for s in stages] == presets
        assert sum(s["steps"] for s in stages) == runs[staged]["steps"]
        for stage in stages:  # a quarter of the FLOPs each
            assert within(stage["train_flops"], runs["m3i"]["train_flops"] / 4, 0.3)
        steps = "+".join(str(s["steps"]) for s in stages)
        assert f"| shapes | {staged} | {steps} |" in markdown
    for stage in runs["multistage_classic"]["stages"]:  # each its own preset's cost per step
        assert stage["flops_per_step"] == runs[stage["preset"]]["flops_per_step"]
    stage_dirs = sorted((tmp_path / "shapes" / "seed0" / "multistage" / "stages").iterdir())
    assert [p.name for p in stage_dirs] == [f"{i}-m3i-{kind}" for i, kind in enumerate(kinds)]
    classic_dir = tmp_path / "shapes" / "seed0" / "multistage_classic" / "stages" / "0-data2vec"
    assert classic_dir.is_dir()
    assert markdown.split("\n\n")[2].startswith("Equal training FLOPs: every trained run spends")
    assert markdown.strip() in out or markdown.splitlines()[0] in out
    for method in METHODS:
        assert f"| {method} |" in markdown
    assert imread(tmp_path / "ablation.png").shape[0] > 100


def test_smoke_budget_end_to_end(tmp_path):
    """The real `--budget smoke` (quick's plan, smaller: minutes): both data specs, the
    removals on shapes, every task, the files."""
    command = [sys.executable, "-m", "m3i", "bench", "ablation", "--budget", "smoke"]
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
        expected = tasks_for(record["method"], record["data"], BUDGETS["smoke"])
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


def test_flop_plan_of_two_methods_with_different_targets_by_hand():
    """The plan gives each method its own step's FLOPs (supervised and mae, counted by hand) and
    the steps that spend M3I's 8 steps of FLOPs, rounded to the nearest: a plan that swaps two
    methods' counts or steps, or counts a step with another method's targets, fails."""
    budget = BUDGETS["tiny"]
    plans, flop_budget = plan_compute(budget, "shapes", ["supervised", "mae", "m3i"], "flops")
    m3i_step = train_step_flops(method_config("m3i", "shapes", 0, budget))
    assert [(s.preset, s.steps, s.flops_per_step) for s in plans["m3i"]] == [("m3i", 8, m3i_step)]
    assert flop_budget == 8 * m3i_step
    by_hand = {
        "supervised": supervised_flops_by_hand(16, len(CLASSES)),
        "mae": mae_flops_by_hand(16),
    }
    for method, flops in by_hand.items():
        (stage,) = plans[method]
        assert (stage.preset, stage.flops_per_step) == (method, flops)
        assert stage.steps == round(8 * m3i_step / flops), method
        assert stage.train_flops == stage.steps * flops


def test_m3i_step_flops_hold_the_teachers_forward_on_both_views_and_one_text_forward(
    monkeypatch,
):
    """M3I's counted step holds its EMA teacher's forward on view 1 (intra-view target) and on
    view 2 (inter-view), and one forward of the text tower over the batch's captions: run
    uncounted, they take out two forwards of the tiny budget's 1-block vit_tiny on 16 whole views
    (64 patches + the class token) and one of its text tower (16 captions of 8 tokens, width 16,
    2 heads of 8, MLP 64, projection 16 -> 8)."""
    n, tokens, dim, mlp, heads, head_dim = 16, 65, 192, 768, 3, 64
    teacher = 2 * n * 64 * (3 * 4 * 4) * dim + 2 * (2 * n * heads * tokens * tokens * head_dim)
    teacher += 2 * n * tokens * (dim * 3 * dim + dim * dim + 2 * dim * mlp)
    text = 2 * (2 * n * 2 * 8 * 8 * 8) + 2 * n * 8 * (16 * 3 * 16 + 16 * 16 + 2 * 16 * 64)
    text += 2 * n * 16 * 8
    cfg = method_config("m3i", "shapes", 0, BUDGETS["tiny"])
    counted = train_step_flops(cfg)
    for owner, name in ((M3IModel, "_teach"), (TextTarget, "encode_text")):
        monkeypatch.setattr(owner, name, uncounted(getattr(owner, name)))
    assert counted - train_step_flops(cfg) == 2 * teacher + text


def uncounted(method):
    """`method` run outside any FLOP counter (its backward, if any, is still counted)."""

    def run(*args, **kwargs):
        with _disable_current_modes():
            return method(*args, **kwargs)

    return run


# a stand-in FLOP count per step: these "FLOPs" for each target a config trains (weight != 0);
# every sum of them is distinct, and each of M3I's four is over a fifth of their sum (so every
# trained run gets 10 steps or more, within the plan's 5% of M3I's FLOPs)
TARGET_COST = {"category": 20, "text": 21, "intra_view": 23, "inter_view": 26, "pixels": 27,
               "view_contrast": 25, "view_regress": 24}  # fmt: skip


def test_every_run_is_planned_with_its_own_targets_count(monkeypatch):
    """plan_compute with a stand-in FLOP counter that says which targets the counted config
    trains: every method and every M3I-minus-one run gets the count of the targets its preset
    file lists (less the removed one), and the steps that spend M3I's 8 steps of it; a plan
    that counts one run's step with another's targets (e.g. a cache key without the targets),
    or gives it another run's steps, fails."""

    def stand_in(cfg) -> int:
        return sum(cost for name, cost in TARGET_COST.items()
                   if getattr(cfg.targets, name).weight != 0)  # fmt: skip

    monkeypatch.setattr(ablation_compute, "train_step_flops", stand_in)
    presets = importlib.resources.files("m3i") / "presets"

    def listed(preset: str) -> set[str]:
        targets = yaml.safe_load((presets / f"{preset}.yaml").read_text())["targets"]
        return {name for name, values in targets.items() if values.get("weight", 0) != 0}

    single = [m for m in METHODS if m not in MULTISTAGE]
    plans, flop_budget = plan_compute(BUDGETS["tiny"], "shapes", [*single, *REMOVALS], "flops")
    m3i_step = sum(TARGET_COST[name] for name in listed("m3i"))
    assert flop_budget == 8 * m3i_step
    for method, plan in plans.items():
        trained = listed(method if method in single and method != "random" else "m3i")
        if method in REMOVALS:
            trained.remove(method.removeprefix("m3i-"))
        flops = sum(TARGET_COST[name] for name in trained)
        steps = 0 if method == "random" else round(8 * m3i_step / flops)
        assert [(s.steps, s.flops_per_step) for s in plan] == [(steps, flops)], method


def test_every_stage_is_planned_with_its_own_target_count(monkeypatch):
    """The stand-in counter on the staged runs: each stage of `multistage` counts the one M3I
    target it trains (a stage counted with all four would cost 90), each stage of
    `multistage_classic` its preset's, and each stage spends a quarter of M3I's 8 steps of the
    budget, to within one of its steps."""
    monkeypatch.setattr(
        ablation_compute,
        "train_step_flops",
        lambda cfg: sum(c for n, c in TARGET_COST.items() if getattr(cfg.targets, n).weight != 0),
    )
    plans, flop_budget = plan_compute(BUDGETS["tiny"], "shapes", list(MULTISTAGE), "flops")
    assert flop_budget == 8 * (20 + 21 + 23 + 26)
    # intra_view, inter_view, category, text; data2vec, siameseim, supervised, clip
    assert [s.flops_per_step for s in plans["multistage"]] == [23, 26, 20, 21]
    assert [s.flops_per_step for s in plans["multistage_classic"]] == [23, 26, 20, 21]
    for plan in plans.values():
        for stage in plan:
            assert abs(stage.steps * stage.flops_per_step - flop_budget / 4) <= stage.flops_per_step


def test_equal_steps_gives_every_method_the_budget_steps():
    plans, budget_flops = plan_compute(BUDGETS["tiny"], "shapes", list(METHODS), "steps")
    steps = {m: [s.steps for s in plan] for m, plan in plans.items()}
    assert steps == {m: [8] for m in METHODS if m not in ("random", *MULTISTAGE)} | {
        "random": [0],
        "multistage": [2, 2, 2, 2],
        "multistage_classic": [2, 2, 2, 2],
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
