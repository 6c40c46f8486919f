"""`m3i bench ablation --resume`: a stopped ablation keeps its finished runs and runs the rest;
a run whose config, settings or code changed is run again; a finished `--out` is not
overwritten by accident."""

import json
import subprocess

import pytest

import m3i.bench.ablation as ablation
from m3i.bench.ablation import METHODS, RECORD_SUFFIX
from m3i.bench.ablation_report import provenance_lines
from m3i.bench.provenance import code_version
from m3i.cli import main
from m3i.train.loop import TrainingStopped

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
    markdown = (resumed["out"] / "results.md").read_text()
    kept = "2 runs were kept from an earlier one with the same config, settings and code"
    assert kept in markdown


def test_the_stop_message_says_how_to_continue(tmp_path, monkeypatch, capsys):
    count_pretrains(monkeypatch, stop_at=1)
    assert main([*TINY, "--out", str(tmp_path)]) == 143
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message == (
        "m3i: stopped by signal in shapes seed 0 random; the 0 runs finished before it are "
        "kept: continue with the same command and --resume"
    )


@pytest.mark.parametrize(
    ("change", "first_run_again"),
    [
        (["--eval-set", "linear.epochs=1"], "random"),  # another evaluation setting
        (["--set", "train.lr=0.002"], "random"),  # another config
        # another FLOP plan (argparse keeps the last --equal): random init trains 0 steps in
        # both, so only its run is kept
        (["--equal", "flops"], "supervised"),
        ("code", "random"),  # another state of the code
    ],
)
def test_a_run_made_under_other_settings_or_code_runs_again(
    resumed, change, first_run_again, tmp_path, monkeypatch
):
    out = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(resumed["out"]), str(out)], check=True)
    if change == "code":
        monkeypatch.setattr(ablation, "code_version", lambda: "another commit")
        change = []
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
        f"m3i: error: --out {out} holds 8 finished ablation runs; continue with --resume "
        "(keeps those made with the same settings and code), run them all again with "
        "--overwrite, or give another --out"
    ]
    assert main([*TINY, "--out", str(out), "--resume", "--overwrite"]) == 2
    assert "give one" in capsys.readouterr().err
    assert calls == []  # no work before either error
    assert main([*TINY, "--out", str(out), "--overwrite"]) == 143
    assert calls == ["random"]


def test_code_version_tells_states_of_the_package_apart(tmp_path):
    def git(*args):
        command = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
        return subprocess.run([*command, *args], check=True, capture_output=True, text=True)

    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("x = 1\n")
    one = code_version(package)
    assert one.startswith("unknown ")  # outside a checkout the package's digest still counts
    (package / "__init__.py").write_text("x = 2\n")
    assert code_version(package) != one
    (package / "__init__.py").write_text("x = 1\n")
    assert code_version(package) == one  # the same files, the same version
    (package / "__pycache__").mkdir()
    (package / "__pycache__" / "x.pyc").write_bytes(b"cache")
    assert code_version(package) == one  # caches are not the code
    (package / "presets.yaml").write_text("a: 1\n")
    with_file = code_version(package)
    assert with_file != one  # a file added to the package is
    git("init", "-q")
    git("add", "pkg")
    git("commit", "-q", "-m", "package")
    head = git("rev-parse", "HEAD").stdout.strip()
    assert code_version(package) == f"{head} {with_file.split()[-1]}"
    (package / "__init__.py").write_text("x = 2\n")
    edited = code_version(package)
    assert edited.startswith(f"{head} (uncommitted changes) ") and edited != with_file


def test_provenance_says_nothing_of_kept_runs_when_none_were_kept():
    provenance = {"command": "m3i bench ablation", "commit": "abc", "date": "d",
                  "cpu_cores": 2, "device": "CPU", "wall_s": 120.0}  # fmt: skip
    assert provenance_lines(provenance).splitlines()[-1] == "- wall time: 2.0 min (120 s)"
    assert provenance_lines({**provenance, "kept_runs": 0}) == provenance_lines(provenance)
