"""Where code that ran came from: the package's git commit (and whether its checkout had
uncommitted changes), a digest of its files, and a run's start: versions, command line, world
size, host and time. Never fails: a commit that cannot be found is None ("unknown")."""

from __future__ import annotations

import datetime
import hashlib
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent


def _git(directory: Path, *args: str) -> str | None:
    """`git -C directory ARGS`'s stripped output, or None when git or the checkout is missing."""
    try:
        done = subprocess.run(
            ["git", "-C", str(directory), *args], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state(directory: Path = PACKAGE_DIR) -> tuple[str | None, bool]:
    """(commit, dirty) of the git checkout whose tracked files include `directory`'s
    __init__.py (the package's own, by default): dirty when tracked files differ from the
    commit; (None, False) when the package does not live in a git checkout."""
    if _git(directory, "ls-files", "--error-unmatch", "__init__.py") is None:
        return None, False
    commit = _git(directory, "rev-parse", "HEAD")
    if commit is None:
        return None, False
    return commit, bool(_git(directory, "status", "--porcelain", "--untracked-files=no"))


def git_commit(directory: Path = PACKAGE_DIR) -> str:
    """`git_state` in one string: the commit, with " (uncommitted changes)" when dirty;
    "unknown" outside a git checkout."""
    commit, dirty = git_state(directory)
    if commit is None:
        return "unknown"
    return f"{commit} (uncommitted changes)" if dirty else commit


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


def run_start(world_size: int) -> dict[str, Any]:
    """One start of a run: the start time (UTC, ISO 8601, now), the command line (sys.argv),
    the world size, the host, m3i's version and git state, and python's, torch's,
    torchvision's and timm's versions."""
    import timm
    import torch
    import torchvision

    from m3i import __version__

    commit, dirty = git_state()
    return {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "argv": list(sys.argv),
        "world_size": world_size,
        "hostname": socket.gethostname(),
        "m3i": __version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
    }
