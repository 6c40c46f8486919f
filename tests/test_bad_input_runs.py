"""Bad input around run files, through the CLI: each case checks the exit status, that stderr's
message is one line naming the problem and what would work, and that no earlier file changed.

(The input-validation cases live in tests/test_bad_input.py; resume healing, which needs the
exact-resume fixture, in tests/train/test_resume.py.)"""

import contextlib
import hashlib
import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from m3i.cli import main
from m3i.config import load_config
from m3i.data.base import DataError
from m3i.data.stream import batches
from m3i.io import OutDirError
from m3i.train import trainer
from m3i.train.pretrain import pretrain
from tests.tiny import TINY_M3I
from tests.train.test_ddp import free_ports

TINY = [
    *TINY_M3I,
    "data.num_train=32",
    "train.batch_size=16",
    "monitor.every=0",
    "monitor.tensorboard=false",
    "monitor.final_eval=[]",
]
SETS = [f"--set={s}" for s in TINY]
EVAL_SIZES = ["--set=num_train=32", "--set=num_val=16"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# `m3i` with its linear probe stalled (it says so on stderr), so that a signal lands mid-task
STALLED_LINEAR = """
import sys, time
from dataclasses import replace
from m3i.eval import tasks
def stalled(session):
    print("test: linear started", file=sys.stderr, flush=True)
    time.sleep(600)
tasks.TASKS["linear"] = replace(tasks.TASKS["linear"], run=stalled)
from m3i.cli import main
sys.exit(main(sys.argv[1:]))
"""


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under `directory` (relative path) and the SHA-256 of its bytes."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def error_line(capsys) -> str:
    line = one_line(capsys.readouterr().err)
    assert line.startswith("m3i: error: ")
    return line


@contextlib.contextmanager
def read_only(path: Path):
    """`path` and everything under it unwritable, for root too (the immutable attribute)."""
    if os.geteuid() == 0:
        make, undo = ["chattr", "-R", "+i", str(path)], ["chattr", "-R", "-i", str(path)]
    else:
        make, undo = ["chmod", "-R", "a-w", str(path)], ["chmod", "-R", "u+w", str(path)]
    if shutil.which(make[0]) is None:
        pytest.skip(f"no {make[0]} to make a directory read-only")
    try:
        if subprocess.run(make, capture_output=True).returncode != 0:
            pytest.skip(f"{' '.join(make)} is not supported here")
        yield path
    finally:
        subprocess.run(undo, capture_output=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished tiny run: every file a run has (checkpoints/, eval.jsonl and report/ too)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    final_eval = ["monitor.final_eval=[knn]", "monitor.final_eval_num_train=32"]
    final_eval.append("monitor.final_eval_num_val=16")
    more = ["--set=train.steps=2", "--set=train.checkpoint_every=1"]
    more += [f"--set={s}" for s in final_eval]
    assert main(["pretrain", "--quiet", "--out", str(out), *SETS, *more]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.yaml", "checkpoint.pt", "checkpoints", "eval.jsonl", "report"} <= names
    return out


@pytest.fixture
def copied(run, tmp_path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(run, out)
    return out


@pytest.fixture
def no_model(monkeypatch):
    """Building the model fails the test: the cases below must stop before any work."""

    def built(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(trainer, "build_model", built)  # where setup looks it up


@pytest.mark.parametrize("preset", ["m3i", "multistage"])
def test_out_at_a_finished_run_is_refused(run, capsys, no_model, preset):
    before = snapshot(run)
    assert main(["pretrain", "--preset", preset, "--out", str(run), *SETS]) == 2
    line = error_line(capsys)
    assert f"--out {run} holds a run" in line
    assert f"--resume {run}" in line and "--overwrite" in line
    assert snapshot(run) == before


def test_out_at_a_killed_multistage_run_is_refused(tmp_path, capsys, no_model):
    out = tmp_path / "multi"  # what a multistage run writes before its first stage ends
    (out / "stages" / "0-data2vec").mkdir(parents=True)
    (out / "config.yaml").write_text("preset: multistage\n")
    (out / "metrics.jsonl").write_text("")
    before = snapshot(out)
    assert main(["pretrain", "--out", str(out), *SETS]) == 2
    assert "holds a run (config.yaml, metrics.jsonl, stages/)" in error_line(capsys)
    assert snapshot(out) == before


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_users_own_files_are_never_overwritten(tmp_path, capsys, no_model, overwrite):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.yaml").write_text("base: supervised\ntrain:\n  steps: 2\n")
    (out / "notes.txt").write_text("my notes\n")
    before = snapshot(out)
    config = ["--config", str(out / "config.yaml")]
    assert main(["pretrain", *config, "--out", str(out), *overwrite, *SETS]) == 2
    line = error_line(capsys)
    assert "is not empty and holds no m3i run" in line and "(config.yaml, notes.txt)" in line
    assert "give a new or empty directory" in line
    assert snapshot(out) == before


def test_overwrite_keeps_files_that_are_not_the_runs(copied, capsys, no_model):
    (copied / "notes.txt").write_text("my notes\n")
    (copied / "data").mkdir()
    before = snapshot(copied)
    assert main(["pretrain", "--out", str(copied), "--overwrite", *SETS]) == 2
    line = error_line(capsys)
    assert "holds a run and files that are not a run's (data/, notes.txt)" in line
    assert "move those away" in line
    assert snapshot(copied) == before


def test_overwrite_replaces_the_whole_run(copied, capsys, caplog):
    (copied / ".checkpoint.pt.k2j4h6g8.tmp").write_bytes(b"left by a kill")
    with caplog.at_level(logging.WARNING, logger="m3i.train"):
        argv = ["pretrain", "--quiet", "--out", str(copied), "--overwrite", *SETS]
        assert main([*argv, "--set=train.steps=1", "--set=model.depth=1"]) == 0
    assert [r.getMessage() for r in caplog.records] == [
        f"--overwrite: removed the run in {copied} (.checkpoint.pt.k2j4h6g8.tmp, "
        "backbone.safetensors, checkpoint.pt, checkpoints/ and 8 more)"
    ]
    new = snapshot(copied)
    assert "eval.jsonl" not in new and "checkpoints/step-00000002.pt" not in new
    assert ".checkpoint.pt.k2j4h6g8.tmp" not in new
    assert sorted(p.name for p in (copied / "checkpoints").iterdir()) == ["step-00000001.pt"]
    assert (copied / "metrics.jsonl").read_text().count("\n") == 1  # step 1 only
    assert load_config(config_file=copied / "config.yaml").model.depth == 1


@pytest.mark.parametrize("where", ["file", "under a file", "read-only"])
def test_out_that_cannot_be_written(tmp_path, capsys, no_model, where):
    blocker = tmp_path / "file.txt"
    blocker.write_text("mine\n")
    locked = tmp_path / "locked"
    locked.mkdir()
    out = {"file": blocker, "under a file": blocker / "run", "read-only": locked / "run"}[where]
    before = snapshot(tmp_path)
    with read_only(locked):
        assert main(["pretrain", "--out", str(out), *SETS]) == 2
    line = error_line(capsys)
    reason = {
        "file": f"--out {out} is a file, not a directory",
        "under a file": f"--out {out} is under {blocker}, which is a file",
        "read-only": f"--out {out} is not writable (",
    }[where]
    assert reason in line and "give a directory you can write to" in line
    assert snapshot(tmp_path) == before


def test_resume_and_overwrite_together_are_refused(run, capsys, no_model):
    before = snapshot(run)
    assert main(["pretrain", "--resume", str(run), "--overwrite"]) == 2
    assert "drop --out/--data/--overwrite" in error_line(capsys)
    assert snapshot(run) == before


def test_report_out_at_a_file(run, tmp_path, capsys):
    blocker = tmp_path / "summary.md"
    blocker.write_text("mine\n")
    before = snapshot(tmp_path), snapshot(run)
    assert main(["report", str(run), "--out", str(blocker)]) == 2
    line = error_line(capsys)
    assert f"--out {blocker} is a file, not a directory; give a directory for the report" in line
    assert (snapshot(tmp_path), snapshot(run)) == before


def test_report_of_a_read_only_run_asks_for_out(copied, capsys):
    before = snapshot(copied)
    with read_only(copied):
        assert main(["report", str(copied)]) == 2
    line = error_line(capsys)
    assert f"report directory {copied / 'report'} is not writable" in line and "--out" in line
    assert snapshot(copied) == before


def test_eval_of_a_read_only_run_prints_the_result_and_warns(copied, capsys, caplog):
    before = snapshot(copied)
    with read_only(copied), caplog.at_level(logging.WARNING, logger="m3i.eval"):
        assert main(["eval", "knn", "--checkpoint", str(copied), *EVAL_SIZES]) == 0
    assert one_line(capsys.readouterr().out).startswith("knn on shapes: top1 ")
    (warning,) = [r.getMessage() for r in caplog.records]
    assert one_line(warning).startswith(f"could not record the knn result in {copied}/eval.jsonl")
    assert warning.endswith("it is printed, not saved")
    assert snapshot(copied) == before


def interrupt_stalled_linear(argv: list[str]) -> tuple[subprocess.Popen, str]:
    """Run `m3i ARGV` with the linear probe stalled; SIGINT once it starts; (process, stderr)."""
    process = subprocess.Popen(
        [sys.executable, "-c", STALLED_LINEAR, *argv], env=ENV, stderr=subprocess.PIPE, text=True
    )
    lines = []
    for line in process.stderr:
        lines.append(line)
        if line.startswith("test: linear started"):
            process.send_signal(signal.SIGINT)
            break
    lines += process.stderr.readlines()
    process.wait(timeout=60)
    return process, "".join(lines)


def test_ctrl_c_during_the_final_evaluation_keeps_what_is_done(tmp_path):
    out = tmp_path / "run"
    final = ["monitor.final_eval=[knn,linear]", "monitor.final_eval_num_train=32"]
    final += ["monitor.final_eval_num_val=16", "train.steps=1"]
    argv = ["pretrain", "--quiet", "--out", str(out), *SETS, *[f"--set={s}" for s in final]]
    process, err = interrupt_stalled_linear(argv)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"m3i: interrupted during the final evaluation; the run's files are written and "
        f"{out}/eval.jsonl records knn; evaluate with `m3i eval TASK --checkpoint {out}`"
    )
    assert [line.split('"task": "')[1][:3] for line in
            (out / "eval.jsonl").read_text().splitlines()] == ["knn"]  # fmt: skip
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 1
    assert not (out / "report").exists()


def test_ctrl_c_during_eval_records_nothing(run):
    before = snapshot(run)
    process, err = interrupt_stalled_linear(["eval", "linear", "--checkpoint", str(run)])
    assert process.returncode == 130, err
    assert one_line(err.replace("test: linear started\n", "")) == (
        "m3i: interrupted before the linear result was computed; nothing was recorded"
    )
    assert snapshot(run) == before


class Unreadable(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        raise DataError("img.png: unreadable image; replace or remove it")


def test_a_data_error_in_a_worker_keeps_its_one_line_message():
    stream = batches(Unreadable(), 2, seed=0, workers=1, device=torch.device("cpu"))
    with pytest.raises(DataError) as caught:
        next(stream)
    assert str(caught.value) == "img.png: unreadable image; replace or remove it"


def test_a_corrupt_image_is_the_same_one_line_with_workers(tmp_path, capsys):
    for index in range(16):
        folder = tmp_path / "data" / "train" / ("red" if index % 2 else "blue")
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (255 * (index % 2), 0, 255)).save(folder / f"{index:02d}.png")
    broken = tmp_path / "data" / "train" / "red" / "03.png"
    Image.effect_noise((32, 32), 64).convert("RGB").save(broken)
    broken.write_bytes(broken.read_bytes()[:300])  # the header is whole, the pixels cut off
    lines = []
    for workers in (0, 1):
        out = tmp_path / f"run{workers}"
        argv = ["pretrain", "--quiet", "--preset", "supervised", "--out", str(out), *SETS]
        argv += [f"--data=folder:{tmp_path / 'data'}", "--set=data.num_train=16"]
        assert main([*argv, f"--set=data.workers={workers}", "--set=train.steps=1"]) == 2
        lines.append(capsys.readouterr().err.strip().splitlines()[-1])
    assert lines[0] == lines[1]
    assert lines[1].startswith(f"m3i: error: {broken}: unreadable image")
    assert "Traceback" not in lines[1] and "DataLoader worker" not in lines[1]


def refuse_on_two_ranks(rank: int, port: int, outs: list[Path], queue) -> None:
    """Pre-train into outs[rank] on 2 gloo ranks; put (rank, outcome) on the queue."""
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    cfg = load_config("supervised", overrides=[*TINY, "train.device=cpu", "train.steps=1"])
    try:
        pretrain(cfg, outs[rank], progress=False)
        queue.put((rank, "trained"))
    except Exception as err:  # noqa: BLE001 - the test reports whatever ended the rank
        queue.put((rank, str(err) if isinstance(err, OutDirError) else repr(err)))


def test_under_torchrun_rank_0_decides_and_every_rank_refuses(run, tmp_path):
    before = snapshot(run)
    outs = [run, tmp_path / "rank1"]  # alone, rank 1 would start: its directory is new
    context = multiprocessing.get_context("fork")  # no process group yet here; spawn takes 30 s
    queue = context.Queue()
    port = free_ports(1)[0]
    processes = [
        context.Process(target=refuse_on_two_ranks, args=(rank, port, outs, queue))
        for rank in (0, 1)
    ]
    for process in processes:
        process.start()
    try:
        outcomes = dict(queue.get(timeout=120) for _ in processes)
    finally:
        for process in processes:
            process.join(timeout=10)
            process.kill()
    assert outcomes[0] == outcomes[1] and outcomes[0].startswith(f"--out {run} holds a run")
    assert not outs[1].exists()
    assert snapshot(run) == before
