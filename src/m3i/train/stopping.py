"""Why a run stops before its last step: a stop signal (SIGTERM, SIGINT) answered at the end of
a step, and too many non-finite steps in a row; the errors that say so."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

from m3i import runtime
from m3i.train.metrics import MetricsLog

log = logging.getLogger("m3i.train")


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite losses in a row)."""


class TrainingStopped(TrainingError):
    """SIGTERM (or SIGINT) arrived: the run saved a checkpoint at the end of its step."""


def record_skip(metrics: MetricsLog, step: int, why: str, bad_in_a_row: int, max_bad: int) -> None:
    """Log a skipped step; stop the run after `max_bad` in a row."""
    metrics.write({"step": step, "skipped": why})
    log.warning("step %d skipped: %s", step, why)
    if bad_in_a_row >= max_bad:
        last = metrics.path.parent / "checkpoint.pt"
        where = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint yet"
        raise TrainingError(
            f"{bad_in_a_row} non-finite losses or gradients in a row (last at step {step}: "
            f"{why}); lower train.lr or check the data; {where}"
        )


@contextlib.contextmanager
def stop_signals() -> Iterator[list[int]]:
    """Collect SIGTERM/SIGINT instead of dying mid-step (handlers only in the main thread). A
    signal that is still unanswered when the block ends without an exception (it came after the
    loop's last look, e.g. during the final save) is sent again once the old handlers are back,
    so that it stops the process as it would have without the block."""
    received: list[int] = []
    before = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            before[sig] = signal.signal(sig, lambda number, _: received.append(number))
    try:
        yield received
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    if received:  # reached only when the block ended without an exception
        signal.raise_signal(received[0])


def should_stop(received: list[int]) -> bool:
    """Whether any rank received a stop signal (all ranks agree, so they stop together)."""
    return runtime.any_rank(bool(received))
