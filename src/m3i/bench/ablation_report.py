"""The ablation's outputs: results.json, results.md (what compute was equal, mean and spread
over seeds, best in bold, mean rank, steps and training FLOPs per run) and ablation.png."""

from __future__ import annotations

import io
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from m3i.io import atomic_write, atomic_write_text
from m3i.mi.targets import information


def summarise(records: list[dict]) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """data -> method -> metric -> {mean, min, max, n} over seeds."""
    values: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for record in records:
        for metric, value in record["metrics"].items():
            values[record["data"]][record["method"]][metric].append(value)
    return {
        data: {
            method: {
                metric: {"mean": statistics.fmean(v), "min": min(v), "max": max(v), "n": len(v)}
                for metric, v in metrics.items()
            }
            for method, metrics in methods.items()
        }
        for data, methods in values.items()
    }


def mean_ranks(summary: dict, methods: list[str]) -> dict[str, float]:
    """Each method's rank (1 = best mean) averaged over every (data, metric) it was scored on."""
    ranks: dict[str, list[int]] = defaultdict(list)
    for by_method in summary.values():
        metrics = {m for method in methods for m in by_method.get(method, {})}
        for metric in metrics:
            scored = [m for m in methods if metric in by_method.get(m, {})]
            order = sorted(scored, key=lambda m: -by_method[m][metric]["mean"])
            for place, method in enumerate(order, start=1):
                ranks[method].append(place)
    return {m: statistics.fmean(r) for m, r in ranks.items()}


def _cell(stats: dict[str, float] | None, best: bool) -> str:
    if stats is None:
        return ""
    text = f"{stats['mean']:.1f}"
    if stats["n"] > 1:
        text += f" ({stats['min']:.1f}–{stats['max']:.1f})"
    return f"**{text}**" if best else text


