"""The run's metrics log: metrics.jsonl, mirrored to TensorBoard when it is installed and to
Weights & Biases when monitor.wandb asks for it."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from m3i.config import ConfigError, MonitorConfig
from m3i.errors import first_line
from m3i.io import append_jsonl, atomic_write_text

log = logging.getLogger("m3i.train")


class MetricsError(ValueError):
    """A metrics.jsonl line that is not JSON, before its last; the message names file and line."""


def heal_metrics(path: Path) -> None:
    """Make a killed run's metrics.jsonl whole again before it is resumed: a half-written last
    line is dropped (with a one-line warning naming the file), a complete last line without
    its newline gets one; any earlier line that is not JSON is a MetricsError."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    for number, line in enumerate(lines, start=1):
        try:
            json.loads(line)
        except json.JSONDecodeError as err:
            if number < len(lines):
                raise MetricsError(
                    f"{path}:{number}: not a JSON line ({err.msg}); delete or fix that line to "
                    "resume"
                ) from None
            atomic_write_text(path, "".join(lines[:-1]))
            log.warning(
                "%s: dropped its half-written last line %d (%s), left by a killed run",
                path, number, err.msg,
            )  # fmt: skip
            return
    if lines and not lines[-1].endswith("\n"):
        atomic_write_text(path, "".join(lines) + "\n")


def require_wandb() -> Any:
    """The wandb module, or a one-line ConfigError naming the extra that installs it."""
    try:
        import wandb
    except ImportError:
        raise ConfigError(
            'monitor.wandb=true needs wandb, which is not installed: pip install -e ".[wandb]" '
            "(or set monitor.wandb=false)"
        ) from None
    return wandb


def open_wandb(out_dir: Path, monitor: MonitorConfig, config: dict[str, Any]) -> Any:
    """A W&B run writing under out_dir/wandb, with the resolved `config`, named
    monitor.wandb_name or the run folder's name; its id is kept in out_dir/wandb/run-id, so a
    resumed run continues the same W&B run."""
    wandb = require_wandb()
    id_file = out_dir / "wandb" / "run-id"
    if not id_file.is_file():
        atomic_write_text(id_file, secrets.token_hex(8))
    name = monitor.wandb_name or out_dir.resolve().name
    try:
        return wandb.init(
            project=monitor.wandb_project, name=name, dir=out_dir, config=config,
            resume="allow", id=id_file.read_text().strip(),
        )  # fmt: skip
    except wandb.Error as err:
        raise ConfigError(
            f"monitor.wandb: wandb.init failed ({first_line(err)}); log in "
            "with `wandb login`, or log offline with WANDB_MODE=offline"
        ) from None


class MetricsLog:
    """Appends one JSON object per record; numeric values also go to TensorBoard scalars and,
    with a W&B run, to it under the same keys and steps. Closed on leaving a `with` block."""

    def __init__(
        self,
        out_dir: Path,
        tensorboard: bool = True,
        enabled: bool = True,
        resume_step: int | None = None,
        wandb_run: Any = None,
    ) -> None:
        """`enabled=False` (ranks other than 0) writes nothing; `resume_step` keeps the records
        up to that step (a resumed run drops what its killed predecessor logged after it);
        `wandb_run` (open_wandb's) is finished by `close`.

        Every record gets `elapsed_s`: wall seconds since training began, counted from this
        log's creation and, on a resume, added to the last kept record's (the time between the
        kill and the resume is not counted)."""
        self.path = out_dir / "metrics.jsonl"
        self.enabled = enabled
        self.writer, self.wandb_run = None, wandb_run
        self.started, self.elapsed_before = time.perf_counter(), 0.0
        if not enabled:
            return
        kept: list[str] = []
        if resume_step is not None and self.path.exists():
            lines = self.path.read_text().splitlines(keepends=True)
            kept = [line for line in lines if json.loads(line)["step"] <= resume_step]
            if kept:
                self.elapsed_before = json.loads(kept[-1]).get("elapsed_s") or 0.0
        atomic_write_text(self.path, "".join(kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.info("tensorboard is not installed: metrics go to metrics.jsonl only")
            else:
                self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step)

    def write(self, record: dict[str, Any]) -> None:
        """Append `record`; a non-finite number (e.g. an information estimate that the batch is
        too small to define) is written as JSON null and not sent to TensorBoard."""
        if not self.enabled:
            return
        elapsed = self.elapsed_before + time.perf_counter() - self.started
        record = {
            k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in {**record, "elapsed_s": round(elapsed, 3)}.items()
        }
        append_jsonl(self.path, record)
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, record["step"])
            self.writer.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=record["step"])

    def close(self, failed: bool = False) -> None:
        """Close TensorBoard's writer and finish the W&B run (as failed when `failed`)."""
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1 if failed else 0)
            self.wandb_run = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self.close(failed=kind is not None)

    @contextlib.contextmanager
    def closed_on_failure(self) -> Iterator[None]:
        """Close the log (a failed W&B run) if the block raises; leave it open otherwise."""
        try:
            yield
        except BaseException:
            self.close(failed=True)
            raise
