"""The `m3i` command: argument parsing only; validated configs go to the trainer."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

from m3i.config import ConfigError, load_config, preset_names, preset_values
from m3i.eval.tasks import TASKS
from m3i.train.job import Interrupted, check_final_eval, format_result


def add_overrides(parser: argparse.ArgumentParser, help: str) -> None:
    """The repeatable `--set KEY=VALUE` option, collected in `overrides`."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m3i", description="All-in-one pre-training (M3I).")
    sub = parser.add_subparsers(dest="command", required=True)
    _pretrain_parser(sub)
    sub.add_parser("presets", help="list the presets, one line each")
    _eval_parser(sub)
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    _speed_parser(bench)
    _data_bench_parser(bench)
    _ablation_parser(bench)
    _report_parser(sub)
    return parser


def _pretrain_parser(sub: argparse._SubParsersAction) -> None:
    """`m3i pretrain`."""
    pre = sub.add_parser("pretrain", help="pre-train a backbone with a preset or a config file")
    source = pre.add_mutually_exclusive_group()
    source.add_argument("--preset", help="a preset name (see `m3i presets`); default m3i")
    source.add_argument("--config", help="a YAML config file (may name a `base:` preset)")
    source.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a run from its newest checkpoint (its config; --set may change train.steps)",
    )
    pre.add_argument(
        "--data",
        action="append",
        help="shapes | fashion-mnist[:DIR] | folder:PATH | images:PATH | captions:FILE.jsonl | "
        "wds:PATTERN; repeat it to mix sources (their shares: --set data.weights=[w1,w2,...])",
    )
    pre.add_argument("--out", help="run directory, new or empty (default runs/<preset>-<time>)")
    pre.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in --out (its files only; refused if the directory holds others)",
    )
    add_overrides(pre, "override a config key, e.g. train.steps=20 (repeatable)")
    pre.add_argument("--quiet", action="store_true", help="no progress bar")


def _eval_parser(sub: argparse._SubParsersAction) -> None:
    """`m3i eval TASK`."""
    ev = sub.add_parser("eval", help="evaluate a backbone: " + ", ".join(TASKS))
    ev.add_argument(
        "task", help="; ".join(f"{name} (needs {task.describe()})" for name, task in TASKS.items())
    )
    ev.add_argument(
        "--checkpoint", required=True, help="a run directory or its backbone.safetensors"
    )
    ev.add_argument("--data", help="data spec (default: the run's own, else shapes)")
    ev.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    add_overrides(
        ev,
        "override an eval setting, e.g. knn.k=10, num_train=2000, crop_pct=1, workers=4, "
        "zeroshot.classnames=imagenet1k or a file (repeatable; docs/evaluation.md)",
    )


def _speed_parser(bench: argparse._SubParsersAction) -> None:
    """`m3i bench speed`."""
    speed = bench.add_parser(
        "speed",
        help="step speed against peers and the matmul peak",
        description="Times the m3i preset's step against the single-objective presets' steps "
        "and the peers' MAE and CLIP, all on one backbone and batch: the presets' own, changed "
        "for every compared preset alike with --set.",
    )
    speed.add_argument("--steps", type=int, default=3, help="timed steps per kind and round")
    speed.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    speed.add_argument("--no-peers", action="store_true", help="skip lightly and open_clip")
    speed.add_argument("--device", default="auto", help="auto | cpu | cuda")
    speed.add_argument("--json", action="store_true", help="print one JSON object last")
    add_overrides(
        speed,
        "a config override applied to every compared preset, e.g. model.name=vit_small_patch16_224"
        ", model.img_size=64, model.depth=null (the timm model's own), train.batch_size=32, "
        "mix.isolate=false (repeatable)",
    )


def _data_bench_parser(bench: argparse._SubParsersAction) -> None:
    """`m3i bench data`."""
    data = bench.add_parser("data", help="images/s of each data source against the workers")
    data.add_argument(
        "--data",
        action="append",
        help="a data spec, or folder / wds: JPEGs written from shapes (repeatable; default "
        "shapes, folder and wds)",
    )
    data.add_argument("--img-size", type=int, help="view (and shapes) size; default the preset's")
    data.add_argument("--batch", type=int, default=64)
    data.add_argument("--workers", default="0,1,2,4,8,16", help="counts up to the usable cores")
    data.add_argument("--batches", type=int, default=10, help="per timing (at least)")
    data.add_argument("--repeats", type=int, default=3, help="timings per source and workers")
    data.add_argument("--samples", type=int, default=256, help="images of generated data")
    data.add_argument("--preset", default="m3i", help="whose views.* (and image size) to use")
    data.add_argument("--device", default="cpu", help="where batches go: cpu | cuda | auto")
    data.add_argument("--json", action="store_true", help="print one JSON object last")
    add_overrides(data, "a config override, e.g. views.color_jitter=0 (repeatable)")


