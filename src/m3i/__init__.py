"""m3i: all-in-one pre-training by maximizing multi-modal mutual information.

The public API (each name is imported on first use, so that `import m3i` stays light):

- `load_config(preset=None, config_file=None, overrides=(), data=None)`: a preset name (or a
  YAML file) and `key=value` overrides, resolved and validated (`m3i.config.Config`).
- `pretrain(cfg, out_dir, progress=True, resume=False, overwrite=False)`: the whole job, as
  `m3i pretrain` runs it: the run, then its final evaluation and its report; the run folder.
- `M3IModel(cfg, run)`: the method itself, for your own training loop: `loss, monitors =
  model(batch)`, then after the optimizer step `model.after_optimizer_step()` and
  `model.momentum_update(m)` (docs/api.md).
- `load_backbone(run_or_file, **timm_overrides)`: a run folder or its backbone.safetensors as
  a timm model.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "load_config": ("m3i.config", "load_config"),
    "pretrain": ("m3i.train.job", "pretrain_job"),
    "M3IModel": ("m3i.method", "M3IModel"),
    "load_backbone": ("m3i.eval.features", "load_backbone"),
}
__all__ = ["M3IModel", "load_backbone", "load_config", "pretrain"]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'm3i' has no attribute {name!r}")
    module, attribute = _API[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
