"""The run's metrics log: metrics.jsonl, mirrored to TensorBoard when it is installed."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from m3i.io import append_jsonl, atomic_write_text

log = logging.getLogger("m3i.train")


class MetricsLog:
    """Appends one JSON object per record; numeric values also go to TensorBoard scalars."""

    def __init__(self, out_dir: Path, tensorboard: bool = True) -> None:
        self.path = out_dir / "metrics.jsonl"
        atomic_write_text(self.path, "")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.info("tensorboard is not installed: metrics go to metrics.jsonl only")
            else:
                self.writer = SummaryWriter(str(out_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        append_jsonl(self.path, record)
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
