"""`m3i bench speed --json` with a tiny budget: one JSON report with every step, consistent."""

import json

import pytest
import torch

from m3i.bench.measure import count_flops
from m3i.bench.speed import OURS, PEERS
from m3i.cli import main

TINY = ["--depth", "1", "--img-size", "32", "--patch-size", "8", "--batch", "8"]


def test_bench_speed_json_reports_every_step(capsys):
    args = [*TINY, "--steps", "1", "--repeats", "2", "--set", "mix.isolate=false", "--json"]
    assert main(["bench", "speed", *args]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out.strip().splitlines()[-1])
    assert set(report["steps"]) == set(OURS) | set(PEERS)
    assert report["settings"]["overrides"] == ["mix.isolate=false"]
    for name, step in report["steps"].items():
        assert step["min_s"] <= step["median_s"] <= step["max_s"], name
        assert step["img_per_s"] == pytest.approx(8 / step["median_s"])
        assert step["gflop"] > 0 and 0 < step["utilisation"] < 1.5, name
        assert step["process_peak_rss_gb"] > 0.1, name  # a real process holds > 100 MB
    replaced = sum(
        report["steps"][n]["median_s"] for n in ("supervised", "clip", "data2vec", "siameseim")
    )
    assert report["m3i_over_replaced"] == pytest.approx(
        report["steps"]["m3i"]["median_s"] / replaced
    )
    # same objective, same sizes: our FLOPs and the peers' agree (within heads' differences)
    steps = report["steps"]
    assert steps["open_clip_clip"]["gflop"] == pytest.approx(steps["clip"]["gflop"], rel=0.05)
    assert steps["lightly_mae"]["gflop"] == pytest.approx(steps["mae"]["gflop"], rel=0.15)
    assert "M3I step / (supervised + clip + data2vec + siameseim)" in err
    assert "memory GB" in err
    for name in ("workers=0", "workers=2"):  # the data stream, timed on its own
        loader = report["loader"][name]
        assert loader["img_per_s"] == pytest.approx(8 / loader["s_per_batch"])


def test_count_flops_of_a_matmul_by_hand():
    a, b = torch.randn(3, 5), torch.randn(5, 7)
    assert count_flops(lambda: a @ b) == 2 * 3 * 5 * 7


def test_bad_override_is_one_line(capsys):
    assert main(["bench", "speed", "--set", "mix.isolated=false"]) == 2
    assert "unknown config key 'mix.isolated'" in capsys.readouterr().err


def test_bad_budget_is_one_line(capsys):
    assert main(["bench", "speed", "--batch", "0"]) == 2
    assert capsys.readouterr().err.strip().startswith("m3i: error: --batch")
