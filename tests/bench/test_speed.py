"""`m3i bench speed --json` with a tiny budget: one JSON report with every step, consistent."""

import json

import pytest
import torch

from m3i.bench import speed
from m3i.bench.measure import count_flops
from m3i.bench.speed import OURS, PEERS, BenchSettings, bench_configs
from m3i.cli import main
from m3i.config import ConfigError

SIZES = ["model.depth=1", "model.img_size=32", "model.patch_size=8", "train.batch_size=8"]
TINY = [arg for s in SIZES for arg in ("--set", s)]


def test_bench_speed_json_reports_every_step(capsys):
    args = [*TINY, "--steps", "1", "--repeats", "2", "--set", "mix.isolate=false", "--json"]
    assert main(["bench", "speed", *args]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out.strip().splitlines()[-1])
    assert set(report["steps"]) == set(OURS) | set(PEERS)
    assert report["settings"]["overrides"] == [*SIZES, "mix.isolate=false"]
    assert report["batch_size"] == 8
    assert report["model"] == {
        "name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "depth": 1,
        "drop_path": 0.0, "attention": "separate", "freeze_patch_embed": False,
    }  # fmt: skip
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


def test_defaults_are_the_presets_own_sizes():
    """Without --set: a 6-block ViT-Tiny at 32 px with 4 px patches, batch 64 (the numbers of
    the old --model/--img-size/--patch-size/--depth/--batch defaults), for every preset."""
    for name, cfg in bench_configs(BenchSettings()).items():
        model = cfg.model
        assert (model.name, model.img_size, model.patch_size, model.depth) == (
            "vit_tiny_patch16_224", 32, 4, 6,
        ), name  # fmt: skip
        assert cfg.train.batch_size == 64, name


def test_overrides_apply_to_every_compared_preset():
    settings = BenchSettings(overrides=("model.depth=null", "train.batch_size=4", "mix.ratio=0.25"))
    configs = bench_configs(settings)
    assert set(configs) == set(OURS)
    for name, cfg in configs.items():
        assert cfg.preset == name
        assert (cfg.model.depth, cfg.train.batch_size, cfg.mix.ratio) == (None, 4, 0.25), name
    assert configs["clip"].targets.text.weight > 0 and configs["mae"].targets.pixels.weight > 0


def test_presets_on_different_backbones_are_refused(monkeypatch):
    """A preset with its own model.* would compare steps on different backbones."""
    original = speed.load_config

    def load_config(name, overrides=()):
        extra = ["model.patch_size=8"] if name == "data2vec" else []
        return original(name, overrides=[*extra, *overrides])

    monkeypatch.setattr(speed, "load_config", load_config)
    with pytest.raises(ConfigError, match="presets data2vec differ from m3i in model"):
        bench_configs(BenchSettings())


def no_work(*args, **kwargs):
    raise AssertionError("work started before the settings were checked")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "mix.isolated=false"], "unknown config key 'mix.isolated'"),
        (["--set", "train.batch_size=0"], "train.batch_size must be >= 1, got 0"),
        (["--set", "model.img_size=30"], "model.img_size (30) must be a multiple of"),
        (["--steps", "0"], "--steps and --repeats must be >= 1"),
    ],
)
def test_bad_input_is_one_line_before_any_work(capsys, monkeypatch, args, message):
    monkeypatch.setattr(speed, "matmul_tflops", no_work)
    monkeypatch.setattr(speed, "ShapesDataset", no_work)
    assert main(["bench", "speed", *args]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("m3i: error: ") and message in line, line


def test_the_old_model_flags_are_gone(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "speed", "--batch", "8"])
    assert "unrecognized arguments: --batch 8" in capsys.readouterr().err
