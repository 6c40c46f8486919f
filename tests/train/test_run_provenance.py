"""provenance.json: what every start of a run ran (versions, commit, command line, world size,
time), against independent references: the installed metadata, the libraries, git itself and
the command line of a real `python -m m3i pretrain`. And m3i.provenance's git state on a
checkout made here."""

import datetime
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import timm
import torch
import torchvision

import m3i
from m3i.cli import main
from m3i.provenance import git_commit, git_state
from m3i.train.rundir import clear_or_refuse
from tests.tiny import TINY_M3I

TINY = [*TINY_M3I, "data.num_train=16", "train.batch_size=8", "monitor.every=0"]
TINY += ["monitor.tensorboard=false", "monitor.final_eval=[]"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
PACKAGE = Path(m3i.__file__).resolve().parent


def git(directory: Path, *args: str) -> subprocess.CompletedProcess:
    command = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(directory), *args]
    return subprocess.run(command, capture_output=True, text=True)


def m3i_pretrain(*args: str) -> list[str]:
    """Run `python -m m3i pretrain ARGS` in a subprocess; its argv after `-m m3i`."""
    argv = ["pretrain", "--quiet", *args]
    subprocess.run([sys.executable, "-m", "m3i", *argv], env=ENV, check=True, timeout=600)
    return argv


def test_every_start_of_a_run_records_its_provenance(tmp_path, capsys):
    out = tmp_path / "run"
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    first = m3i_pretrain("--out", str(out), *[f"--set={s}" for s in [*TINY, "train.steps=1"]])
    resumed = m3i_pretrain("--resume", str(out), "--set=train.steps=2")
    after = datetime.datetime.now(datetime.timezone.utc)
    starts = json.loads((out / "provenance.json").read_text())["starts"]
    assert [start["argv"] for start in starts] == [
        [str(PACKAGE / "__main__.py"), *first],
        [str(PACKAGE / "__main__.py"), *resumed],
    ]
    head = git(PACKAGE, "rev-parse", "HEAD")
    commit = head.stdout.strip() if head.returncode == 0 else None
    dirty = commit is not None and git(PACKAGE, "diff", "--quiet", "HEAD").returncode == 1
    times = [datetime.datetime.fromisoformat(start["time"]) for start in starts]
    assert before <= times[0] <= times[1] <= after
    for start in starts:
        assert start["m3i"] == importlib.metadata.version("m3i")
        assert start["torch"] == torch.__version__
        assert start["torchvision"] == torchvision.__version__
        assert start["timm"] == timm.__version__
        assert start["python"] == "{}.{}.{}".format(*sys.version_info[:3])
        assert (start["git_commit"], start["git_dirty"]) == (commit, dirty)
        assert start["world_size"] == 1
    (out / "provenance.json").write_text("{")  # not what a run wrote: a resume stops on it
    assert main(["pretrain", "--quiet", "--resume", str(out), "--set=train.steps=3"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"m3i: error: {out}/provenance.json is not a run provenance (JSONDe")


def test_git_state_of_a_checkout(tmp_path):
    package = tmp_path / "repo" / "pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("x = 1\n")
    assert git_state(package) == (None, False) and git_commit(package) == "unknown"
    git(tmp_path / "repo", "init", "-q")
    git(tmp_path / "repo", "add", "pkg/__init__.py")
    git(tmp_path / "repo", "commit", "-q", "-m", "first")
    head = git(tmp_path / "repo", "rev-parse", "HEAD").stdout.strip()
    (package / "untracked.py").write_text("")  # untracked files do not make it dirty
    assert git_state(package) == (head, False) and git_commit(package) == head
    (package / "__init__.py").write_text("x = 2\n")
    assert git_state(package) == (head, True)
    assert git_commit(package) == f"{head} (uncommitted changes)"


def test_overwrite_removes_the_provenance_and_wandb_files_of_a_run(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / "provenance.json").write_text("{}")
    (tmp_path / "wandb" / "offline-run-1").mkdir(parents=True)
    (tmp_path / "wandb" / "run-id").write_text("abc")
    clear_or_refuse(tmp_path, overwrite=True)
    assert list(tmp_path.iterdir()) == []
