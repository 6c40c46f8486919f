"""The config schema: dataclasses, YAML presets and `key=value` overrides, validated up-front.

The sections that a lower layer reads are that layer's own dataclasses (`model`: ModelConfig in
m3i.models.config), assembled here; the eval task names of `monitor.final_eval` are checked
where the tasks are known (the `m3i pretrain` command, which runs them)."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.resources
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from m3i.data.masking import MASKINGS
from m3i.data.mixing import count_a
from m3i.data.specs import is_stream, spec_list
from m3i.data.views import ViewConfig
from m3i.errors import first_line
from m3i.mi.targets import TARGETS
from m3i.models.config import ModelConfig
from m3i.models.decoder import NORMS
from m3i.models.ema import TeacherConfig
from m3i.models.pretrained import init_problem
from m3i.plugins import IMPORTED, PluginError, import_plugin, is_path
from m3i.ranges import (
    COUNT,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    Range,
    one_of,
    ranged,
    value_problem,
)

DEVICES = ("auto", "cpu", "cuda")  # the values of train.device


class ConfigError(ValueError):
    """A bad preset, config file or override; the message is one line."""


@dataclass
class MixConfig:
    # share of grid positions that image A occupies in the mixed input
    ratio: float = ranged(0.5, FRACTION)
    isolate: bool = True  # restrict encoder attention to tokens of the same image
    # how image A's positions are drawn (m3i.data.masking): random | block (BEiT's blocks:
    # SiameseIM's mask, whose masked part is A's) | inverse_block (data2vec 2.0's kept blocks)
    masking: str = one_of("random", MASKINGS)


@dataclass
class DecoderConfig:
    dim: int = ranged(128, Range(4))
    depth: int = ranged(2, COUNT)  # without a block no query sees the encoder tokens
    heads: int = ranged(4, COUNT)
    # layer: LayerNorm blocks and a final LayerNorm; batch: SiameseIM's decoder blocks, BatchNorm
    # over the tokens in place of both LayerNorms of a block, no final norm
    norm: str = one_of("layer", NORMS)
    # SiameseIM's projector: blocks on the encoder tokens before the queries join; an EMA copy
    # of it (and of the embedding) maps the teacher's tokens to the dense targets
    projector_depth: int = ranged(0, Range(0, note="0: no projector"))
    qkv_bias: bool = False  # a bias in the blocks' qkv projection (SiameseIM, MAE: true)


@functools.cache
def _targets_class(sections: tuple[tuple[str, type], ...]) -> type:
    return dataclasses.make_dataclass(
        "TargetsConfig", [(name, cls, field(default_factory=cls)) for name, cls in sections]
    )


def targets_config() -> Any:
    """The `targets` section: one field per registered target (m3i.mi.targets.TARGETS), holding
    that target's own config dataclass."""
    return _targets_class(tuple((name, spec.config) for name, spec in TARGETS.items()))()


@dataclass
class DataConfig:
    # one data spec, or a list of them: a mixture of sources (m3i.data.mixture)
    spec: str | list[str] = "shapes"
    # each source's share of the samples drawn, one per spec ([]: indexable sources in
    # proportion to their sizes; a mixture with a wds: stream, equal shares)
    weights: list[float] = ranged([], POSITIVE)
    # None: the source's own size (of each indexable source)
    num_train: int | None = ranged(None, Range(1, note="null: the whole train split"))
    image_size: int = ranged(32, COUNT)  # side of generated `shapes` images (`shapes`: >= 16)
    # which `shapes` dataset (independent of train.seed); the scans' sample
    seed: int = ranged(0, NON_NEGATIVE)
    workers: int = ranged(0, NON_NEGATIVE)
    verify: bool = True  # open every folder:/images:/captions: image's header before training
    # a wds: stream stops when more than this share of its last 1,000 samples were unreadable
    # (a file source: of all its images; 1 would mean all unreadable, no sample)
    max_corrupt_fraction: float = ranged(0.01, Range(0, 1, high_open=True))
    # samples of a wds: stream read at start-up (label prior, captions)
    scan_samples: int = ranged(10000, COUNT)


