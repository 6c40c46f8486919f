"""Where a benchmark's numbers came from: the command, the code's git commit, the date and the
machine (CPU cores, device name). Never fails: a commit that cannot be found is "unknown"."""

from __future__ import annotations

import datetime
import hashlib
import subprocess
from pathlib import Path

import torch

import m3i
from m3i.train.input_rate import usable_cores

PACKAGE_DIR = Path(m3i.__file__).resolve().parent


def _git(directory: Path, *args: str) -> str | None:
    """`git -C directory ARGS`'s stripped output, or None when git or the checkout is missing."""
    try:
        done = subprocess.run(
            ["git", "-C", str(directory), *args], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_commit(directory: Path = PACKAGE_DIR) -> str:
    """The commit of the git checkout whose tracked files include `directory`'s __init__.py
    (the package's own, by default), with " (uncommitted changes)" when tracked files differ
    from it; "unknown" when the package does not live in a git checkout."""
    if _git(directory, "ls-files", "--error-unmatch", "__init__.py") is None:
        return "unknown"
    commit = _git(directory, "rev-parse", "HEAD")
    if commit is None:
        return "unknown"
    changes = _git(directory, "status", "--porcelain", "--untracked-files=no")
    return f"{commit} (uncommitted changes)" if changes else commit


def package_digest(directory: Path = PACKAGE_DIR) -> str:
    """A digest of the package's own files (every file under `directory` but caches: the code,
    its presets and its version): equal for two states of the package only when they hold the
    same files, in or outside a git checkout, committed or not."""
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(path.relative_to(directory).as_posix().encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def device_name(device: torch.device) -> str:
    """The GPU's name (torch.cuda.get_device_name) for a CUDA device, else "CPU"."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def provenance(command: str) -> dict[str, str | int]:
    """{command, commit, date (UTC, ISO 8601, now), cpu_cores (usable by this process)}."""
    return {
        "command": command,
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_cores": usable_cores(),
    }
