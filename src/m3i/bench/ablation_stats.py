"""The ablation's numbers over seeds: mean and spread of each metric, mean ranks (of the seed
means, and within each seed), and M3I's paired differences against every other method.

Every metric is higher-is-better. Two runs of one seed share the data order and the
initialisation, so a per-seed difference compares like with like; a difference whose sign is
the same on every seed is one the seed-to-seed variation did not flip.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

SINGLE_OBJECTIVES = ("supervised", "clip", "mae", "data2vec", "siameseim")


def spread(values: list[float]) -> dict[str, float]:
    """{mean, min, max, n} of `values`."""
    return {
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def summarise(records: list[dict]) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """data -> method -> metric -> {mean, min, max, n} over seeds."""
    values: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for record in records:
        for metric, value in record["metrics"].items():
            values[record["data"]][record["method"]][metric].append(value)
    return {
        data: {
            method: {metric: spread(v) for metric, v in metrics.items()}
            for method, metrics in methods.items()
        }
        for data, methods in values.items()
    }


def rank(scores: dict[str, float]) -> dict[str, float]:
    """Each method's rank by score, 1 = highest; tied methods share the mean of their places."""
    order = sorted(scores.values(), reverse=True)
    places: dict[float, list[int]] = defaultdict(list)
    for place, score in enumerate(order, start=1):
        places[score].append(place)
    return {method: statistics.fmean(places[score]) for method, score in scores.items()}


def _column_ranks(columns: list[dict[str, float]], methods: list[str]) -> dict[str, float]:
    """Each method's rank averaged over the columns (method -> score) it was scored in."""
    ranks: dict[str, list[float]] = defaultdict(list)
    for column in columns:
        scored = {m: v for m, v in column.items() if m in methods}
        for method, place in rank(scored).items():
            ranks[method].append(place)
    return {m: statistics.fmean(r) for m, r in ranks.items()}


def mean_ranks(summary: dict, methods: list[str]) -> dict[str, float]:
    """Each method's rank of its seed mean, averaged over every (data, metric) it was scored on."""
    columns: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for data, by_method in summary.items():
        for method, by_metric in by_method.items():
            for metric, stats in by_metric.items():
                columns[(data, metric)][method] = stats["mean"]
    return _column_ranks(list(columns.values()), methods)


def seed_ranks(records: list[dict], methods: list[str]) -> dict[str, dict[str, float | list]]:
    """Each method's mean rank within each seed (its rank on every (data, metric) of that seed's
    runs, averaged), then {mean, min, max, n} over seeds, and `per_seed`: [[seed, rank], ...]."""
    columns: dict[int, dict[tuple[str, str], dict[str, float]]] = defaultdict(
        lambda: defaultdict(dict)
    )
    for record in records:
        for metric, value in record["metrics"].items():
            columns[record["seed"]][(record["data"], metric)][record["method"]] = value
    per_seed: dict[str, list[list]] = defaultdict(list)
    for seed in sorted(columns):
        for method, place in _column_ranks(list(columns[seed].values()), methods).items():
            per_seed[method].append([seed, place])
    return {
        method: {**spread([place for _, place in ranks]), "per_seed": ranks}
        for method, ranks in per_seed.items()
    }


def paired_differences(records: list[dict], reference: str = "m3i") -> dict:
    """data -> method -> metric -> M3I's value minus the method's, seed by seed: {mean, min,
    max, n} over the seeds both ran, `per_seed` ([[seed, difference], ...]) and `same_sign`
    (more than one seed and every difference of one strict sign: beyond the seed spread)."""
    runs = {(r["data"], r["method"], r["seed"]): r["metrics"] for r in records}
    differences: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for (data, method, seed), metrics in sorted(runs.items()):
        ours = runs.get((data, reference, seed))
        if method == reference or ours is None:
            continue
        for metric, value in metrics.items():
            if metric in ours:
                differences[data][method][metric].append([seed, ours[metric] - value])
    paired: dict = {}
    for data, by_method in differences.items():
        paired[data] = {}
        for method, by_metric in by_method.items():
            paired[data][method] = {}
            for metric, per_seed in by_metric.items():
                values = [d for _, d in per_seed]
                one_sign = all(d > 0 for d in values) or all(d < 0 for d in values)
                paired[data][method][metric] = {
                    **spread(values),
                    "per_seed": per_seed,
                    "same_sign": len(values) > 1 and one_sign,
                }
    return paired


def _compare(ours: dict, theirs: dict, name: str) -> str:
    """M3I's mean rank within seeds against `name`'s, in words (lower rank is better)."""
    if ours["n"] == 1 or theirs["n"] == 1:
        ahead = "ahead of" if ours["mean"] < theirs["mean"] else "not ahead of"
        return f"M3I is {ahead} {name} (one seed, so no seed spread)"
    worst, best = f"M3I's worst seed {ours['max']:.2f}", f"{name}'s best {theirs['min']:.2f}"
    if ours["max"] < theirs["min"]:
        return f"M3I is ahead of {name} by more than the seed spread ({worst} < {best})"
    if ours["mean"] < theirs["mean"]:
        return f"M3I is ahead of {name}, but not by more than the seed spread ({worst} ≥ {best})"
    if ours["min"] > theirs["max"]:
        return f"M3I is behind {name} by more than the seed spread"
    return f"M3I is not ahead of {name} (within the seed spread)"


def rank_statement(ranks: dict[str, dict], reference: str = "m3i") -> str:
    """Whether M3I's mean rank within seeds beats `multistage`'s (M3I's targets in sequence),
    `multistage_classic`'s (the classic presets in sequence) and the best single
    objective's (the single objective of lowest mean) by more than the seed spread: M3I's worst
    seed rank better than the other's best seed rank. "" without M3I's ranks."""
    if reference not in ranks:
        return ""

    def text(method: str) -> str:
        r = ranks[method]
        spread_text = f" ({r['min']:.2f}–{r['max']:.2f})" if r["n"] > 1 else ""
        return f"{method} {r['mean']:.2f}{spread_text}"

    seeds = ranks[reference]["n"]
    parts = [
        f"Mean rank within seeds (mean over {seeds} seed(s), min–max over seeds; lower is "
        f"better): {text(reference)}."
    ]
    for staged in ("multistage", "multistage_classic"):  # M3I's targets, the classic presets
        if staged in ranks:
            verdict = _compare(ranks[reference], ranks[staged], staged)
            parts.append(f"Against {text(staged)}: {verdict}.")
    singles = [m for m in SINGLE_OBJECTIVES if m in ranks]
    if singles:
        best = min(singles, key=lambda m: ranks[m]["mean"])
        parts.append(
            f"Against the best single objective, {text(best)}: "
            f"{_compare(ranks[reference], ranks[best], best)}."
        )
    return " ".join(parts)