@dataclass
class TrainConfig:
    steps: int = ranged(200, NON_NEGATIVE)
    batch_size: int = ranged(64, COUNT)
    lr: float = ranged(1e-3, POSITIVE)
    min_lr: float = ranged(1e-5, NON_NEGATIVE)
    weight_decay: float = ranged(0.05, NON_NEGATIVE)
    warmup_steps: int = ranged(20, NON_NEGATIVE)
    grad_clip: float = ranged(3.0, Range(0, note="0: no clipping"))
    log_every: int = ranged(10, COUNT)
    checkpoint_every: int = ranged(100, COUNT)
    seed: int = ranged(0, NON_NEGATIVE)
    device: str = one_of("auto", DEVICES)
    max_bad_steps: int = ranged(10, COUNT)  # stop after this many non-finite losses in a row
    # checkpoints/step-N.pt kept (the newest is also checkpoint.pt)
    keep_checkpoints: int = ranged(2, COUNT)
    # micro-batches per optimizer step (batch_size is split into them)
    accum_steps: int = ranged(1, COUNT)
    # fp32 | bf16 | fp16 (autocast; fp16 adds a gradient scaler)
    precision: str = one_of("fp32", ("fp32", "bf16", "fp16"))
    grad_checkpointing: bool = False  # recompute backbone blocks in backward to save memory
    compile: bool = False  # torch.compile the step
    dist_timeout: int = ranged(600, COUNT)  # seconds a rank waits for the others before failing
    strategy: str = one_of("ddp", ("ddp", "fsdp"))  # FSDP: FSDP2 fully_shard, under torchrun
    # global batch number of step 1 (multistage: where the last stage ended)
    first_batch: int = ranged(0, Range(0, note="the global batch a stage's first step reads"))


@dataclass
class MonitorConfig:
    # steps between collapse monitors and online kNN
    every: int = ranged(50, Range(0, note="0: no monitors"))
    knn_train: int = ranged(1000, COUNT)  # kNN memory: the first train images
    knn_val: int = ranged(500, COUNT)  # kNN queries: held-out val images
    tensorboard: bool = True  # also log to out/tensorboard when tensorboard is installed
    wandb: bool = False  # also log to Weights & Biases (pip install -e ".[wandb]"), out/wandb
    wandb_project: str = "m3i"
    wandb_name: str = ""  # the W&B run's name ("": the run folder's name)
    # the online kNN's own indexable data spec (e.g. fashion-mnist, folder:PATH with train/ and
    # val/); "": the run's data (its first indexable source)
    data: str = ""
    final_eval: list[str] = field(default_factory=lambda: ["knn", "linear"])  # after training
    # at most this many train images (and data.num_train)
    final_eval_num_train: int = ranged(10000, COUNT)
    final_eval_num_val: int = ranged(2000, COUNT)


