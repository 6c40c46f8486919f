"""The start-up warning that the input pipeline cannot keep up with the step: its rates in
closed form, once, only when slow; and in a real (tiny) `m3i pretrain` with a slowed source."""

import logging
import time

import pytest

from m3i.config import load_config
from m3i.data.stream import BatchStream
from m3i.train.input_rate import InputRateCheck, usable_cores, watch_input_rate
from m3i.train.pretrain import pretrain


def record_steps(check: InputRateCheck, wait_s: float, step_s: float, steps: int) -> None:
    for _ in range(steps):
        check.record(wait_s, step_s)


def test_main_process_views_warn_once_with_the_rates_in_closed_form():
    warnings = []
    check = InputRateCheck(batch_size=10, workers=0, warn=warnings.append, skip=3, window=10)
    record_steps(check, wait_s=5.0, step_s=1.0, steps=3)  # start-up: ignored however slow
    assert warnings == [] and not check.done
    record_steps(check, wait_s=0.1, step_s=0.05, steps=10)
    # views made between steps: 10 images per 0.1 s wait = 100 img/s; 10 per 0.05 s = 200
    (message,) = warnings
    assert "delivers ~100 img/s, the step consumes 200 img/s" in message
    assert "waited for data 67% of the time" in message
    assert f"raise data.workers (now 0; this machine has {usable_cores()} cores)" in message
    assert "m3i bench data" in message and "\n" not in message
    assert check.done
    record_steps(check, wait_s=0.1, step_s=0.05, steps=30)
    assert len(warnings) == 1  # once


def test_with_workers_the_input_rate_is_the_throughput():
    check = InputRateCheck(batch_size=8, workers=2, warn=print, skip=0, window=4)
    # views made alongside the step: 8 images per (wait + step) = 8 / 0.2 = 40 img/s
    assert check.rates(wait_s=4 * 0.1, step_s=4 * 0.1, steps=4) == pytest.approx((40.0, 80.0))
    many = InputRateCheck(batch_size=8, workers=4096, warn=print)
    assert "already uses every core" in many.message(40.0, 80.0, 0.5)


def test_silent_when_the_input_keeps_up_and_done_after_the_start_up():
    warnings = []
    check = InputRateCheck(batch_size=10, workers=0, warn=warnings.append, skip=3, window=10,
                           last=53)  # fmt: skip
    record_steps(check, wait_s=0.01, step_s=0.05, steps=52)  # 1000 img/s in, 200 out
    assert warnings == [] and not check.done
    record_steps(check, wait_s=0.01, step_s=0.05, steps=1)
    assert check.done  # a start-up check: it stops watching


def paced(batches: int, seconds: float):
    for number in range(batches):
        time.sleep(seconds)
        yield number


@pytest.mark.parametrize(("wait_s", "step_s", "warned"), [(0.02, 0.0, True), (0.0, 0.02, False)])
def test_the_wrapped_stream_is_timed_and_passed_through(wait_s, step_s, warned):
    warnings = []
    check = InputRateCheck(batch_size=4, workers=0, warn=warnings.append, skip=1, window=5)
    seen = []
    for batch in watch_input_rate(paced(20, wait_s), 4, 0, check):
        seen.append(batch)
        time.sleep(step_s)
    assert seen == list(range(20))  # every batch, in order, after the check is done too
    assert len(warnings) == int(warned)


def test_pretrain_with_a_slow_source_warns_once(tmp_path, monkeypatch, caplog):
    take = BatchStream.__next__

    def slowed(self):
        time.sleep(0.2)
        return take(self)

    monkeypatch.setattr(BatchStream, "__next__", slowed)
    overrides = ["model.depth=1", "model.img_size=16", "model.patch_size=8", "data.num_train=64"]
    overrides += ["train.batch_size=8", "train.steps=16", "data.image_size=16"]
    overrides += ["monitor.every=0", "monitor.final_eval=[]"]
    cfg = load_config("supervised", overrides=overrides)
    with caplog.at_level(logging.WARNING, logger="m3i.train"):
        pretrain(cfg, tmp_path / "run", progress=False)
    messages = [r.getMessage() for r in caplog.records if "input pipeline" in r.getMessage()]
    assert len(messages) == 1, messages
    assert "raise data.workers (now 0;" in messages[0]
