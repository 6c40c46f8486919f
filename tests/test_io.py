"""Atomic writes: whole files with the usual permissions, nothing left behind on failure."""

import os

import pytest

from m3i.io import TEMPORARY_NAME, atomic_write, atomic_write_text


def test_atomic_write_replaces_whole_files_with_umask_permissions(tmp_path):
    path = tmp_path / "sub" / "config.yaml"
    old = os.umask(0o022)
    try:
        atomic_write_text(path, "a: 1\n")
        atomic_write_text(path, "a: 2\n")
    finally:
        os.umask(old)
    assert path.read_text() == "a: 2\n"
    assert path.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.yaml"]


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    atomic_write_text(path, "kept\n")

    def half_then_crash(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_crash)
    assert path.read_text() == "kept\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_temporary_names_are_recognised_as_a_writes_own(tmp_path):
    """A resume removes leftovers of interrupted writes by this name pattern: it must match the
    names atomic_write really uses, and only them."""
    seen = []
    atomic_write(tmp_path / "step-00000008.pt", lambda tmp: seen.append(tmp))
    match = TEMPORARY_NAME.fullmatch(os.path.basename(seen[0]))
    assert match is not None and match["name"] == "step-00000008.pt"
    assert TEMPORARY_NAME.fullmatch(".step-00000008.pt.tmp") is None
    assert TEMPORARY_NAME.fullmatch("step-00000008.pt.abcdefgh.tmp") is None
