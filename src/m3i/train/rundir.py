"""A run directory before any work: refuse to write over a run (or over anything else), clear
one on --overwrite, probe that it is writable, and heal what a killed run left behind."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from m3i import runtime
from m3i.data.scan import SCAN_FILE
from m3i.io import TEMPORARY_NAME, OutDirError, writable_dir
from m3i.models.timm_dir import TIMM_DIR_FILES
from m3i.train.checkpoint import HISTORY
from m3i.train.metrics import heal_metrics

log = logging.getLogger("m3i.train")

# every name `m3i pretrain`, `m3i eval` and `m3i report` write into a run directory
RUN_FILES = frozenset(
    {"config.yaml", "metrics.jsonl", "backbone.safetensors", "checkpoint.pt", "tokenizer.json",
     "eval.jsonl", "provenance.json", SCAN_FILE, *TIMM_DIR_FILES}
)  # fmt: skip
RUN_DIRS = frozenset({HISTORY, "stages", "report", "tensorboard", "wandb"})
# the names only a run writes: a directory holding one of them holds a run (a config.yaml or an
# eval.jsonl alone may well be the user's own)
MARKERS = frozenset({"metrics.jsonl", "checkpoint.pt", "backbone.safetensors", HISTORY, "stages"})
STEP_FILE = re.compile(r"step-\d+\.pt")


def is_temporary(path: Path) -> bool:
    """Whether `path` is a temporary file of an interrupted atomic write of a run's file."""
    match = TEMPORARY_NAME.fullmatch(path.name)
    return match is not None and (
        match["name"] in RUN_FILES or STEP_FILE.fullmatch(match["name"]) is not None
    )


def _listing(paths: list[Path]) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in paths)
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def clear_or_refuse(out_dir: Path, overwrite: bool) -> None:
    """Let a new run start in `out_dir` only when it is new or empty, or, with `overwrite`,
    holds a run and nothing else (then the run is removed); an OutDirError otherwise. Files
    that are not a run's are never removed."""
    if not out_dir.is_dir():
        return
    entries = list(out_dir.iterdir())
    if not entries:
        return
    if not any(entry.name in MARKERS for entry in entries):
        replace = " for --overwrite to replace" if overwrite else ""
        raise OutDirError(
            f"--out {out_dir} is not empty and holds no m3i run{replace} ({_listing(entries)}); "
            "give a new or empty directory"
        )
    if not overwrite:
        raise OutDirError(
            f"--out {out_dir} holds a run ({_listing(entries)}); continue it with "
            f"--resume {out_dir}, replace it with --overwrite, or give another --out"
        )
    foreign = [e for e in entries if e.name not in RUN_FILES | RUN_DIRS and not is_temporary(e)]
    if foreign:
        raise OutDirError(
            f"--out {out_dir} holds a run and files that are not a run's ({_listing(foreign)}); "
            "--overwrite removes only a run's files: move those away or give another --out"
        )
    removed = _listing(entries)
    try:
        for entry in entries:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    except OSError as err:
        raise OutDirError(
            f"--overwrite could not remove {err.filename} ({err.strerror}); remove the old run "
            "by hand or give another --out"
        ) from None
    log.warning("--overwrite: removed the run in %s (%s)", out_dir, removed)


def heal(out_dir: Path) -> None:
    """Before a resume: remove the temporaries of writes a kill interrupted (only a run's own
    names) and drop a half-written last line of metrics.jsonl, each said in one line."""
    orphans = [
        path
        for directory in (out_dir, out_dir / HISTORY)
        if directory.is_dir()
        for path in directory.iterdir()
        if is_temporary(path) and path.is_file()
    ]
    for path in orphans:
        path.unlink()
    if orphans:
        log.warning("removed %d temporary file(s) of interrupted writes: %s", len(orphans),
                    ", ".join(str(p) for p in orphans))  # fmt: skip
    heal_metrics(out_dir / "metrics.jsonl")


def remove_if_empty(out_dir: Path) -> None:
    """Remove a run directory this run created if the run failed before writing any file into
    it but its data scan (bad input found after the probe, e.g. while building the model): a
    failed start leaves nothing behind. A directory holding any other file is kept as it is."""
    if out_dir.is_dir() and not any(
        p.is_file() and p != out_dir / SCAN_FILE for p in out_dir.rglob("*")
    ):
        shutil.rmtree(out_dir, ignore_errors=True)


def prepare(out_dir: Path, resume: bool = False, overwrite: bool = False) -> None:
    """Everything about `out_dir` that can fail, before the model is built: rank 0 decides
    (refuses, clears, probes, heals) and every rank raises the same one-line error."""
    error = None
    if runtime.rank() == 0:
        try:
            if not resume:
                clear_or_refuse(out_dir, overwrite)
            writable_dir(out_dir, "--resume" if resume else "--out")
            if resume:
                heal(out_dir)
        except (ValueError, OSError) as err:  # OutDirError, MetricsError; a failed removal
            error = err
    message = runtime.from_rank0(None if error is None else str(error))
    if error is not None:
        raise error
    if message is not None:
        raise OutDirError(message)
