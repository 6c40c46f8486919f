"""A run folder as a timm `local-dir`: `config.json` (the architecture, `model_args` and
`pretrained_cfg`, written by timm's own `save_config_for_hf`) and `model.safetensors`, the
weights file timm looks for first. Then

    timm.create_model("local-dir:RUN", pretrained=True)

builds the backbone with m3i's pooling (a ViT: the mean of its final-normed patch tokens,
`global_pool="avg", fc_norm=False`; a ConvNeXt: `head_norm_first=True`, its head norm at every
position then the mean) and loads its weights, with no other argument; the `pretrained_cfg`
holds m3i's eval transform (mean, std, input size, crop_pct, interpolation), which
`timm.data.resolve_data_config` reads back. `backbone.safetensors` stays beside it for m3i.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import timm
import torch
from timm.models._hub import save_config_for_hf

from m3i.data.views import eval_data_config
from m3i.io import atomic_save_safetensors, atomic_write, atomic_write_text
from m3i.models.backbone import Backbone

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"  # timm's first choice in a local-dir (HF_SAFE_WEIGHTS_NAME)
TIMM_DIR_FILES = (CONFIG_FILE, WEIGHTS_FILE)
TAG = "m3i"  # the pretrained tag of an export (not the tag of the weights timm would fetch)
SOURCE_KEYS = ("hf_hub_id", "url", "license", "paper_ids", "paper_name", "notes", "origin_url")


def timm_dir_config(backbone: Backbone) -> str:
    """The config.json of a backbone's export, as timm's `save_config_for_hf` writes it for
    a model built with the export's arguments, its pretrained_cfg m3i's eval data config."""
    arguments = {**backbone.timm_kwargs, **backbone.timm_dir_args}
    return _config_text(backbone.timm_name, json.dumps(arguments), backbone.img_size)


@functools.lru_cache(maxsize=8)
def _config_text(name: str, arguments: str, img_size: int) -> str:
    """config.json for timm model `name` with these (JSON) arguments: built once per run, not
    at every checkpoint (a meta-device model and timm's writer)."""
    with torch.device("meta"):
        model = timm.create_model(name, **json.loads(arguments))
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / CONFIG_FILE
        save_config_for_hf(model, str(path), data_config=eval_data_config(img_size))
        config = json.loads(path.read_text())
    pretrained = config["pretrained_cfg"]
    for key in SOURCE_KEYS:  # the architecture's default weights say where they came from
        pretrained.pop(key, None)
    pretrained["tag"] = TAG
    return json.dumps(config, indent=2) + "\n"


def save_backbone_files(
    backbone: Backbone, out_dir: str | Path, state: dict[str, torch.Tensor] | None = None
) -> None:
    """Write the backbone's weights (`state`, e.g. gathered from shards, or its own) into
    `out_dir`, each file atomically: backbone.safetensors (m3i's, with the timm arguments in
    its metadata), then the timm local-dir, config.json and model.safetensors. Where the two
    weight files hold the same tensors (a ViT) the second is a hard link to the first (no
    second copy on disk) where the file system allows."""
    out_dir = Path(out_dir)
    state = backbone.timm_model.state_dict() if state is None else state
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    backbone.save(out_dir / "backbone.safetensors", state)
    exported = backbone.to_timm_dir(state)
    if exported.keys() == state.keys():
        link_or_copy(out_dir / "backbone.safetensors", out_dir / WEIGHTS_FILE)
    else:
        atomic_save_safetensors(exported, out_dir / WEIGHTS_FILE, {"format": "pt"})
    atomic_write_text(out_dir / CONFIG_FILE, timm_dir_config(backbone))


def link_or_copy(source: Path, target: Path) -> None:
    """`target` as a hard link to `source` (a copy where links are not allowed), atomically."""

    def write(tmp: str) -> None:
        os.unlink(tmp)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)

    atomic_write(target, write)
