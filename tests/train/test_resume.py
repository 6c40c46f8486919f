"""Runs survive being killed: SIGKILL or SIGTERM mid-way, then `--resume`, gives the same final
weights as an uninterrupted run, bit for bit (CPU, one process)."""

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from m3i.cli import main
from m3i.config import ConfigError, load_config, to_dict
from m3i.train.checkpoint import check_resumable
from m3i.train.stopping import stop_signals
from tests.tiny import TINY_M3I

STEPS = 40
RUN = [
    *TINY_M3I,
    "data.num_train=96",  # 3 batches per epoch: the kill lands mid-epoch
    "train.batch_size=32",
    f"train.steps={STEPS}",
    "train.checkpoint_every=8",
    "train.log_every=4",
    "monitor.every=0",
    "monitor.final_eval=[]",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "m3i", "pretrain", "--quiet", *args]


def sets(extra: list[str] = ()) -> list[str]:
    return [f"--set={s}" for s in [*RUN, *extra]]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole")
    subprocess.run(command("--out", str(out), *sets()), env=ENV, check=True)
    return out


def interrupt(out: Path, sig: int) -> subprocess.CompletedProcess:
    """Start the run, send `sig` once its step-8 checkpoint exists, wait for the process.

    The signal may land before checkpoint.pt links to that file, or in the middle of a later
    write: a resume falls back to the step file and removes the temporaries."""
    process = subprocess.Popen(
        command("--out", str(out), *sets()), env=ENV, stderr=subprocess.PIPE, text=True
    )
    first = out / "checkpoints" / "step-00000008.pt"
    deadline = time.monotonic() + 120
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, "", err)


def assert_same_weights(a: Path, b: Path) -> None:
    for name in ("backbone.safetensors",):
        left, right = load_file(a / name), load_file(b / name)
        assert left.keys() == right.keys()
        assert all(torch.equal(left[k], right[k]) for k in left), name
    left = torch.load(a / "checkpoint.pt", weights_only=True)
    right = torch.load(b / "checkpoint.pt", weights_only=True)
    assert left["step"] == right["step"] == STEPS
    for key in left["model"]:  # the EMA teacher and projectors too
        assert torch.equal(left["model"][key], right["model"][key]), key
    assert left["optimizer"]["state"].keys() == right["optimizer"]["state"].keys()


