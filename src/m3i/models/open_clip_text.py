"""open_clip's text side, from the optional `open_clip` extra: its CLIP BPE tokenizer
(targets.text.tokenizer=clip) and the text tower of an open_clip architecture
(targets.text.tower=open_clip). Nothing is downloaded: a tower starts from open_clip's random
initialisation or from a local open_clip checkpoint file.

The tower is open_clip's own `TextTransformer`, as `create_model(name, force_custom_text=True)`
builds it (the vision tower is built too, then dropped), with its weights from open_clip's
`load_checkpoint`; its output is open_clip's `encode_text` before normalisation (pooling and
`text_projection`). Locked (LiT, Zhai et al. 2022), it never trains, always runs in eval mode and
stays out of state dicts (its weights come from the checkpoint file again at every build), as
models.minilm's tower does; FSDP leaves it whole (train/sharding.py).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from m3i.models.minilm import _drop_locked_weights, _restore_locked_weights

INSTALL = 'pip install -e ".[openclip]"'
EXAMPLES = ("RN50", "ViT-B-32", "ViT-B-16", "ViT-L-14")
TEXT = "text."  # the text tower's prefix in the state dict of open_clip's CustomTextCLIP


def import_open_clip(what: str) -> ModuleType:
    """open_clip, or a one-line ValueError naming `what` needs it and the extra to install."""
    try:
        import open_clip
    except ImportError:
        raise ValueError(f"{what} needs open_clip: {INSTALL}") from None
    return open_clip


class ClipTokenizer:
    """open_clip's CLIP BPE (`SimpleTokenizer`; its vocabulary ships in the open_clip wheel, or
    the one `get_tokenizer` gives an open_clip model) as a `models.text.TextTokenizer`.

    The ids are open_clip's own: SOT, the text's tokens, EOT, cut to context_length with EOT kept
    last, padded with 0. Id 0 is also a real token ("!"), so the valid mask is SOT..EOT, read
    from where EOT is. A run writes nothing for it: zero-shot builds it again from the config.
    """

    def __init__(self, tokenizer: Any = None) -> None:
        if tokenizer is None:
            tokenizer = import_open_clip("targets.text.tokenizer=clip").SimpleTokenizer()
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer.encoder)

    def tokenize(self, texts: list[str], context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tokenizer(list(texts), context_length)
        eot = (ids == self.tokenizer.eot_token_id).int().argmax(dim=1, keepdim=True)
        return ids, torch.arange(ids.shape[1]) <= eot

    def save(self, run_dir: Path) -> None:
        """Nothing to write: the vocabulary is open_clip's."""


def model_tokenizer(name: str) -> ClipTokenizer:
    """open_clip's own tokenizer of model `name` (`get_tokenizer`: the CLIP BPE, with the
    model's text cleaning)."""
    return ClipTokenizer(import_open_clip("targets.text.tower=open_clip").get_tokenizer(name))


def architecture_problem(name: str) -> str | None:
    """None when open_clip builds model `name`'s text tower and tokenizer offline, else why not."""
    open_clip = import_open_clip("targets.text.tower=open_clip")
    known = open_clip.list_models()
    if name not in known:
        examples = ", ".join(n for n in EXAMPLES if n in known)
        return (
            f"targets.text.open_clip_model={name!r} is not an open_clip architecture; e.g. "
            f"{examples} (open_clip.list_models() has {len(known)})"
        )
    cfg = open_clip.get_model_config(name)
    text = cfg["text_cfg"]
    # open_clip downloads these tokenizers and text models from the Hugging Face hub
    if text.get("hf_model_name") or text.get("hf_tokenizer_name") or "siglip" in name.lower():
        return (
            f"targets.text.open_clip_model={name}: its tokenizer or text model comes from the "
            f"Hugging Face hub, which m3i does not download; use one with the CLIP tokenizer, "
            f"e.g. {', '.join(EXAMPLES)}"
        )
    if "multimodal_cfg" in cfg:
        return f"targets.text.open_clip_model={name} is a CoCa model; use a CLIP one, e.g. RN50"
    return None


