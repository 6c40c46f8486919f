"""`m3i bench ablation --resume`: a stopped ablation keeps its finished runs and runs the rest;
a run whose config, settings or code changed is run again; a finished `--out` is not
overwritten by accident."""

import json
import subprocess
import sys

import pytest

import m3i.bench.ablation as ablation
from m3i.bench.ablation import METHODS, RECORD_SUFFIX, data_dir, finished_runs
from m3i.bench.ablation_report import provenance_lines
from m3i.cli import main
from m3i.provenance import git_commit, package_digest
from m3i.train.stopping import TrainingStopped

TINY = ["bench", "ablation", "--budget", "tiny", "--equal", "steps"]  # 8 steps for every method


def count_pretrains(monkeypatch, stop_at: int | None = None) -> list[str]:
    """Record the run directory of every pre-training the ablation starts; at call `stop_at`
    stop as a SIGTERM does (TrainingStopped) instead of training."""
    calls, real = [], ablation.pretrain

    def pretrain(cfg, run, **kwargs):
        calls.append(run.name)
        if len(calls) == stop_at:
            raise TrainingStopped(f"stopped by signal at step 3; checkpoint written in {run}")
        return real(cfg, run, **kwargs)

    monkeypatch.setattr(ablation, "pretrain", pretrain)
    return calls


def records(out) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((out / "shapes" / "seed0").glob("*.json"))}


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """An ablation stopped in its third run, then continued with --resume."""
    out = tmp_path_factory.mktemp("ablation")
    with pytest.MonkeyPatch.context() as monkeypatch:
        stopped = count_pretrains(monkeypatch, stop_at=3)
        code = main([*TINY, "--out", str(out)])
        before = records(out)
    with pytest.MonkeyPatch.context() as monkeypatch:
        rerun = count_pretrains(monkeypatch)
        resumed_code = main([*TINY, "--out", str(out), "--resume"])
    return {"out": out, "code": code, "stopped": stopped, "before": before,
            "resumed_code": resumed_code, "rerun": rerun}  # fmt: skip


def test_a_stop_keeps_the_finished_runs_and_resume_runs_only_the_rest(resumed):
    assert resumed["code"] == 143  # as a process stopped by SIGTERM
    assert resumed["stopped"] == list(METHODS[:3])
    finished = [f"{m}{RECORD_SUFFIX}" for m in METHODS[:2]]
    assert sorted(resumed["before"]) == sorted(finished)  # the stopped run left no record
    assert resumed["resumed_code"] == 0
    assert resumed["rerun"] == list(METHODS[2:])  # the two finished runs were not trained again
    results = json.loads((resumed["out"] / "results.json").read_text())
    assert [r["method"] for r in results["runs"]] == list(METHODS)
    for name in finished:  # what results.json holds for a kept run is what its run wrote
        saved = json.loads(resumed["before"][name])
        method = name.removesuffix(RECORD_SUFFIX)
        assert next(r for r in results["runs"] if r["method"] == method) == saved["record"]
    assert results["provenance"]["kept_runs"] == 2
    assert results["provenance"]["kept_commits"] == [git_commit()]
    assert all(r["commit"] == git_commit() for r in results["runs"])
    markdown = (resumed["out"] / "results.md").read_text()
    kept = (
        "2 runs were kept from an earlier one with the same config, settings and package "
        f"files, made at commit {git_commit()} (their own seconds are in results.json)"
    )
    assert kept in markdown


def test_the_stop_message_says_how_to_continue(tmp_path, monkeypatch, capsys):
    count_pretrains(monkeypatch, stop_at=1)
    assert main([*TINY, "--out", str(tmp_path)]) == 143
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message == (
        "m3i: stopped by signal in shapes seed 0 random; the runs finished before it are kept: "
        "continue with the same command with --resume"
    )


@pytest.mark.parametrize(
    ("change", "first_run_again"),
    [
        (["--eval-set", "linear.epochs=1"], "random"),  # another evaluation setting
        (["--set", "train.lr=0.002"], "random"),  # another config
        # another FLOP plan (argparse keeps the last --equal): random init trains 0 steps in
        # both, so only its run is kept
        (["--equal", "flops"], "supervised"),
        ("code", "random"),  # other package files
        ("device", "random"),  # another device
        ("torch", "random"),  # another torch release
        ("record", "random"),  # a record cut short (a disk that filled up, a hand edit)
    ],
)
def test_a_run_made_under_other_settings_or_code_runs_again(
    resumed, change, first_run_again, tmp_path, monkeypatch
):
    out = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(resumed["out"]), str(out)], check=True)
    if change == "code":
        monkeypatch.setattr(ablation, "package_digest", lambda: "0123456789abcdef")
    if change == "device":
        monkeypatch.setattr(ablation, "device_name", lambda device: "NVIDIA H200")
    if change == "torch":
        monkeypatch.setattr(ablation.torch, "__version__", "2.99.0+other")
    if change == "record":
        saved = out / "shapes" / "seed0" / f"random{RECORD_SUFFIX}"
        saved.write_text(saved.read_text()[:100])
    change = change if isinstance(change, list) else []
    calls = count_pretrains(monkeypatch, stop_at=1)
    assert main([*TINY, "--out", str(out), "--resume", *change]) == 143
    assert calls == [first_run_again]  # it was not kept: it was started again
    assert f"{first_run_again}{RECORD_SUFFIX}" not in records(out)  # its stale record is gone
    assert f"clip{RECORD_SUFFIX}" in records(out)  # the runs after it are not touched