def test_sigkill_then_resume_gives_the_same_weights(uninterrupted, tmp_path):
    killed = interrupt(tmp_path, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    resumed = subprocess.run(
        command("--resume", str(tmp_path)), env=ENV, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(uninterrupted, tmp_path)
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in
             (tmp_path / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    assert steps == list(range(4, STEPS + 1, 4))  # nothing logged twice after the restart


def test_sigterm_writes_a_checkpoint_and_resumes(uninterrupted, tmp_path):
    stopped = interrupt(tmp_path, signal.SIGTERM)
    assert stopped.returncode == 143, stopped.stderr
    last = stopped.stderr.strip().splitlines()[-1]
    assert last.startswith("m3i: stopped by signal at step ") and "--resume" in last
    step = int(last.split("at step ")[1].split(";")[0])
    assert 8 <= step < STEPS
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["step"] == step
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert len(kept) <= 2 and kept[-1] == f"step-{step:08d}.pt"  # train.keep_checkpoints=2
    assert main(["pretrain", "--quiet", "--resume", str(tmp_path)]) == 0
    assert_same_weights(uninterrupted, tmp_path)


def test_resume_with_a_longer_budget_continues(uninterrupted, tmp_path, capsys):
    out = tmp_path / "run"
    subprocess.run(["cp", "-r", str(uninterrupted), str(out)], check=True)
    assert (
        main(["pretrain", "--quiet", "--resume", str(out), f"--set=train.steps={STEPS + 4}"]) == 0
    )
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == STEPS + 4


def test_resume_refuses_a_changed_model(uninterrupted, tmp_path, capsys):
    out = tmp_path / "run"
    subprocess.run(["cp", "-r", str(uninterrupted), str(out)], check=True)
    changed = ["--set=model.depth=3", "--set=targets.text.weight=0.5"]
    assert main(["pretrain", "--quiet", "--resume", str(out), *changed]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("m3i: error: cannot resume")
    assert "model.depth" in error and "targets.text.weight" in error


def test_resume_takes_a_key_added_since_the_checkpoint_as_its_default():
    """A checkpoint written before targets.text.tower existed resumes with tower=scratch (the
    default then) and is refused with tower=minilm."""
    saved = to_dict(load_config("clip"))
    del saved["targets"]["text"]["tower"]
    check_resumable(saved, to_dict(load_config("clip")))
    minilm = load_config("clip", overrides=["targets.text.tower=minilm"])
    with pytest.raises(ConfigError, match="changed targets.text.tower since the checkpoint"):
        check_resumable(saved, to_dict(minilm))


def copy_run(uninterrupted: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    subprocess.run(["cp", "-r", str(uninterrupted), str(out)], check=True)  # breaks the hard link
    return out


def logged_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_resume_falls_back_to_the_newest_intact_step_checkpoint(
    uninterrupted, tmp_path, caplog, damage
):
    """A kill between checkpoints/step-N.pt and its checkpoint.pt link leaves no checkpoint.pt
    (the first time) or an older one; a torn disk, a truncated one: resume from step-N.pt."""
    out = copy_run(uninterrupted, tmp_path)
    previous, newest = sorted((out / "checkpoints").iterdir())  # steps 32 and 40
    (out / "checkpoint.pt").unlink()
    if damage == "missing":
        newest.unlink()
    else:
        newest.write_bytes(newest.read_bytes()[:1000])
        os.link(newest, out / "checkpoint.pt")
    with caplog.at_level(logging.WARNING, logger="m3i.train"):
        assert main(["pretrain", "--quiet", "--resume", str(out)]) == 0
    reason = {"missing": "is missing", "corrupt": "is corrupt or truncated (RuntimeError)"}
    assert [r.getMessage() for r in caplog.records] == [
        f"{out / 'checkpoint.pt'} {reason[damage]}; resuming from {previous}, the newest intact "
        "checkpoint"
    ]
    assert_same_weights(uninterrupted, out)
    assert logged_steps(out) == list(range(4, STEPS + 1, 4))


def test_resume_without_an_intact_checkpoint_says_to_start_again(uninterrupted, tmp_path, capsys):
    out = copy_run(uninterrupted, tmp_path)
    for path in [out / "checkpoint.pt", *(out / "checkpoints").iterdir()]:
        path.write_bytes(path.read_bytes()[:1000])
    assert main(["pretrain", "--quiet", "--resume", str(out)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"m3i: error: {out / 'checkpoint.pt'} is corrupt or truncated")
    assert "step-00000032.pt is corrupt" in error and "step-00000040.pt is corrupt" in error
    assert error.endswith("no intact checkpoint is kept: start the run again with --overwrite")


def test_resume_heals_what_a_kill_left(uninterrupted, tmp_path, caplog):
    """A half-written metrics line is dropped and the temporaries of interrupted writes are
    removed, each said in one line; files that are not the run's stay."""
    out = copy_run(uninterrupted, tmp_path)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 44, "loss": 0.')
    ours = [
        out / ".checkpoint.pt.k2j4h6g8.tmp",
        out / "checkpoints" / ".step-00000048.pt.a_b1c2d3.tmp",
    ]
    theirs = [out / ".notes.txt.k2j4h6g8.tmp", out / "checkpoints" / "mine.tmp"]
    for path in ours + theirs:
        path.write_bytes(b"half")
    with caplog.at_level(logging.WARNING, logger="m3i.train"):
        assert (
            main(["pretrain", "--quiet", "--resume", str(out), f"--set=train.steps={STEPS + 4}"])
            == 0
        )
    assert [r.getMessage() for r in caplog.records] == [
        f"removed 2 temporary file(s) of interrupted writes: {ours[0]}, {ours[1]}",
        f"{out / 'metrics.jsonl'}: dropped its half-written last line 11 (Expecting ',' "
        "delimiter), left by a killed run",
    ]
    assert [p.exists() for p in ours + theirs] == [False, False, True, True]
    assert logged_steps(out) == list(range(4, STEPS + 5, 4))


def test_a_broken_metrics_line_before_the_last_is_named(uninterrupted, tmp_path, capsys):
    out = copy_run(uninterrupted, tmp_path)
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[2] = lines[2][:20] + "\n"
    (out / "metrics.jsonl").write_text("".join(lines))
    assert main(["pretrain", "--quiet", "--resume", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"m3i: error: {out / 'metrics.jsonl'}:3: not a JSON line (Expecting value); delete or fix "
        "that line to resume"
    )


def test_resume_of_a_directory_without_a_run(tmp_path, capsys):
    assert main(["pretrain", "--resume", str(tmp_path)]) == 2
    assert "no config.yaml" in capsys.readouterr().err


def test_training_caps_the_clip_logit_scale_after_every_step(tmp_path):
    """A checkpoint whose logit scale drifted above 100 (the old forward-only clamp let the
    parameter grow, with zero gradient) is brought back to 100 by the first resumed step."""
    from m3i.config import load_config
    from m3i.train.pretrain import pretrain

    overrides = [*RUN, "train.steps=2", "train.checkpoint_every=1"]
    cfg = load_config("clip", overrides=overrides)
    pretrain(cfg, tmp_path, progress=False)
    path = tmp_path / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    state["model"]["targets.text.logit_scale"].fill_(math.log(1000.0))
    torch.save(state, path)
    cfg = load_config("clip", overrides=[*overrides, "train.steps=3"])
    pretrain(cfg, tmp_path, progress=False, resume=True)
    scale = torch.load(path, weights_only=True)["model"]["targets.text.logit_scale"]
    assert scale.exp().item() == pytest.approx(100.0, rel=1e-5)


def test_a_signal_the_loop_did_not_answer_is_sent_again_when_the_block_ends():
    """A SIGINT that arrives after the loop's last look (say, during the final save) is not
    swallowed: it reaches the process once the old handler is back (here Python's, which
    raises KeyboardInterrupt); one the loop answered with an exception is not sent twice."""
    with pytest.raises(KeyboardInterrupt):
        with stop_signals() as received:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs between bytecodes: the signal is only collected
            assert received == [signal.SIGINT]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(RuntimeError, match="the loop's answer"):
        with stop_signals():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            raise RuntimeError("the loop's answer")
    with stop_signals() as received:  # no signal: nothing is sent
        pass
    assert received == []
