"""metrics.jsonl is strict JSON: an undefined figure is null, never NaN or Infinity."""

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
    assert record == {"step": 1, "loss": 2.5, "mi/view_regress": None, "mi/x": None}
