"""The run's metrics log: metrics.jsonl, mirrored to TensorBoard when it is installed."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

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


class MetricsLog:
    """Appends one JSON object per record; numeric values also go to TensorBoard scalars."""

    def __init__(
        self,
        out_dir: Path,
        tensorboard: bool = True,
        enabled: bool = True,
        resume_step: int | None = None,
    ) -> None:
        """`enabled=False` (ranks other than 0) writes nothing; `resume_step` keeps the records
        up to that step (a resumed run drops what its killed predecessor logged after it).

        Every record gets `elapsed_s`: wall seconds since training began, counted from this
        log's creation and, on a resume, added to the last kept record's (the time between the
        kill and the resume is not counted)."""
        self.path = out_dir / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
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
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