def table(summary: dict, records: list[dict], methods: list[str]) -> str:
    """One Markdown table per data spec: rows = methods, columns = metrics, best in bold."""
    ranks = mean_ranks(summary, methods)
    cost = defaultdict(list)
    for record in records:
        if record["img_per_s"]:
            cost[(record["data"], record["method"])].append(record["img_per_s"])
    parts = []
    for data, by_method in summary.items():
        rows = [m for m in methods if m in by_method]
        metrics = sorted({k for m in rows for k in by_method[m]})
        best = {k: max(by_method[m][k]["mean"] for m in rows if k in by_method[m]) for k in metrics}
        lines = [
            f"**{data}** (mean over seeds, min–max in brackets; mean rank over all data)",
            "",
            "| method | " + " | ".join(metrics) + " | mean rank | img/s |",
            "|---" * (len(metrics) + 3) + "|",
        ]
        for method in rows:
            cells = [
                _cell(by_method[method].get(k), by_method[method].get(k, {}).get("mean") == best[k])
                for k in metrics
            ]
            speed = cost.get((data, method))
            rate = f"{statistics.fmean(speed):.0f}" if speed else "–"
            lines.append(
                f"| {method} | " + " | ".join(cells) + f" | {ranks[method]:.2f} | {rate} |"
            )
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def bounds_table(records: list[dict], methods: list[str]) -> str:
    """The final information figure of each target (nats, mean over seeds), per method; each
    column says whether it is a lower bound (Boltzmann) or an estimate (Gaussian family)."""
    bounds: dict = defaultdict(lambda: defaultdict(list))
    for record in records:
        for target, value in record["mi"].items():
            if value is None:  # undefined for that batch (null in metrics.jsonl)
                continue
            bounds[(record["data"], record["method"])][target].append(value)
    targets = sorted({t for b in bounds.values() for t in b})
    kinds = information()
    names = [f"{t} ({kinds[t]})" if t in kinds else t for t in targets]
    lines = ["| data | method | " + " | ".join(names) + " |", "|---" * (len(targets) + 2) + "|"]
    for (data, method), by_target in bounds.items():
        if method in methods:
            cells = [
                f"{statistics.fmean(by_target[t]):.2f}" if t in by_target else "" for t in targets
            ]
            lines.append(f"| {data} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compute_statement(report: dict[str, Any]) -> str:
    """What "equal compute" means in this report, with each data spec's FLOP budget."""
    m3i = {r["data"]: r for r in report["runs"] if r["method"] == "m3i"}
    budgets = ", ".join(
        f"{data}: {flops / 1e9:.4g} GFLOP = {m3i[data]['steps']} steps × "
        f"{m3i[data]['flops_per_step'] / 1e9:.4g} GFLOP"
        for data, flops in report["flop_budget"].items()
        if data in m3i
    )
    what = (
        "training FLOPs are matmul-class FLOPs of forward and backward (student, EMA teacher, "
        "heads, decoder, text encoder), counted on one real step of each method"
    )
    if report["equal"] == "flops":
        return (
            f"Equal training FLOPs: every trained run spends M3I's training FLOPs at the "
            f"budget's steps within 5% ({budgets}); methods with cheaper steps take more of "
            f"them, and multistage gives each stage an equal share; {what}."
        )
    return (
        f"Equal steps: every method trains the budget's steps, so training FLOPs differ (see "
        f"the table below; M3I's: {budgets}); {what}."
    )


def compute_table(records: list[dict], methods: list[str]) -> str:
    """Steps and training FLOPs of each (data, method), against M3I's on the same data."""
    first = {}
    for record in records:
        first.setdefault((record["data"], record["method"]), record)
    lines = [
        "| data | method | steps | GFLOP/step | train GFLOP | / M3I |",
        "|---" * 6 + "|",
    ]
    for (data, method), record in first.items():
        if method not in methods:
            continue
        stages = record.get("stages")
        steps = "+".join(str(s["steps"]) for s in stages) if stages else str(record["steps"])
        per_step = (
            "/".join(f"{s['flops_per_step'] / 1e9:.3g}" for s in stages)
            if stages
            else f"{record['flops_per_step'] / 1e9:.3g}"
        )
        reference = first.get((data, "m3i"), {}).get("train_flops")
        ratio = f"{record['train_flops'] / reference:.3f}" if reference else "–"
        lines.append(
            f"| {data} | {method} | {steps} | {per_step} | "
            f"{record['train_flops'] / 1e9:.4g} | {ratio} |"
        )
    return "\n".join(lines)


def figure(summary: dict, methods: list[str]) -> bytes:
    """Grouped bars: one panel per data spec, one group per metric, one bar per method."""
    fig = Figure(figsize=(12, 4 * len(summary)))
    for row, (data, by_method) in enumerate(summary.items(), start=1):
        ax = fig.add_subplot(len(summary), 1, row)
        rows = [m for m in methods if m in by_method]
        metrics = sorted({k for m in rows for k in by_method[m]})
        width = 0.8 / max(len(rows), 1)
        for i, method in enumerate(rows):
            xs = [j + i * width for j, k in enumerate(metrics) if k in by_method[method]]
            ys = [by_method[method][k]["mean"] for k in metrics if k in by_method[method]]
            ax.bar(xs, ys, width, label=method)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))], metrics, rotation=20)
        ax.set_title(data)
        ax.set_ylabel("%")
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def write_results(out: Path, report: dict[str, Any], methods: list[str], removals: list[str]):
    """results.json, results.md and ablation.png under `out`; returns the Markdown."""
    records = report["runs"]
    summary = summarise(records)
    removals = [m for m in removals if any(r["method"] == m for r in records)]
    removal_data = {r["data"] for r in records if r["method"] in removals}
    removal_records = [
        r for r in records if r["method"] in ["m3i", *removals] and r["data"] in removal_data
    ]
    markdown = "\n\n".join(
        [
            f"# m3i bench ablation: budget {report['budget']}",
            compute_statement(report),
            table(summary, records, methods),
            "## M3I minus one target",
            table(
                summarise(removal_records),
                removal_records,
                ["m3i", *removals],
            ),  # fmt: skip
            "## Final information per target (nats): lower bounds and Gaussian estimates",
            bounds_table(records, methods + removals),
            "## Training compute (steps and FLOPs per run)",
            compute_table(records, methods + removals),
            "![ablation](ablation.png)",
        ]
    )
    atomic_write_text(out / "results.json", json.dumps({**report, "summary": summary}, indent=1))
    atomic_write_text(out / "results.md", markdown + "\n")
    png = figure(summary, methods)
    atomic_write(out / "ablation.png", lambda tmp: Path(tmp).write_bytes(png))
    return markdown
