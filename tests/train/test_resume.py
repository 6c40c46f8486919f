"""Runs survive being killed: SIGKILL or SIGTERM mid-way, then `--resume`, gives the same final
weights as an uninterrupted run, bit for bit (CPU, one process)."""

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
    """Start the run, send `sig` once its step-8 checkpoint exists, wait for the process."""
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


def test_corrupt_checkpoint_names_the_previous_one(uninterrupted, tmp_path, capsys):
    out = tmp_path / "run"
    subprocess.run(["cp", "-r", str(uninterrupted), str(out)], check=True)
    (out / "checkpoint.pt").unlink()  # the copy broke the hard link: make a truncated latest
    newest = sorted((out / "checkpoints").iterdir())[-1]
    newest.write_bytes(newest.read_bytes()[:1000])
    os.link(newest, out / "checkpoint.pt")
    assert main(["pretrain", "--quiet", "--resume", str(out)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("m3i: error: ") and "corrupt or truncated" in error
    previous = sorted((out / "checkpoints").iterdir())[-2]
    assert str(previous) in error
    torch.load(previous, weights_only=True)  # and it is intact


def test_resume_of_a_directory_without_a_run(tmp_path, capsys):
    assert main(["pretrain", "--resume", str(tmp_path)]) == 2
    assert "no config.yaml" in capsys.readouterr().err


def test_training_caps_the_clip_logit_scale_after_every_step(tmp_path):
    """A checkpoint whose logit scale drifted above 100 (the old forward-only clamp let the
    parameter grow, with zero gradient) is brought back to 100 by the first resumed step."""
    from m3i.config import load_config
    from m3i.train.loop import pretrain

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
