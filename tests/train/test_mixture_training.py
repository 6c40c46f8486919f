"""Training on a mixture of sources, each with one modality: the README's recipe end to end
(a labelled folder and caption shards with a truncated JPEG), exact resume after SIGKILL, the
logged draw counts, null figures for a batch without a target's samples, and the refusals."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from m3i.cli import main
from m3i.config import load_config
from m3i.train.batches import training_source, training_stream
from tests.mixture_data import caption_shards, captions_file, labelled_folder, plain_images
from tests.tiny import TINY_M3I

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TINY = [
    *TINY_M3I,
    "model.img_size=16",
    "model.patch_size=4",
    "targets.text.vocab_size=80",
    "monitor.every=0",
    "monitor.final_eval=[]",
]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    """One source per modality: labels (a folder with val/), plain images, captions, shards."""
    root = tmp_path_factory.mktemp("mix")
    return {
        "labelled": f"folder:{labelled_folder(root / 'in', {'train': 48, 'val': 24})}",
        "plain": f"images:{plain_images(root / 'plain', 40)}",
        "captioned": f"captions:{captions_file(root / 'cap', 40)}",
        "shards": caption_shards(root / "cc", 8, 4, truncated=(3,)),
    }


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def sets(values: list[str]) -> list[str]:
    return [f"--set={value}" for value in values]


def test_the_readme_recipe_runs_and_evaluates(sources, tmp_path, capsys):
    """The README's GPU recipe at toy size: ImageNet-layout folder + jpg/txt caption shards (one
    JPEG truncated), the m3i preset with weights, then its final kNN on the folder's val."""
    out = tmp_path / "run"
    argv = ["pretrain", "--quiet", "--out", str(out)]
    argv += ["--data", sources["labelled"], "--data", sources["shards"]]
    argv += sets([*TINY, "data.weights=[0.5,0.5]", "train.steps=6", "train.batch_size=8"])
    argv += sets(["train.log_every=1", 'monitor.final_eval=["knn"]', "monitor.every=3"])
    assert main(argv) == 0
    logged = records(out)
    last = logged[-1]
    assert last["step"] == 6
    assert last["data/samples/0"] + last["data/samples/1"] == 6 * 8
    assert last["data/skipped"] >= 1  # the truncated JPEG came up, was skipped and counted
    assert min(last["data/samples/0"], last["data/samples/1"]) > 0
    assert any(r.get("monitor/knn_top1") is not None for r in logged)  # the folder's val
    (result,) = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert result["task"] == "knn" and result["data"] == sources["labelled"]
    scan = json.loads((out / "data_scan.json").read_text())
    assert scan["key"]["specs"] == [sources["labelled"], sources["shards"]]
    assert len(scan["streams"][1]["captions"]) == 8  # the shards' captions: the tokenizer's
    assert [index for index, _ in scan["corrupt"][0]] == []  # the folder's images, checked
    assert "m3i: knn on " + sources["labelled"] in capsys.readouterr().out


def test_the_logged_counts_are_the_sources_of_the_batches_read(sources, tmp_path):
    """data/samples/K in metrics.jsonl against the sources of the batches the run reads (its
    stream read again; a run starting at global batch 5, as a later stage does), and each
    sample with its source's modality."""
    out = tmp_path / "run"
    values = [*TINY, "train.batch_size=8", "train.steps=6", "train.log_every=1"]
    values += ["train.first_batch=5", "data.weights=[1,2,1]"]
    argv = ["pretrain", "--quiet", "--out", str(out)]
    for name in ("labelled", "plain", "captioned"):
        argv += ["--data", sources[name]]
    assert main([*argv, *sets(values)]) == 0
    cfg = load_config(config_file=out / "config.yaml")
    stream = training_stream(cfg, training_source(cfg), 0, torch.device("cpu"))
    counts = np.zeros(3, dtype=np.int64)
    modality = {0: "label", 1: "none", 2: "caption"}
    for record, batch in zip(records(out), stream, strict=False):
        counts += np.bincount(batch.sources.numpy(), minlength=3)
        assert [record[f"data/samples/{k}"] for k in range(3)] == counts.tolist()
        for source, label, caption in zip(
            batch.sources.tolist(), batch.labels.tolist(), batch.captions, strict=True
        ):
            kind = "label" if label >= 0 else "caption" if caption else "none"
            assert kind == modality[source]  # each sample keeps its source's modality
    assert record["step"] == 6 and counts.sum() == 6 * 8


def test_a_batch_without_labels_logs_a_null_category_figure(sources, tmp_path):
    out = tmp_path / "run"
    values = [*TINY, "train.steps=12", "train.batch_size=4", "train.log_every=1"]
    values += ["data.weights=[0.1,0.9]", "targets.text.weight=0"]
    argv = ["pretrain", "--quiet", "--out", str(out), "--data", sources["labelled"]]
    argv += ["--data", sources["plain"], *sets(values)]
    assert main(argv) == 0
    cfg = load_config(config_file=out / "config.yaml")
    stream = training_stream(cfg, training_source(cfg), 0, torch.device("cpu"))
    nulls = 0
    for record, batch in zip(records(out), stream, strict=False):
        labelled = bool((batch.labels >= 0).any())
        assert (record["mi/category"] is None) == (not labelled), record
        assert record["loss/intra_view"] is not None  # the dense targets train on every batch
        nulls += record["mi/category"] is None
    assert 0 < nulls < 12  # both cases came up


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "m3i", "pretrain", "--quiet", *args]


