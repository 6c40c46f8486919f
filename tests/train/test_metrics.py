"""metrics.jsonl is strict JSON (an undefined figure is null, never NaN or Infinity), and its
`elapsed_s` counts training wall time across a resume."""

import json

from m3i.train.metrics import MetricsLog


def test_non_finite_numbers_are_written_as_null(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    log.write({"step": 1, "loss": 2.5, "mi/view_regress": float("nan"), "mi/x": float("inf")})
    log.close()
    line = (tmp_path / "metrics.jsonl").read_text().strip()

    def refuse(constant):
        raise AssertionError(f"{constant} in metrics.jsonl")

    record = json.loads(line, parse_constant=refuse)  # strict: NaN/Infinity are refused
    record.pop("elapsed_s")
    assert record == {"step": 1, "loss": 2.5, "mi/view_regress": None, "mi/x": None}


def test_elapsed_seconds_continue_across_a_resume(tmp_path, monkeypatch):
    clock = iter([100.0, 103.5, 110.0, 500.0, 502.0])  # perf_counter readings, in call order
    monkeypatch.setattr("m3i.train.metrics.time.perf_counter", lambda: next(clock))
    log = MetricsLog(tmp_path, tensorboard=False)  # starts at 100
    log.write({"step": 10})  # 3.5 s in
    log.write({"step": 20})  # 10 s in; dropped by the resume below
    log.close()
    resumed = MetricsLog(tmp_path, tensorboard=False, resume_step=10)  # starts at 500
    resumed.write({"step": 20})  # 3.5 s before the kill + 2 s since the resume
    resumed.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 10, "elapsed_s": 3.5},
        {"step": 20, "elapsed_s": 5.5},
    ]