def _ablation_parser(bench: argparse._SubParsersAction) -> None:
    """`m3i bench ablation`."""
    abl = bench.add_parser(
        "ablation",
        help="every method at equal training FLOPs (M3I's at the budget's steps), evaluated alike",
    )
    abl.add_argument("--budget", choices=["tiny", "smoke", "quick", "full", "gpu"], default="quick")
    abl.add_argument("--data", action="append", help="data spec (repeatable; default: budget's)")
    abl.add_argument("--seeds", type=int, help="seeds per data spec (default: the budget's)")
    abl.add_argument("--out", default="runs/ablation", help="directory for runs and results")
    abl.add_argument(
        "--resume",
        action="store_true",
        help="keep the finished runs in --out that were made with the same config, settings "
        "and code, and run the rest (an ablation that was stopped continues)",
    )
    abl.add_argument(
        "--overwrite", action="store_true", help="run every run again, replacing those in --out"
    )
    abl.add_argument(
        "--equal",
        choices=["flops", "steps"],
        default="flops",
        help="flops: each method trains for M3I's training FLOPs (more steps when its steps are "
        "cheaper); steps: each method trains the budget's steps (default flops)",
    )
    add_overrides(
        abl,
        "a config override for every run, after the budget's, e.g. model.name=convnext_atto "
        "(repeatable)",
    )
    abl.add_argument(
        "--eval-set",
        dest="eval_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an evaluation setting for every run, after the budget's, e.g. num_train=64, "
        "detect.epochs=1 (repeatable; the keys of `m3i eval --set`)",
    )


def _report_parser(sub: argparse._SubParsersAction) -> None:
    """`m3i report`."""
    rep = sub.add_parser("report", help="plots and a summary table of one or more runs")
    rep.add_argument("runs", nargs="+", metavar="RUN_DIR")
    rep.add_argument("--out", help="write here instead of each run's report/")