@dataclass
class Config:
    preset: str = "m3i"
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    views: ViewConfig = field(default_factory=ViewConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    targets: Any = field(default_factory=targets_config)  # built from the target registry
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    stages: list[str] = field(default_factory=list)  # multistage: presets run one after another
    stage_steps: list[int] = ranged([], NON_NEGATIVE)  # steps per stage ([]: equal split)
    # the backbone's start: an m3i backbone.safetensors or run folder, a timm checkpoint file of
    # model.name, a timm pretrained name, hf-hub:ORG/NAME or local-dir:FOLDER (models/pretrained)
    init: str = ""
    # .py files (relative to the config file naming them) or modules imported before the config
    # is read: each may register targets (docs/architecture.md); only a config file names them
    plugins: list[str] = field(default_factory=list)

    def active_targets(self) -> dict[str, Any]:
        """The target configs whose weight is not zero, by name."""
        return {
            f.name: getattr(self.targets, f.name)
            for f in fields(self.targets)
            if getattr(self.targets, f.name).weight != 0
        }


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flat_keys(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict by dotted key: {"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flat_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _valid_keys(obj: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(obj):
        key = f"{prefix}{f.name}"
        keys.append(key)
        if is_dataclass(getattr(obj, f.name)):
            keys.extend(_valid_keys(getattr(obj, f.name), key + "."))
    return keys


def _unknown_key(key: str, root: Any) -> ConfigError:
    close = difflib.get_close_matches(key, _valid_keys(root), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against the field's type hint, converting ints to floats."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key {key!r} expects a list, got {value!r}")
        return [_coerce(key, v, args[0]) for v in value]
    if args and type(None) in args:  # Optional[X]
        if value is None:
            return None
        return _coerce(key, value, next(a for a in args if a is not type(None)))
    if args:  # X | Y: the first that fits
        for alternative in args:
            try:
                return _coerce(key, value, alternative)
            except ConfigError:
                continue
        names = " or ".join(getattr(a, "__name__", str(a)) for a in args)
        raise ConfigError(f"config key {key!r} expects {names}, got {value!r}")
    if hint is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)  # YAML reads "1e-3" as a string
        except ValueError:
            pass
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(
            f"config key {key!r} expects {hint.__name__}, got {value!r} ({type(value).__name__})"
        )
    return value


def _apply(obj: Any, values: dict[str, Any], prefix: str = "", root: Any = None) -> None:
    """Set nested dataclass fields from a nested dict, checking keys and types (`root`: the
    whole config, whose keys a "did you mean" hint offers)."""
    root = root or obj
    hints = get_type_hints(type(obj))
    names = {f.name for f in fields(obj)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise _unknown_key(key, root)
        if is_dataclass(getattr(obj, name)):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"config key {key!r} is a section; set its keys, e.g. {key}.X=..."
                )
            _apply(getattr(obj, name), value, key + ".", root)
        else:
            setattr(obj, name, _coerce(key, value, hints[name]))


def parse_override(text: str) -> dict[str, Any]:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}}, the value parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value, e.g. train.steps=20")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    nested: dict[str, Any] = {}
    node = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def apply_overrides(obj: Any, overrides: list[str] | tuple[str, ...]) -> Any:
    """Apply `key=value` overrides to any config dataclass (e.g. the evaluation settings)."""
    for text in overrides:
        _apply(obj, parse_override(text))
    return obj


def preset_names() -> list[str]:
    root = importlib.resources.files("m3i") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(text: str, origin: str) -> dict[str, Any]:
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{origin} is not valid YAML: {first_line(err)}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{origin} must hold a mapping of config keys")
    return values


def preset_values(name: str) -> dict[str, Any]:
    names = preset_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(f"unknown preset {name!r}; {hint}valid presets: {', '.join(names)}")
    path = importlib.resources.files("m3i") / "presets" / f"{name}.yaml"
    values = _read_yaml(path.read_text(), f"preset {name}")
    values.setdefault("preset", name)
    return values


def load_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    data: str | list[str] | None = None,
) -> Config:
    """Resolve a config: defaults < preset (or file) < --data (one spec, or several: a
    mixture) < key=value overrides. The
    plug-ins a config file names are imported first, so that their sections exist."""
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        values = _read_yaml(path.read_text(), str(path))
        if "plugins" in values:
            values["plugins"] = _import_plugins(values["plugins"], path.parent)
        cfg = Config()
        base = values.pop("base", None)
        if base is not None:
            _apply(cfg, preset_values(base))
        _apply(cfg, values)
    else:
        cfg = Config()
        _apply(cfg, preset_values(preset or "m3i"))
    if data is not None:
        cfg.data.spec = data if isinstance(data, str) or len(data) != 1 else data[0]
    apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def _import_plugins(names: Any, base: Path) -> list[str]:
    """Import a config's `plugins` (files relative to `base`); their names as saved in a run's
    config.yaml (files as absolute paths, so the run reloads from anywhere)."""
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"plugins must be a list of .py files or module names, got {names!r}")
    resolved = [str((base / n).resolve()) if is_path(n) else n for n in names]
    try:
        for name in resolved:
            import_plugin(name)
    except PluginError as err:
        raise ConfigError(str(err)) from None
    return resolved


