"""`m3i report`: plots and a Markdown summary comparing pre-training run directories."""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from m3i.io import atomic_write, atomic_write_text, writable_dir
from m3i.mi.targets import information

TRAINING = ("lr", "momentum", "img_per_s")  # plotted with the monitor/* collapse monitors


@dataclass
class Run:
    """One run directory: its config, logged (non-skipped) metrics and latest evaluations."""

    name: str
    path: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]
    steps: int | None  # the last step logged (skipped ones too), else the config's train.steps
    evals: dict[tuple[str, str], dict[str, float]]  # (task, data) -> latest metrics

    def series(self, key: str, x: str = "step") -> tuple[list[float], list[float]]:
        """`x` (the step, or e.g. `elapsed_s`) and values of `key` over the records that carry
        both."""
        points = [
            (r[x], r[key]) for r in self.records if r.get(key) is not None and r.get(x) is not None
        ]
        return [s for s, _ in points], [v for _, v in points]

    def final(self, key: str) -> float | None:
        """The last logged value of `key`, or None."""
        values = self.series(key)[1]
        return values[-1] if values else None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not a JSON line ({e.msg})") from None
    return records


def _latest_evals(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, float]]:
    """Latest metrics per (task, data), by `time` (file order breaks ties)."""
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for record in records:
        key = (str(record.get("task")), str(record.get("data")))
        if key not in latest or str(record.get("time", "")) >= str(latest[key].get("time", "")):
            latest[key] = record
    return {
        key: {m: v for m, v in r.get("metrics", {}).items() if isinstance(v, (int, float))}
        for key, r in latest.items()
    }


def read_run(path: Path, name: str) -> Run:
    """Load a run directory written by `m3i pretrain`."""
    if not (path / "metrics.jsonl").is_file():
        raise ValueError(
            f"{path}: not a run directory (no metrics.jsonl); give one written by `m3i pretrain`"
        )
    config_file = path / "config.yaml"
    config = (yaml.safe_load(config_file.read_text()) if config_file.exists() else None) or {}
    records = _read_jsonl(path / "metrics.jsonl")
    return Run(
        name=name,
        path=path,
        config=config,
        records=[r for r in records if "skipped" not in r and "step" in r],
        steps=max(
            (r["step"] for r in records if "step" in r),
            default=(config.get("train") or {}).get("steps"),
        ),
        evals=_latest_evals(_read_jsonl(path / "eval.jsonl")),
    )


def _run_names(paths: list[Path]) -> list[str]:
    """Directory names, prefixed by the parent directory where two runs share a name."""
    paths = [p.resolve() for p in paths]
    names = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


def _keys(runs: list[Run], prefix: str) -> list[str]:
    return sorted({k for run in runs for r in run.records for k in r if k.startswith(prefix)})


def _eval_columns(runs: list[Run]) -> dict[str, tuple[str, str, str]]:
    """Column name `task/metric` -> (task, data, metric); `task@data` where a task has two datas."""
    datas = Counter(task for task, _ in {pair for run in runs for pair in run.evals})
    columns = {}
    for run in runs:
        for (task, data), metrics in run.evals.items():
            label = f"{task}@{data}" if datas[task] > 1 else task
            for metric in metrics:
                columns[f"{label}/{metric}"] = (task, data, metric)
    return dict(sorted(columns.items()))


def _eval_value(run: Run, where: tuple[str, str, str]) -> float | None:
    task, data, metric = where
    return run.evals.get((task, data), {}).get(metric)