def _pretrain(args: argparse.Namespace) -> int:
    from m3i.train.job import pretrain_job

    if args.resume:
        if args.out or args.data or args.overwrite:
            raise ConfigError(
                "--resume continues RUN_DIR with its own data; drop --out/--data/--overwrite"
            )
        saved = Path(args.resume) / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"--resume {args.resume}: no config.yaml there; give a run directory")
        cfg = load_config(config_file=saved, overrides=args.overrides)
        out = Path(args.resume)
    else:
        cfg = load_config(
            preset=args.preset, config_file=args.config, overrides=args.overrides, data=args.data
        )
        out = Path(args.out or f"runs/{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    check_final_eval(cfg.monitor.final_eval)
    verb = "resuming" if args.resume else "pre-training"

    def started() -> None:
        data = cfg.data.spec if isinstance(cfg.data.spec, str) else " + ".join(cfg.data.spec)
        print(f"m3i: {verb} preset {cfg.preset!r} on {data!r} in {out}", file=sys.stderr)

    pretrain_job(
        cfg,
        out,
        progress=not args.quiet,
        resume=bool(args.resume),
        overwrite=args.overwrite,
        started=started,
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    """Compute the result, print it, then record it (a result that cannot be recorded is still
    printed, with a warning, and the exit status is 0)."""
    from m3i.eval.settings import load_settings
    from m3i.eval.tasks import evaluate_each, record_result

    settings = load_settings(args.overrides)
    try:
        (result,) = evaluate_each([args.task], args.checkpoint, args.data, settings)
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted before the {args.task} result was computed; nothing was recorded"
        ) from None
    summary = format_result(result)
    if args.json:
        print(summary, file=sys.stderr)
        print(json.dumps(result), flush=True)
    else:
        print(summary, flush=True)
    record_result(result)
    return 0


def _report(args: argparse.Namespace) -> int:
    from m3i.eval.report import write_report

    written = write_report(args.runs, args.out)
    for path in written:
        print(path)
    return 0


def _ablation(args: argparse.Namespace) -> int:
    from m3i.bench.ablation import METHODS, REMOVALS, run_ablation
    from m3i.bench.ablation_report import write_results
    from m3i.bench.provenance import provenance

    if args.seeds is not None and args.seeds < 1:
        raise ConfigError("--seeds must be >= 1")
    out = Path(args.out)
    start = time.perf_counter()
    started = provenance(args.command_line)

    def log(message: str) -> None:
        print(f"m3i: {message}", file=sys.stderr)

    ablation = run_ablation(
        args.budget,
        out,
        args.data,
        args.seeds,
        log,
        args.equal,
        args.overrides,
        args.eval_overrides,
        args.resume,
        args.overwrite,
    )
    device, kept = ablation.pop("device"), ablation.pop("kept")
    wall_s = time.perf_counter() - start
    made = {**started, "device": device, "wall_s": wall_s}
    made |= {"kept_runs": len(kept), "kept_commits": sorted(set(kept))}
    report = {"budget": args.budget, "provenance": made}
    report |= ablation
    print(write_results(out, report, list(METHODS), list(REMOVALS)))
    print(f"m3i: wrote {out / 'results.md'}, results.json and ablation.png", file=sys.stderr)
    return 0


def _bench_data(args: argparse.Namespace) -> int:
    from m3i.bench.data import DataBenchSettings, format_table, run_data_bench
    from m3i.runtime import pick_device

    try:
        workers = tuple(int(count) for count in args.workers.split(","))
    except ValueError:
        raise ConfigError(f"--workers {args.workers!r}: give counts, e.g. 0,1,2,4") from None
    settings = DataBenchSettings(
        specs=tuple(args.data or DataBenchSettings.specs),
        img_size=args.img_size,
        batch=args.batch,
        workers=workers,
        batches=args.batches,
        repeats=args.repeats,
        samples=args.samples,
        preset=args.preset,
        overrides=tuple(args.overrides),
    )
    device = pick_device(args.device, "--device")
    report = run_data_bench(settings, device, log=_log)
    return _print_report(format_table(report), report, args.json)


def _bench(args: argparse.Namespace) -> int:
    if args.bench == "ablation":
        return _ablation(args)
    if args.bench == "data":
        return _bench_data(args)
    from m3i.bench.speed import BenchSettings, format_table, run_speed
    from m3i.runtime import pick_device

    if min(args.steps, args.repeats) < 1:
        raise ConfigError("--steps and --repeats must be >= 1")
    settings = BenchSettings(
        steps=args.steps,
        repeats=args.repeats,
        peers=not args.no_peers,
        overrides=tuple(args.overrides),
    )
    device = pick_device(args.device, "--device")
    report = run_speed(settings, device, log=_log)
    return _print_report(format_table(report), report, args.json)


def _log(message: str) -> None:
    print(f"m3i: {message}", file=sys.stderr)


def _print_report(table: str, report: dict, as_json: bool) -> int:
    """A bench's table (on stderr with --json) and, with --json, its report as the last line."""
    print(table, file=sys.stderr if as_json else sys.stdout)
    if as_json:
        print(json.dumps(report))
    return 0


def _presets() -> int:
    names = preset_names()
    width = max(map(len, names))
    for name in names:
        print(f"{name:<{width}}  {preset_values(name).get('description', '')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="m3i: %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    args.command_line = shlex.join(["m3i", *argv])
    from m3i.data.base import DataError
    from m3i.train.checkpoint import CheckpointError
    from m3i.train.stopping import TrainingError, TrainingStopped

    commands = {"pretrain": _pretrain, "eval": _eval, "report": _report, "bench": _bench}
    try:
        if args.command in commands:
            return commands[args.command](args)
        return _presets()
    except TrainingStopped as stop:
        print(f"m3i: {stop}", file=sys.stderr)
        return 143  # 128 + SIGTERM, as a process killed by it
    except Interrupted as stop:
        print(f"m3i: {stop}", file=sys.stderr)
        return 130  # 128 + SIGINT
    except KeyboardInterrupt:
        print("m3i: interrupted", file=sys.stderr)
        return 130
    except (ConfigError, DataError, TrainingError, CheckpointError, ValueError) as err:
        print(f"m3i: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