def build_model(name: str, device: str = "cpu") -> nn.Module:
    """open_clip's model `name` with random weights, its text tower as `.text` (CustomTextCLIP)."""
    open_clip = import_open_clip("targets.text.tower=open_clip")
    return open_clip.create_model(name, pretrained=None, force_custom_text=True, device=device)


def load_weights(model: nn.Module, name: str, checkpoint: str | Path) -> None:
    """Load an open_clip checkpoint file into `model` with open_clip's `load_checkpoint`; a
    one-line ValueError when its text tower does not fit (a missing, unexpected or mis-shaped
    `text.` weight, or a file that is no state dict)."""
    open_clip = import_open_clip("targets.text.tower=open_clip")
    problem = f"targets.text.open_clip_checkpoint={checkpoint} does not fit open_clip model {name}"
    if not Path(checkpoint).is_file():
        raise ValueError(
            f"targets.text.open_clip_checkpoint={checkpoint} does not exist; give an open_clip "
            "checkpoint file (a state dict: .pt, .bin or .safetensors)"
        )
    try:
        incompatible = open_clip.load_checkpoint(model, str(checkpoint), strict=False)
    except Exception as err:  # unpickling, zip, safetensors, key and shape errors alike
        detail = re.sub(r"\s+", " ", str(err)).strip()[:300]
        raise ValueError(f"{problem}: {type(err).__name__}: {detail}") from None
    wrong = [k for k in incompatible.missing_keys if k.startswith(TEXT)]
    wrong += [k for k in incompatible.unexpected_keys if k.startswith(TEXT)]
    if wrong:
        raise ValueError(f"{problem}: {len(wrong)} text weights missing or unexpected: {wrong[:3]}")


def tower_problem(name: str, context_length: int, checkpoint: str) -> str | None:
    """Whether captions of `context_length` tokens and the checkpoint (if any) fit model
    `name`'s text tower, checked on a weightless copy (the meta device)."""
    with torch.device("meta"):
        model = build_model(name, device="meta")
    longest = model.text.context_length
    if context_length > longest:
        return (
            f"targets.text.context_length={context_length}: the text tower of open_clip model "
            f"{name} reads at most {longest} tokens"
        )
    if checkpoint:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # loading into meta tensors copies nothing
                load_weights(model, name, checkpoint)
        except ValueError as err:
            return str(err)
    return None


class LockedTextTower(nn.Module):
    """An open_clip text tower that never trains: no gradient, always eval mode, and no
    parameter in state dicts (loading one fills them with their own values)."""

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.text = tower.requires_grad_(False)
        self.train(False)
        self.register_state_dict_post_hook(_drop_locked_weights)
        self.register_load_state_dict_pre_hook(_restore_locked_weights)

    def train(self, mode: bool = True) -> LockedTextTower:
        """Always eval mode: the locked tower runs without dropout."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text(ids)


class OpenCLIPTextEncoder(nn.Module):
    """(ids, valid) (N, L) -> (N, embed_dim): open_clip's `encode_text` of the ids, padded with 0
    to the tower's own context length (as open_clip's tokenizer pads them), then a trained linear
    projection to `embed_dim`; an unlocked tower whose output is already `embed_dim` wide is
    used as it is (its `text_projection` is that projection, and it trains)."""

    def __init__(self, name: str, checkpoint: str, lock: bool, embed_dim: int) -> None:
        super().__init__()
        model = build_model(name)
        if checkpoint:
            load_weights(model, name, checkpoint)
        tower = model.text
        self.context_length = tower.context_length
        width = tower.output_dim if tower.text_projection is not None else tower.width
        self.tower = LockedTextTower(tower) if lock else tower
        same = width == embed_dim and not lock
        self.projection = nn.Identity() if same else nn.Linear(width, embed_dim, bias=False)

    def forward(self, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        ids = F.pad(ids, (0, self.context_length - ids.shape[1]))
        return self.projection(self.tower(ids))
