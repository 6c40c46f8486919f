"""The `m3i` command: argument parsing only; validated configs go to the trainer."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from m3i.config import ConfigError, load_config, preset_names, preset_values


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m3i", description="All-in-one pre-training (M3I).")
    sub = parser.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("pretrain", help="pre-train a backbone with a preset or a config file")
    source = pre.add_mutually_exclusive_group()
    source.add_argument("--preset", help="a preset name (see `m3i presets`); default m3i")
    source.add_argument("--config", help="a YAML config file (may name a `base:` preset)")
    pre.add_argument(
        "--data", help="shapes | fashion-mnist[:DIR] | folder:PATH | captions:FILE.jsonl"
    )
    pre.add_argument("--out", help="run directory (default runs/<preset>-<time>)")
    pre.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. train.steps=20 (repeatable)",
    )
    pre.add_argument("--quiet", action="store_true", help="no progress bar")
    sub.add_parser("presets", help="list the presets, one line each")
    return parser


def _pretrain(args: argparse.Namespace) -> int:
    from m3i.train.loop import pretrain

    cfg = load_config(
        preset=args.preset, config_file=args.config, overrides=args.overrides, data=args.data
    )
    out = Path(args.out or f"runs/{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    print(
        f"m3i: pre-training preset {cfg.preset!r} on {cfg.data.spec!r} into {out}", file=sys.stderr
    )
    pretrain(cfg, out, progress=not args.quiet)
    print(f"m3i: wrote {out / 'backbone.safetensors'} and {out / 'metrics.jsonl'}", file=sys.stderr)
    return 0


def _presets() -> int:
    names = preset_names()
    width = max(map(len, names))
    for name in names:
        print(f"{name:<{width}}  {preset_values(name).get('description', '')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="m3i: %(message)s")
    args = _parser().parse_args(argv)
    from m3i.data.sources import DataError
    from m3i.train.loop import TrainingError

    try:
        if args.command == "pretrain":
            return _pretrain(args)
        return _presets()
    except (ConfigError, DataError, TrainingError, ValueError) as err:
        print(f"m3i: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