def test_unchanged_resume_keeps_every_run(resumed, tmp_path, monkeypatch):
    out = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(resumed["out"]), str(out)], check=True)
    calls = count_pretrains(monkeypatch, stop_at=1)
    assert main([*TINY, "--out", str(out), "--resume"]) == 0
    assert calls == []


def test_finished_runs_are_not_overwritten_without_a_flag(resumed, tmp_path, monkeypatch, capsys):
    out = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(resumed["out"]), str(out)], check=True)
    calls = count_pretrains(monkeypatch, stop_at=1)
    assert main([*TINY, "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [
        f"m3i: error: --out {out} holds {len(METHODS)} finished ablation runs; continue with "
        "--resume "
        "(keeps those made with the same settings and package files), run them all again with "
        "--overwrite, or give another --out"
    ]
    assert main([*TINY, "--out", str(out), "--resume", "--overwrite"]) == 2
    assert "give one" in capsys.readouterr().err
    assert calls == []  # no work before either error
    assert main([*TINY, "--out", str(out), "--overwrite"]) == 143
    assert calls == ["random"]
    assert records(out) == {}  # no old record outlives --overwrite, even when it is stopped
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .endswith("continue with the same command with --resume in place of --overwrite")
    )


def test_a_fresh_process_keeps_every_run(resumed, tmp_path):
    """The key is the same in another process (no hash order or address in it)."""
    out = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(resumed["out"]), str(out)], check=True)
    command = [sys.executable, "-m", "m3i", *TINY, "--out", str(out), "--resume"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    kept = [line for line in done.stderr.splitlines() if ": kept from " in line]
    assert len(kept) == len(METHODS)


def test_a_run_is_not_recorded_when_the_package_changed_under_it(tmp_path, monkeypatch, capsys):
    digests = iter(["before", "after", "after"])
    monkeypatch.setattr(ablation, "package_digest", lambda: next(digests))
    count_pretrains(monkeypatch, stop_at=2)  # random init runs, then the stop comes
    assert main([*TINY, "--out", str(tmp_path)]) == 143
    assert records(tmp_path) == {}
    assert (
        f"m3i: the package's files changed during this command: random{RECORD_SUFFIX} is not "
        "written" in capsys.readouterr().err
    )


def test_every_data_spec_gets_one_folder_that_the_refusal_finds(tmp_path):
    assert data_dir("shapes") == "shapes" and data_dir("fashion-mnist") == "fashion-mnist"
    spec = "fashion-mnist:/usr/share/datasets/fashion-mnist"
    folder = data_dir(spec)
    assert "/" not in folder
    assert folder.startswith("fashion-mnist_usr_share_datasets_fashion-mnist-")
    assert data_dir("fashion-mnist:/usr/share/datasets_fashion-mnist") != folder  # no collision
    saved = tmp_path / folder / "seed0" / f"m3i{RECORD_SUFFIX}"
    saved.parent.mkdir(parents=True)
    saved.write_text("{}")
    assert finished_runs(tmp_path) == [saved]


def test_package_digest_changes_with_the_package_files_only(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("x = 1\n")
    one = package_digest(package)
    assert len(one) == 16 and int(one, 16) >= 0
    (package / "__init__.py").write_text("x = 2\n")
    assert package_digest(package) != one
    (package / "__init__.py").write_text("x = 1\n")
    assert package_digest(package) == one  # the same files, the same digest
    (package / "__pycache__").mkdir()
    (package / "__pycache__" / "x.pyc").write_bytes(b"cache")
    assert package_digest(package) == one  # caches are not the code
    (tmp_path / "notes.md").write_text("outside the package\n")
    assert package_digest(package) == one
    (package / "presets").mkdir()
    (package / "presets" / "m3i.yaml").write_text("a: 1\n")
    assert package_digest(package) != one  # a file added to the package is
    (package / "presets" / "m3i.yaml").unlink()
    (package / "m3i.yaml").write_text("a: 1\n")
    moved = package_digest(package)
    (package / "m3i.yaml").unlink()
    (package / "presets" / "m3i.yaml").write_text("a: 1\n")
    assert package_digest(package) != moved  # and so is where it lies


def test_provenance_says_nothing_of_kept_runs_when_none_were_kept():
    provenance = {"command": "m3i bench ablation", "commit": "abc", "date": "d",
                  "cpu_cores": 2, "device": "CPU", "wall_s": 120.0}  # fmt: skip
    assert provenance_lines(provenance).splitlines()[-1] == "- wall time: 2.0 min (120 s)"
    assert provenance_lines({**provenance, "kept_runs": 0}) == provenance_lines(provenance)
