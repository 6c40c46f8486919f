"""Where a run's backbone starts (`init`): an m3i backbone, a run folder, any timm checkpoint
file of `model.name`, or timm pretrained weights by name (`vit_tiny_patch16_224.augreg_in21k`,
`hf-hub:ORG/NAME`, `local-dir:FOLDER`).

A timm checkpoint file is read the timm way: `timm.models.load_state_dict` (safetensors, or a
torch file read with weights_only; its `state_dict`/`model` entry, `module.` prefixes removed),
then the family's own timm `checkpoint_filter_fn`, which converts other layouts and, when
`model.img_size` or the patch grid differs, resamples the position embeddings (and the patch
projection) as timm does. Pretrained names go through `timm.create_model(..., pretrained=True)`.
The classifier is dropped (a backbone has none); every other tensor must fit, or a one-line
ValueError names the first that does not. Everything here runs before the run's data is read.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from safetensors import SafetensorError, safe_open
from timm.models import load_state_dict

from m3i.errors import first_line
from m3i.models.backbone import Backbone, tensor_differences
from m3i.models.config import ModelConfig

SOURCES = ("hf-hub:", "local-dir:")  # timm's model sources
KINDS_HINT = (
    "give an m3i backbone.safetensors or run folder, a timm checkpoint file of model.name "
    "(.safetensors, .pth), a timm pretrained name (vit_tiny_patch16_224.augreg_in21k), "
    "hf-hub:ORG/NAME or local-dir:FOLDER"
)


def init_problem(init: str, model_name: str) -> str | None:
    """What is wrong with `init` for a model named `model_name`, found without reading weights
    or reaching a hub; None when it may be loaded."""
    if not init or init.startswith(SOURCES):
        if init.startswith("local-dir:") and not Path(init[len("local-dir:") :]).is_dir():
            return f"init {init!r}: no such folder; {KINDS_HINT}"
        return None
    path = Path(init)
    if path.is_dir():
        if not (path / "backbone.safetensors").is_file():
            return f"init {init!r} is a folder without backbone.safetensors; {KINDS_HINT}"
        return None
    if path.is_file():
        return None
    architecture, tag = timm.models.split_model_name_tag(init)
    if not timm.is_model(architecture):
        return f"init {init!r} does not exist; {KINDS_HINT}"
    if architecture != model_name:
        return (
            f"init {init!r} holds {architecture} weights, but model.name is {model_name}; set "
            f"model.name={architecture} or give {model_name} weights"
        )
    if tag and init not in timm.list_pretrained(architecture + ".*"):
        tags = ", ".join(timm.list_pretrained(architecture + ".*")[:4]) or "none"
        return f"init {init!r}: timm has no such pretrained tag; timm has {tags}"
    if not tag and not timm.list_pretrained(architecture + ".*"):
        return f"init {init!r}: timm has no pretrained weights for {architecture}"
    return None


def init_state(init: str, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The timm state dict a backbone of `cfg` starts from (see the module docstring); a
    one-line ValueError when `init` cannot be read or does not fit."""
    with torch.device("meta"):
        backbone = Backbone(cfg)  # shapes and timm arguments only: no memory
    path = Path(init)
    if path.is_dir():
        path = path / "backbone.safetensors"
    if init.startswith(SOURCES) or not path.is_file():  # a timm pretrained name
        state, classifier = _pretrained_state(init, backbone)
    elif _is_m3i_backbone(path):
        return backbone.checked_state(path)
    else:
        state, classifier = _file_state(path, backbone)
    return _fit(init, backbone, backbone.from_timm_dir(state), classifier)


def _is_m3i_backbone(path: Path) -> bool:
    if path.suffix != ".safetensors":
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return "timm_name" in (f.metadata() or {})
    except (SafetensorError, OSError):
        return False


def _file_state(path: Path, backbone: Backbone) -> tuple[dict[str, torch.Tensor], str]:
    """A timm checkpoint file, read and converted by timm (the model's own filter)."""
    try:
        state = load_state_dict(str(path), use_ema=False)
    except Exception as err:  # torch.load's and safetensors' errors have no common base
        raise ValueError(
            f"init {path} is not a checkpoint timm can read ({first_line(err)}); {KINDS_HINT}"
        ) from None
    model = backbone.timm_model
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"init {path} holds no state dict of tensors; {KINDS_HINT}")
    try:
        state = backbone.checkpoint_filter(state, model)
    except (KeyError, RuntimeError, ValueError, AttributeError) as err:
        raise ValueError(
            f"init {path}: timm cannot convert it for {backbone.timm_name} ({first_line(err)})"
        ) from None
    return state, model.pretrained_cfg.get("classifier") or "head"


def _pretrained_state(init: str, backbone: Backbone) -> tuple[dict[str, torch.Tensor], str]:
    """timm's pretrained weights, fetched by timm with the run's arguments (its classifier kept,
    so that timm loads them strictly)."""
    if not init.startswith("local-dir:"):
        check_hub_reachable(init)
    kwargs = {k: v for k, v in backbone.timm_kwargs.items() if k != "num_classes"}
    try:
        model = timm.create_model(init, pretrained=True, **kwargs)
    except Exception as err:  # hub, file and load_state_dict errors alike
        raise ValueError(
            f"init {init!r}: timm could not load these weights for the run's model "
            f"({first_line(err)}); {KINDS_HINT}"
        ) from None
    architecture = model.pretrained_cfg.get("architecture")
    if architecture != backbone.timm_name:
        raise ValueError(
            f"init {init!r} holds {architecture} weights, but model.name is "
            f"{backbone.timm_name}; set model.name={architecture}"
        )
    return model.state_dict(), model.pretrained_cfg.get("classifier") or "head"


def check_hub_reachable(init: str, timeout: float = 5.0) -> None:
    """A one-line ValueError, at once, when the Hugging Face hub cannot be reached (and
    HF_HUB_OFFLINE, which reads the local cache only, is not set): timm would retry for a
    minute before failing."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as err:
        raise ValueError(
            f"init {init!r}: the hub {constants.ENDPOINT} cannot be reached "
            f"({first_line(err)}); give a local timm checkpoint file, or set HF_HUB_OFFLINE=1 "
            "to use weights already in the local cache"
        ) from None


def _fit(
    init: str, backbone: Backbone, state: dict[str, torch.Tensor], classifier: str
) -> dict[str, torch.Tensor]:
    """`state` less the classifier, when every other tensor fits the backbone exactly."""
    dropped = (f"{classifier}.weight", f"{classifier}.bias")
    state = {k: v for k, v in state.items() if k not in dropped}
    expected = {k: tuple(v.shape) for k, v in backbone.timm_model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    differ = tensor_differences(expected, found, "in init", "in the model")
    if differ:
        raise ValueError(
            f"init {init!r} does not fit model.name={backbone.timm_name} with "
            f"{_settings(backbone)} ({differ}); give a checkpoint of this architecture, or set "
            "model.* to its shape"
        )
    return state


def _settings(backbone: Backbone) -> str:
    values = backbone.model_settings(backbone.timm_kwargs)
    return ", ".join(f"model.{k}={v}" for k, v in values.items())
