"""The whole pre-training job, as `m3i pretrain` runs it: the run (`train.pretrain`), then on
rank 0 the final evaluation (`monitor.final_eval`, each result printed and recorded in
eval.jsonl as soon as it is computed) and the report (RUN/report/)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from m3i import runtime
from m3i.config import Config, ConfigError
from m3i.eval.tasks import TASKS
from m3i.train.pretrain import pretrain


def check_final_eval(tasks: list[str]) -> None:
    """`monitor.final_eval` may only name eval tasks (checked before the run starts)."""
    if not set(tasks) <= set(TASKS):
        raise ConfigError(f"monitor.final_eval {tasks} may only list {', '.join(TASKS)}")


class Interrupted(Exception):
    """Ctrl-C arrived; the message says what was recorded before it (exit status 130)."""


def pretrain_job(
    cfg: Config,
    out_dir: str | Path,
    *,
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    started: Callable[[], None] | None = None,
) -> Path:
    """Pre-train `cfg` into `out_dir`, then, on rank 0, run its final evaluation and write its
    report, exactly as `m3i pretrain` does; the run directory. The options are
    `m3i.train.pretrain.pretrain`'s."""
    out = Path(out_dir)
    check_final_eval(cfg.monitor.final_eval)
    pretrain(cfg, out, progress=progress, resume=resume, overwrite=overwrite, started=started)
    if runtime.launched_by_torchrun() and os.environ.get("RANK", "0") != "0":
        return out
    print(f"m3i: wrote {out / 'backbone.safetensors'} and {out / 'metrics.jsonl'}", file=sys.stderr)
    final_evaluation(cfg, out)
    from m3i.eval.report import write_report

    try:
        write_report([out])
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted while writing the report; the run and its evaluations are recorded in "
            f"{out}; write the report with `m3i report {out}`"
        ) from None
    print(f"m3i: report in {out / 'report'} (summary.md and plots)", file=sys.stderr)
    return out


def final_evaluation(cfg, out: Path) -> None:
    """Run `monitor.final_eval` on the finished run: print one line per task and record it as
    soon as it is computed (Ctrl-C: an Interrupted saying which results were recorded)."""
    from m3i.data.base import DataError
    from m3i.data.specs import eval_spec
    from m3i.eval.features import EvalError
    from m3i.eval.settings import EvalSettings
    from m3i.eval.tasks import evaluate_each, record_result

    monitor = cfg.monitor
    if not monitor.final_eval:
        return
    settings = EvalSettings(
        num_train=min(
            cfg.data.num_train or monitor.final_eval_num_train, monitor.final_eval_num_train
        ),
        num_val=monitor.final_eval_num_val,
        image_size=cfg.data.image_size,
        data_seed=cfg.data.seed,
        device=cfg.train.device,
    )
    recorded = []
    try:
        for result in evaluate_each(monitor.final_eval, out, eval_spec(cfg.data.spec), settings):
            print(f"m3i: {format_result(result)}", flush=True)
            if record_result(result):
                recorded.append(result["task"])
    except (EvalError, DataError) as err:
        print(f"m3i: no final evaluation: {err}", file=sys.stderr)
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted during the final evaluation; the run's files are written and "
            f"{out / 'eval.jsonl'} records {', '.join(recorded) or 'no result'}; evaluate with "
            f"`m3i eval TASK --checkpoint {out}`"
        ) from None


def format_result(result: dict) -> str:
    """`knn on shapes: top1 25.15  top5 77.75` (plus what the protocol chose, e.g. lr)."""
    values = {**result["metrics"], **result["chosen"]}
    return f"{result['task']} on {result['data']}: " + "  ".join(
        f"{k} {v:.4g}" for k, v in values.items()
    )
