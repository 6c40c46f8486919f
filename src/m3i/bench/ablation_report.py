"""The ablation's outputs: results.json, results.md (where the numbers came from, what compute
was equal, mean and spread over seeds, best in bold, mean ranks, M3I's paired differences,
steps and training FLOPs per run) and ablation.png."""

from __future__ import annotations

import io
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from m3i.bench.ablation_stats import (
    mean_ranks,
    paired_differences,
    rank_statement,
    seed_ranks,
    summarise,
)
from m3i.io import atomic_write, atomic_write_text
from m3i.mi.targets import information


def _cell(stats: dict[str, float] | None, best: bool) -> str:
    if stats is None:
        return ""
    text = f"{stats['mean']:.1f}"
    if stats["n"] > 1:
        text += f" ({stats['min']:.1f}–{stats['max']:.1f})"
    return f"**{text}**" if best else text


def table(summary: dict, records: list[dict], methods: list[str]) -> str:
    """One Markdown table per data spec: rows = methods, columns = metrics, best in bold, and
    two mean ranks: of the seed means, and within each seed (mean, min–max over seeds)."""
    ranks = mean_ranks(summary, methods)
    within = seed_ranks(records, methods)
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
            f"**{data}** (mean over seeds, min–max in brackets; mean ranks over all data: of the "
            "seed means, and within each seed, then mean and min–max over seeds)",
            "",
            "| method | " + " | ".join(metrics) + " | mean rank of seed means | mean rank within "
            "seeds | img/s |",
            "|---" * (len(metrics) + 4) + "|",
        ]
        for method in rows:
            cells = [
                _cell(by_method[method].get(k), by_method[method].get(k, {}).get("mean") == best[k])
                for k in metrics
            ]
            speed = cost.get((data, method))
            rate = f"{statistics.fmean(speed):.0f}" if speed else "–"
            seeds = within[method]
            spread = f" ({seeds['min']:.2f}–{seeds['max']:.2f})" if seeds["n"] > 1 else ""
            lines.append(
                f"| {method} | " + " | ".join(cells) + f" | {ranks[method]:.2f} | "
                f"{seeds['mean']:.2f}{spread} | {rate} |"
            )
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _difference(stats: dict | None) -> str:
    """`+3.20 (+1.00 to +5.10)*`: mean, min and max over seeds, * when all of one sign."""
    if stats is None:
        return ""
    text = f"{stats['mean']:+.2f}"
    if stats["n"] > 1:
        text += f" ({stats['min']:+.2f} to {stats['max']:+.2f})"
    return text + ("*" if stats["same_sign"] else "")


def paired_table(paired: dict, methods: list[str]) -> str:
    """Per data spec, "M3I minus method": one row per method of `methods` (M3I excluded), one
    column per metric, each cell the per-seed differences' mean and min–max."""
    parts = []
    for data, by_method in paired.items():
        rows = [m for m in methods if m in by_method]
        if not rows:
            continue
        metrics = sorted({k for m in rows for k in by_method[m]})
        seeds = max(stats["n"] for m in rows for stats in by_method[m].values())
        lines = [
            f"**{data}: M3I minus method** (each seed's M3I run minus the same seed's run of "
            f"the method, same data order and initialisation; mean over {seeds} seed(s), "
            "min to max in brackets)",
            "",
            "| method | " + " | ".join(metrics) + " |",
            "|---" * (len(metrics) + 1) + "|",
        ]
        lines += [
            f"| {m} | " + " | ".join(_difference(by_method[m].get(k)) for k in metrics) + " |"
            for m in rows
        ]
        lines.append("")
        if seeds > 1:
            lines.append("\\* every seed's difference has the same sign: beyond the seed spread.")
        else:
            lines.append("One seed: the difference only, no seed spread to compare it with.")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def provenance_lines(provenance: dict[str, Any]) -> str:
    """The command, commit, date, machine and wall time, one Markdown line each (and how many
    runs a --resume kept from an earlier command, when it kept any)."""
    wall = f"- wall time: {provenance['wall_s'] / 60:.1f} min ({provenance['wall_s']:.0f} s)"
    if provenance.get("kept_runs"):
        commits = ", ".join(provenance.get("kept_commits", []))
        wall += (
            f" of this command; {provenance['kept_runs']} runs were kept from an earlier one "
            f"with the same config, settings and package files, made at commit {commits} (their "
            "own seconds are in results.json)"
        )
    return "\n".join(
        [
            f"- command: `{provenance['command']}`",
            f"- commit: {provenance['commit']}",
            f"- date: {provenance['date']}",
            f"- machine: {provenance['cpu_cores']} CPU cores, device {provenance['device']}",
            wall,
        ]
    )


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
            f"them, and each multi-stage run gives each of its stages an equal share; {what}."
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
    """results.json (the report, plus "summary", "paired" and "ranks"), results.md and
    ablation.png under `out`; returns the Markdown."""
    records = report["runs"]
    summary = summarise(records)
    paired = paired_differences(records)
    removals = [m for m in removals if any(r["method"] == m for r in records)]
    removal_data = {r["data"] for r in records if r["method"] in removals}
    removal_records = [
        r for r in records if r["method"] in ["m3i", *removals] and r["data"] in removal_data
    ]
    ranks = {
        "of_seed_means": mean_ranks(summary, methods),
        "within_seeds": seed_ranks(records, methods),
    }
    ranks["statement"] = rank_statement(ranks["within_seeds"])
    others = [m for m in methods if m != "m3i"]
    parts = [
        f"# m3i bench ablation: budget {report['budget']}",
        provenance_lines(report["provenance"]),
        compute_statement(report),
        table(summary, records, methods),
        ranks["statement"],
        "## M3I minus each method, seed by seed",
        paired_table(paired, others),
        "## M3I minus one target" if removal_records else "",
        table(summarise(removal_records), removal_records, ["m3i", *removals]),
        paired_table(paired, removals),
        "## Final information per target (nats): lower bounds and Gaussian estimates",
        bounds_table(records, methods + removals),
        "## Training compute (steps and FLOPs per run)",
        compute_table(records, methods + removals),
        "![ablation](ablation.png)",
    ]
    markdown = "\n\n".join(part for part in parts if part)
    results = {**report, "summary": summary, "paired": paired, "ranks": ranks}
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    atomic_write_text(out / "results.md", markdown + "\n")
    png = figure(summary, methods)
    atomic_write(out / "ablation.png", lambda tmp: Path(tmp).write_bytes(png))
    return markdown
