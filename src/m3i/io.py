"""Atomic writes: every file of a run is written to a temporary name, then renamed; and a
check, before any work, that a directory can be written to."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

# the temporary name of atomic_write: `.NAME.` + mkstemp's 8 random characters + `.tmp`
TEMPORARY_NAME = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp")


class OutDirError(ValueError):
    """A directory cannot be written to, or holds what must not be overwritten; one line."""


def writable_dir(
    path: str | Path, what: str = "--out", advice: str = "give a directory you can write to"
) -> Path:
    """Create `path` (with its parents) and check that a file can be created in it, so that a
    run fails here, in one line, rather than when it first saves (an OutDirError)."""
    path = Path(path)
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker == path:
        raise OutDirError(f"{what} {path} is a file, not a directory; {advice}")
    if blocker is not None:
        raise OutDirError(f"{what} {path} is under {blocker}, which is a file; {advice}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # O_TMPFILE where it can: no name left behind
            pass
    except OSError as err:
        raise OutDirError(f"{what} {path} is not writable ({err.strerror}); {advice}") from None
    return path


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)`, then rename tmp_path onto `path` (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_save_safetensors(
    state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one complete line (a single write, flushed)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def atomic_copy(src: str | Path, dst: str | Path) -> None:
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))