def _grid(count: int) -> tuple[Figure, list[Any]]:
    cols = min(3, count)
    rows = math.ceil(count / cols)
    fig = Figure(figsize=(4.5 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, list(axes[:count])


def information_title(key: str) -> str:
    """`mi/<target>` and what its figure is: `mi/category (lower bound)`, `mi/pixels (estimate)`."""
    kind = information().get(key.removeprefix("mi/"))
    return f"{key} ({kind})" if kind else key


def line_figure(
    runs: list[Run],
    keys: list[str],
    ylabel: str = "",
    title: Callable[[str], str] = str,
    x: str = "step",
) -> Figure | None:
    """One subplot per key (titled `title(key)`), one line per run against `x` (the step, or
    `elapsed_s` in minutes); None if nothing to plot."""
    keys = [k for k in keys if any(run.series(k, x)[0] for run in runs)]
    if not keys:
        return None
    fig, axes = _grid(len(keys))
    for ax, key in zip(axes, keys, strict=True):
        for index, run in enumerate(runs):
            xs, values = run.series(key, x)
            if xs:
                xs = [v / 60 for v in xs] if x == "elapsed_s" else xs
                marker = "." if len(xs) < 20 else None
                ax.plot(xs, values, color=f"C{index}", label=run.name, marker=marker)
        if x == "elapsed_s":
            ax.set(title=title(key), xlabel="wall-clock minutes of training", ylabel=ylabel)
        else:
            ax.set(title=title(key), xlabel="step", ylabel=ylabel)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def eval_figure(runs: list[Run]) -> Figure | None:
    """Grouped bars of the latest eval metrics: one group per column, one bar per run."""
    columns = _eval_columns(runs)
    if not columns:
        return None
    fig = Figure(
        figsize=(max(6.0, 1.2 * len(columns) * max(1, len(runs) / 2)), 4), layout="constrained"
    )
    ax = fig.subplots()
    width = 0.8 / len(runs)
    for index, run in enumerate(runs):
        xs, heights = [], []
        for x, where in enumerate(columns.values()):
            value = _eval_value(run, where)
            if value is not None:
                xs.append(x - 0.4 + width * (index + 0.5))
                heights.append(value)
        ax.bar(xs, heights, width, color=f"C{index}", label=run.name)
    ax.set_xticks(range(len(columns)), list(columns), rotation=30, ha="right")
    ax.set(title="latest evaluations")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def _fmt(value: Any) -> str:
    """Integers as is, floats with 3 significant digits (2 decimals from 100 up), None blank."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value).replace("|", "\\|")
    if isinstance(value, int):
        return str(value)
    return f"{value:.2f}" if math.isfinite(value) and abs(value) >= 100 else f"{value:.3g}"


def summary_markdown(runs: list[Run], images: list[str]) -> str:
    """A table with one row per run, then links to the written images."""
    targets = _keys(runs, "mi/")
    monitors = _keys(runs, "monitor/")
    evals = _eval_columns(runs)
    header = ["run", "preset", "data", "steps", "loss", *targets, *monitors, *evals]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        cells = [
            run.name,
            run.config.get("preset"),
            (run.config.get("data") or {}).get("spec"),
            run.steps,
            run.final("loss"),
            *(run.final(k) for k in [*targets, *monitors]),
            *(_eval_value(run, where) for where in evals.values()),
        ]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    if targets:
        kinds = ", ".join(information_title(key) for key in targets)
        lines.append(
            f"\n`mi/<target>` in nats: {kinds}; Boltzmann targets give lower bounds on the "
            "mutual information, Gaussian ones a Gaussian-channel estimate (not a bound)."
        )
    links = [f"![{Path(image).stem}]({image})" for image in images]
    return "# m3i report\n\n" + "\n".join(lines) + "\n" + "".join(f"\n{link}\n" for link in links)


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def render(runs: list[Run]) -> dict[str, bytes | str]:
    """The report's files by name: the non-empty figures as PNG bytes, then summary.md."""
    figures = {
        "losses.png": line_figure(runs, ["loss", *_keys(runs, "loss/")]),
        "bounds.png": line_figure(  # the file's old name; it holds bounds and estimates
            runs, _keys(runs, "mi/"), ylabel="information (nats)", title=information_title
        ),
        "monitors.png": line_figure(runs, [*_keys(runs, "monitor/"), *TRAINING]),
        "knn_time.png": line_figure(runs, ["monitor/knn_top1"], "%", x="elapsed_s"),
        "eval.png": eval_figure(runs),
    }
    files: dict[str, bytes | str] = {n: _png(f) for n, f in figures.items() if f is not None}
    files["summary.md"] = summary_markdown(runs, list(files))
    return files


def _write_files(files: dict[str, bytes | str], out: Path) -> list[Path]:
    for name, content in files.items():
        if isinstance(content, bytes):
            atomic_write(out / name, lambda tmp, data=content: Path(tmp).write_bytes(data))
        else:
            atomic_write_text(out / name, content)
    return [out / name for name in files]


def write_report(run_dirs: list[Path | str], out: Path | str | None = None) -> list[Path]:
    """Compare runs in one report written to `out`, or to each run's own report/ directory.

    Returns the written files. Raises ValueError for a directory without metrics.jsonl, and
    OutDirError for an output directory that cannot be written (both before any plotting).
    """
    if not run_dirs:
        raise ValueError("no run directories given; name at least one written by `m3i pretrain`")
    paths = [Path(p) for p in run_dirs]
    runs = [read_run(path, name) for path, name in zip(paths, _run_names(paths), strict=True)]
    if out is not None:
        outs = [writable_dir(out, "--out", "give a directory for the report")]
    else:
        outs = [
            writable_dir(run.path / "report", "report directory", "give another one with --out")
            for run in runs
        ]
    files = render(runs)
    return [path for directory in outs for path in _write_files(files, directory)]