def test_sigkill_then_resume_on_a_mixture_gives_the_same_weights(sources, tmp_path):
    values = [*TINY, "train.steps=24", "train.batch_size=8", "train.checkpoint_every=6"]
    values += ["train.log_every=4", "data.weights=[2,1,1]"]
    data = ["--data", sources["labelled"], "--data", sources["plain"]]
    data += ["--data", sources["captioned"]]
    whole = tmp_path / "whole"
    subprocess.run(command("--out", str(whole), *data, *sets(values)), env=ENV, check=True)
    out = tmp_path / "killed"
    process = subprocess.Popen(command("--out", str(out), *data, *sets(values)), env=ENV)
    first = out / "checkpoints" / "step-00000006.pt"
    deadline = time.monotonic() + 300
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL, "the run ended before it was killed"
    subprocess.run(command("--resume", str(out)), env=ENV, check=True)
    left, right = load_file(whole / "backbone.safetensors"), load_file(out / "backbone.safetensors")
    assert all(torch.equal(left[k], right[k]) for k in left)
    a = torch.load(whole / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # teacher, heads and text tower too
    counts = [{k: v for k, v in r.items() if k.startswith("data/")} for r in records(whole)]
    assert counts == [{k: v for k, v in r.items() if k.startswith("data/")} for r in records(out)]


@pytest.mark.parametrize(
    ("preset", "data", "words"),
    [
        ("supervised", ["plain", "captioned"], "targets.category needs labels"),
        ("clip", ["labelled", "plain"], "targets.text needs captions"),
    ],
)
def test_a_mixture_without_a_targets_modality_is_refused(
    sources, tmp_path, capsys, preset, data, words
):
    out = tmp_path / "run"
    argv = ["pretrain", "--quiet", "--preset", preset, "--out", str(out), *sets(TINY)]
    for name in data:
        argv += ["--data", sources[name]]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("m3i: error: ") and words in error
    assert not out.exists()  # nothing written


def test_bad_mixtures_are_refused_in_one_line(sources, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    numbered = tmp_path / "numbered.jsonl"
    image = next(Path(sources["plain"].partition(":")[2]).rglob("*.png"))
    numbered.write_text(json.dumps({"image": str(image), "caption": "x", "label": 0}) + "\n")
    cases = [
        ([sources["labelled"], f"images:{empty}"], [], "no images"),
        ([sources["labelled"], f"captions:{numbered}"], [], "numbers its classes"),
        ([sources["labelled"], sources["plain"]], ["data.weights=[1,-1]"], "data.weights must"),
        ([sources["labelled"], sources["plain"]], ["data.weights=[1]"], "has 1 weights for 2"),
        ([sources["labelled"], sources["plain"]], ["data.weights=[1,.inf]"], "data.weights must"),
    ]
    for data, extra, words in cases:
        out = tmp_path / "run"
        argv = ["pretrain", "--quiet", "--out", str(out), *sets([*TINY, *extra])]
        for spec in data:
            argv += ["--data", spec]
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines[-1].startswith("m3i: error: ") and words in lines[-1], lines
        assert not out.exists()


def test_the_skipped_count_goes_on_across_a_resume(sources, tmp_path):
    """A labelled folder with an unreadable image (found while reading: data.verify=false):
    4 steps then a resume to 8 count the skips of an 8-step run, the first 4 steps' included."""
    folder = tmp_path / "in"
    subprocess.run(["cp", "-r", sources["labelled"].partition(":")[2], str(folder)], check=True)
    for path in sorted((folder / "train").rglob("*.png"))[::12]:  # 4 of 48
        path.write_bytes(b"not a png")
    values = [*TINY, "train.batch_size=8", "train.log_every=2", "targets.text.weight=0"]
    values += ["data.verify=false", "data.max_corrupt_fraction=0.1"]
    data = ["--data", f"folder:{folder}", "--data", sources["plain"]]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert (
        main(["pretrain", "--quiet", "--out", str(whole), *data, *sets([*values, "train.steps=8"])])
        == 0
    )
    assert (
        main(["pretrain", "--quiet", "--out", str(part), *data, *sets([*values, "train.steps=4"])])
        == 0
    )
    assert records(part)[-1]["data/skipped"] > 0
    assert main(["pretrain", "--quiet", "--resume", str(part), "--set=train.steps=8"]) == 0
    assert records(part)[-1]["step"] == records(whole)[-1]["step"] == 8
    assert records(part)[-1]["data/skipped"] == records(whole)[-1]["data/skipped"]
