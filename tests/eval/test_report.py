"""`m3i report`: figures and summary.md from synthetic run directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from matplotlib.image import imread

from m3i.eval.report import information_title, line_figure, read_run, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_run(
    root: Path,
    name: str,
    final_loss: float,
    targets: tuple[str, ...] = ("category", "text"),
    evals: list[dict] | None = None,
) -> Path:
    """A run directory like `m3i pretrain` writes: 4 logged steps, one skipped, monitors at 2, 4."""
    run = root / name
    run.mkdir(parents=True)
    config = {"preset": "m3i", "data": {"spec": "shapes"}, "train": {"steps": 4}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    records = []
    for step in (1, 2, 3, 4):
        loss = final_loss + (4 - step)
        record = {"step": step, "loss": loss, "lr": 1e-3, "momentum": 0.99, "img_per_s": 512.0}
        record["elapsed_s"] = 30.0 * step
        for target in targets:
            record |= {f"loss/{target}": loss / 2, f"mi/{target}": 0.5 * step}
        if step % 2 == 0:
            record |= {"monitor/feature_std": 0.1, "monitor/rankme": 12.5, "monitor/knn_top1": 40.0}
        records.append(record)
    records.insert(2, {"step": 3, "skipped": "non-finite loss nan"})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if evals:
        (run / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    return run


def knn(top1: float, time: str) -> dict:
    return {
        "task": "knn",
        "checkpoint": "backbone.safetensors",
        "data": "shapes",
        "metrics": {"top1": top1, "top5": 90.1},
        "time": time,
    }


def table_rows(summary: Path) -> list[dict[str, str]]:
    """The Markdown table of summary.md as one dict per row."""
    lines = [line for line in summary.read_text().splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    return [dict(zip(header, row, strict=True)) for row in rows]


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    height, width = imread(path).shape[:2]
    assert 200 <= height <= 2000 and 300 <= width <= 3000, (path, height, width)


def test_two_runs_compared_in_out(tmp_path: Path) -> None:
    evals = [knn(30.0, "2026-11-28T15:00:00"), knn(41.2, "2026-11-28T16:00:00")]
    a = make_run(tmp_path / "runs", "a", final_loss=1.25, evals=evals)
    b = make_run(tmp_path / "runs", "b", final_loss=2.5, targets=("category",))
    out = tmp_path / "report"
    written = write_report([a, str(b)], out)
    names = ["losses.png", "bounds.png", "monitors.png", "knn_time.png", "eval.png", "summary.md"]
    assert written == [out / name for name in names]
    for path in written[:-1]:
        assert_png(path)
    rows = table_rows(out / "summary.md")
    assert [row["run"] for row in rows] == ["a", "b"]
    assert [row["loss"] for row in rows] == ["1.25", "2.5"]
    assert [row["mi/text"] for row in rows] == ["2", ""]
    assert rows[0] | {"knn/top1": "41.2", "knn/top5": "90.1", "preset": "m3i"} == rows[0]
    assert rows[1]["knn/top1"] == "" and rows[1]["data"] == "shapes" and rows[1]["steps"] == "4"
    assert rows[0]["monitor/rankme"] == "12.5"
    summary = (out / "summary.md").read_text()
    assert "mi/category (lower bound), mi/text (lower bound)" in summary
    for name in names[:-1]:
        assert f"![{name[:-4]}]({name})" in summary
    assert not (a / "report").exists()


def test_without_out_each_run_gets_its_report(tmp_path: Path) -> None:
    runs = [make_run(tmp_path / "x", "run", 1.0), make_run(tmp_path / "y", "run", 2.0)]
    written = write_report(runs)
    for run in runs:
        assert (run / "report" / "summary.md") in written
        assert (run / "report" / "losses.png").stat().st_size > 0
        assert not (run / "report" / "eval.png").exists()  # no run has eval.jsonl
        assert [row["run"] for row in table_rows(run / "report" / "summary.md")] == [
            "x/run",
            "y/run",
        ]


def test_empty_metrics_writes_only_the_summary(tmp_path: Path) -> None:
    run = tmp_path / "fresh"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    assert write_report([run], tmp_path / "out") == [tmp_path / "out" / "summary.md"]
    assert table_rows(tmp_path / "out" / "summary.md") == [
        {"run": "fresh", "preset": "", "data": "", "steps": "", "loss": ""}
    ]


def test_not_a_run_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"missing: not a run directory.*m3i pretrain"):
        write_report([tmp_path / "missing"], tmp_path / "out")


def test_information_titles_say_bound_or_estimate() -> None:
    assert information_title("mi/category") == "mi/category (lower bound)"
    assert information_title("mi/view_contrast") == "mi/view_contrast (lower bound)"
    assert information_title("mi/intra_view") == "mi/intra_view (estimate)"
    assert information_title("mi/pixels") == "mi/pixels (estimate)"
    assert information_title("mi/unknown") == "mi/unknown"


def test_knn_against_wall_clock_minutes(tmp_path: Path) -> None:
    run = read_run(make_run(tmp_path, "a", final_loss=1.0), "a")  # kNN logged at steps 2 and 4
    fig = line_figure([run], ["monitor/knn_top1"], x="elapsed_s")
    (line,) = fig.axes[0].lines
    assert list(line.get_xdata()) == [1.0, 2.0]  # 60 s and 120 s of training
    assert list(line.get_ydata()) == [40.0, 40.0]
    assert fig.axes[0].get_xlabel() == "wall-clock minutes of training"