def config_from_dict(values: dict[str, Any], check: bool = True) -> Config:
    """Rebuild a resolved config (e.g. a run's config.yaml); `check=False` skips `validate`
    (to read a finished run whose `init` file has moved). Its plug-ins are imported first."""
    if "plugins" in values:
        values = {**values, "plugins": _import_plugins(values["plugins"], Path.cwd())}
    cfg = Config()
    _apply(cfg, values)
    if check:
        validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Reject configs that cannot train, naming the key and what would work."""
    problem = value_problem(cfg)  # first: the checks below divide by some of the values
    if problem:
        raise ConfigError(problem)
    specs = spec_list(cfg.data.spec)
    checks = [
        (
            cfg.views.relation_problem("views.") is None,
            cfg.views.relation_problem("views."),
        ),
        (
            cfg.train.min_lr <= cfg.train.lr,
            f"train.min_lr ({cfg.train.min_lr}) must be <= train.lr ({cfg.train.lr}): the "
            "schedule warms up from min_lr to lr and decays back",
        ),
        (
            set(cfg.plugins) <= IMPORTED,
            f"plugins {cfg.plugins} must be named in a config file (--config), which imports "
            "them before the config is read; not by --set",
        ),
        (
            init_problem(cfg.init, cfg.model.name) is None,
            init_problem(cfg.init, cfg.model.name),
        ),
        (
            cfg.decoder.dim % 4 == 0 and cfg.decoder.dim % cfg.decoder.heads == 0,
            f"decoder.dim ({cfg.decoder.dim}) must be a multiple of 4 and of decoder.heads "
            f"({cfg.decoder.heads})",
        ),
        (
            cfg.mix.isolate or (cfg.train.batch_size // max(cfg.train.accum_steps, 1)) % 2 == 0,
            "mix.isolate=false needs an even micro-batch (train.batch_size / accum_steps): with an "
            "odd one the middle sample is mixed with itself and its hidden patches leak",
        ),
        (
            cfg.train.batch_size % cfg.train.accum_steps == 0,
            f"train.accum_steps ({cfg.train.accum_steps}) must divide "
            f"train.batch_size ({cfg.train.batch_size})",
        ),
        (
            bool(specs) and all(isinstance(spec, str) and spec for spec in specs),
            f"data.spec must be a data spec or a list of them, got {cfg.data.spec!r}",
        ),
        (
            not cfg.data.weights or len(cfg.data.weights) == len(specs),
            f"data.weights has {len(cfg.data.weights)} weights for {len(specs)} data sources "
            f"{specs}; give one weight per --data, in the same order (or none)",
        ),
        (
            not is_stream(cfg.monitor.data),
            f"monitor.data {cfg.monitor.data!r} must be indexable, not a wds: stream: give e.g. "
            "shapes, fashion-mnist or folder:PATH with train/ and val/",
        ),
        (
            cfg.model.img_size % cfg.model.patch_size == 0,
            f"model.img_size ({cfg.model.img_size}) must be a multiple of model.patch_size "
            f"({cfg.model.patch_size})",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    for name, spec in TARGETS.items():
        problem = spec.check_config(getattr(cfg.targets, name), cfg)
        if problem:
            raise ConfigError(problem)
    validate_stages(cfg)
    if not cfg.stages and not cfg.active_targets():
        raise ConfigError("no active target: set at least one targets.<name>.weight > 0")
    grid = (cfg.model.img_size // cfg.model.patch_size) ** 2
    visible_a = count_a(cfg.mix.ratio, grid)
    if visible_a < 1:
        raise ConfigError(f"mix.ratio {cfg.mix.ratio} leaves image A no patch of {grid}")
    if visible_a == grid:  # no image B: neither its tokens nor the positions A did not see
        _validate_mix_needs(cfg)


def _validate_mix_needs(cfg: Config) -> None:
    """An input of image A alone (mix.ratio 1) serves no target that reads image B's tokens or
    the positions that A did not see."""
    reads = {name: TARGETS[name].target for name in cfg.active_targets()}
    for name, target in reads.items():
        if target.stream == "b" or target.queries == "other_view":
            raise ConfigError(f"targets.{name} needs image B in the mix: set mix.ratio < 1")
    for name, target in reads.items():
        if target.queries == "masked":
            raise ConfigError(f"targets.{name} needs masked positions: set mix.ratio < 1")


def validate_stages(cfg: Config) -> None:
    """`stages` names single-stage presets or `PRESET:TARGET`, one of a single-stage preset's
    targets; `stage_steps`, if given, one count >= 0 for each stage, summing to train.steps."""
    if cfg.stage_steps and not cfg.stages:
        raise ConfigError("stage_steps needs stages: list the presets to run one after another")
    if not cfg.stages:
        return
    single = [n for n in preset_names() if n != cfg.preset and "stages" not in preset_values(n)]
    for stage in cfg.stages:
        name, colon, target = stage.partition(":")
        if name not in single:
            raise ConfigError(
                f"stage {stage!r}: {name!r} is not a single-stage preset; valid: "
                f"{', '.join(single)}, or PRESET:TARGET for one of its targets (m3i:intra_view)"
            )
        preset = Config()
        _apply(preset, preset_values(name))
        if colon and target not in preset.active_targets():
            valid = ", ".join(f"{name}:{t}" for t in preset.active_targets())
            raise ConfigError(
                f"stage {stage!r}: {target!r} is not one of {name}'s targets; valid: {valid}"
            )
    if not cfg.stage_steps:
        return
    if len(cfg.stage_steps) != len(cfg.stages):
        raise ConfigError(
            f"stage_steps {cfg.stage_steps} must give one step count for each of the "
            f"{len(cfg.stages)} stages {cfg.stages} (or be [] for an equal split of train.steps)"
        )
    if sum(cfg.stage_steps) != cfg.train.steps:
        raise ConfigError(
            f"stage_steps {cfg.stage_steps} sum to {sum(cfg.stage_steps)}, but train.steps is "
            f"{cfg.train.steps}; set train.steps={sum(cfg.stage_steps)} (the run's total)"
        )


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
