"""A start-up check that the input pipeline keeps up with the training step.

The loop's batch stream is wrapped by :func:`watch_input_rate`, which times each wait for a
batch (inside ``next``) and each step (from a batch's arrival to the request for the next one).
After the first few steps it compares, window by window, the rate at which batches arrive with
the rate at which the step consumes them, logs one warning line the first time the input is
too slow, and then gets out of the way (the stream is passed through untouched).

The input rate is an estimate. With ``data.workers=0`` the views are made in the main process,
between steps, so the input rate is batch / wait. With workers they are made alongside the
step, so a pipeline that keeps up shows no wait at all, and one that does not sets the pace:
the input rate is then the training throughput, batch / (wait + step).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

log = logging.getLogger("m3i.train")
T = TypeVar("T")

SKIP_STEPS = 3  # start-up: worker start, the first batches, compilation
WINDOW_STEPS = 10  # steps per comparison
LAST_STEP = 200  # no comparison starts after this step: a start-up check only
SLACK = 0.9  # warn when the input delivers less than this share of what the step consumes


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class InputRateCheck:
    """Sums the waits and step times of windows of steps and warns once when the input is slow.

    `record(wait_s, step_s)` is called once per step; `done` turns true after the warning or
    once the start-up steps are over.
    """

    def __init__(
        self,
        batch_size: int,
        workers: int,
        warn: Callable[[str], None] = log.warning,
        skip: int = SKIP_STEPS,
        window: int = WINDOW_STEPS,
        last: int = LAST_STEP,
    ) -> None:
        self.batch_size, self.workers, self.warn = batch_size, workers, warn
        self.skip, self.window, self.last = skip, window, last
        self.steps, self.wait_s, self.step_s, self.counted = 0, 0.0, 0.0, 0
        self.done = False

    def rates(self, wait_s: float, step_s: float, steps: int) -> tuple[float, float]:
        """(input img/s, an estimate; step img/s) over `steps` steps with these summed times."""
        images = steps * self.batch_size
        made_in = wait_s if self.workers == 0 else wait_s + step_s
        return images / max(made_in, 1e-12), images / max(step_s, 1e-12)

    def record(self, wait_s: float, step_s: float) -> None:
        """One step: `wait_s` seconds waiting for its batch, `step_s` seconds of training on it."""
        self.steps += 1
        if self.done or self.steps <= self.skip:
            return
        self.wait_s += wait_s
        self.step_s += step_s
        self.counted += 1
        if self.counted < self.window:
            return
        supply, demand = self.rates(self.wait_s, self.step_s, self.counted)
        if supply < SLACK * demand:
            self.warn(self.message(supply, demand, self.wait_s / (self.wait_s + self.step_s)))
            self.done = True
        self.wait_s, self.step_s, self.counted = 0.0, 0.0, 0
        self.done = self.done or self.steps >= self.last

    def message(self, supply: float, demand: float, waiting: float) -> str:
        cores = usable_cores()
        if self.workers < cores:
            advice = f"raise data.workers (now {self.workers}; this machine has {cores} cores)"
        else:
            advice = (
                f"data.workers={self.workers} already uses every core: make the data cheaper "
                "(a smaller data.image_size, pre-rendered wds: shards) or use more cores"
            )
        return (
            f"the input pipeline delivers ~{supply:.0f} img/s, the step consumes {demand:.0f} "
            f"img/s (the step waited for data {100 * waiting:.0f}% of the time): {advice}; "
            "`m3i bench data` measures each source against the number of workers"
        )


def watch_input_rate(
    stream: Iterable[T], batch_size: int, workers: int, check: InputRateCheck | None = None
) -> Iterator[T]:
    """`stream`'s batches, timed by `check` (by default an InputRateCheck that logs its warning)
    until it is done, then passed through untouched."""
    check = InputRateCheck(batch_size, workers) if check is None else check
    batches = iter(stream)
    while not check.done:
        asked = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            return
        arrived = time.perf_counter()
        yield batch
        check.record(arrived - asked, time.perf_counter() - arrived)
    yield from batches
