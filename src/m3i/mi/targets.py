"""Targets: a Target = source + target encoder + head + posterior + weight.

Each target reads what the step computed once for all of them (a `StepContext`: encoder
streams, decoder outputs, teacher features) and returns a `Bound`: its loss and its information
figure in nats, a lower bound for the Boltzmann targets (category, text, view_contrast) and a
Gaussian-channel estimate for the Gaussian ones (intra_view, inter_view, pixels, view_regress).
It declares what it reads, so the step computes only what the active targets need:

    stream       "a" | "b" | "pooled" (pooled features of every encoded image)
    queries      None | "masked" (A's hidden positions, same view) | "other_view" (B's v_B')
    teacher      None | "view1" | "view2" (dense EMA-teacher tokens, LayerNorm'd)
    pooled_teacher  None | "view2" (pooled EMA-teacher features of the other view)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn

from m3i.data.mixing import gather_tokens
from m3i.mi.posteriors import Bound, boltzmann, gaussian, normalised_l2, nt_xent, symmetric_infonce
from m3i.models.ema import MomentumTeacher
from m3i.models.heads import mlp_head
from m3i.models.text import TextEncoder, tokenize
from m3i.train.distributed import gather_with_grad

# What each target's `mi/<name>` figure is (docs/information.md): a lower bound on the mutual
# information (Boltzmann family) or a Gaussian-channel estimate of it (Gaussian family).
INFORMATION = {
    "category": "lower bound",
    "text": "lower bound",
    "view_contrast": "lower bound",
    "intra_view": "estimate",
    "inter_view": "estimate",
    "pixels": "estimate",
    "view_regress": "estimate",
}


@dataclass
class Stream:
    """One image role of the mixed input: its encoder tokens and where they sit."""

    tokens: torch.Tensor  # (N, L, D)
    positions: torch.Tensor  # (N, L) grid indices in the input view
    samples: torch.Tensor  # (N,) batch index of the image each row holds

    @property
    def pooled(self) -> torch.Tensor:
        return self.tokens.mean(dim=1)


@dataclass
class StepContext:
    batch: dict[str, Any]
    streams: dict[str, Stream]
    patch_size: int
    masked_positions: torch.Tensor | None = None  # (N, Q) view-1 positions image A did not see
    decoded: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_dense: dict[str, torch.Tensor] = field(default_factory=dict)  # in batch order
    teacher_pooled: dict[str, torch.Tensor] = field(default_factory=dict)  # in batch order


def zero_bound(like: torch.Tensor) -> Bound:
    """No sample carries this target in the batch: a zero loss that keeps the graph connected."""
    return Bound(like.sum() * 0.0, torch.zeros((), device=like.device))


def mean_bound(bounds: list[Bound]) -> Bound:
    return Bound(sum(b.loss for b in bounds) / len(bounds), sum(b.mi for b in bounds) / len(bounds))


class Target(nn.Module):
    stream: str = "pooled"
    queries: str | None = None
    teacher: str | None = None
    pooled_teacher: str | None = None

    def __init__(self, name: str, weight: float) -> None:
        super().__init__()
        self.name, self.weight = name, weight

    def forward(self, ctx: StepContext) -> Bound:
        raise NotImplementedError

    def momentum_update(self, momentum: float) -> None:
        """Update this target's own EMA heads, if it has any."""


class CategoryTarget(Target):
    """Supervised: Boltzmann over learned class embeddings, for every labelled image.

    Its figure is H(Y) - CE, a lower bound, with H(Y) the entropy of `label_prior` (the
    training set's class frequencies; uniform when not given, H(Y) = log C)."""

    def __init__(
        self,
        name: str,
        cfg: Any,
        encoder_dim: int,
        num_classes: int,
        label_prior: torch.Tensor | None = None,
    ) -> None:
        super().__init__(name, cfg.weight)
        self.head = mlp_head(encoder_dim, cfg.hidden_dim, cfg.embed_dim)
        self.class_embedding = nn.Parameter(torch.randn(num_classes, cfg.embed_dim) * 0.02)
        prior = torch.ones(num_classes) / num_classes if label_prior is None else label_prior
        if prior.shape != (num_classes,) or (prior < 0).any() or abs(prior.sum() - 1) > 1e-4:
            raise ValueError(
                f"label_prior must hold {num_classes} non-negative class frequencies summing "
                f"to 1; got shape {tuple(prior.shape)}, sum {prior.sum().item():.4g}"
            )
        self.label_entropy = float(-torch.special.xlogy(prior, prior).sum())  # H(Y), nats

    def logits(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.head(pooled) @ self.class_embedding.t()

    def forward(self, ctx: StepContext) -> Bound:
        logits = torch.cat([self.logits(s.pooled) for s in ctx.streams.values()])
        labels = torch.cat([ctx.batch["label"][s.samples] for s in ctx.streams.values()])
        labelled = labels >= 0
        if not labelled.any():
            return zero_bound(logits)
        return boltzmann(logits[labelled], labels[labelled], self.label_entropy)


class TextTarget(Target):
    """CLIP: symmetric InfoNCE between image and caption embeddings over the global batch."""

    def __init__(self, name: str, cfg: Any, encoder_dim: int, tokenizer: Tokenizer) -> None:
        super().__init__(name, cfg.weight)
        self.tokenizer, self.context_length = tokenizer, cfg.context_length
        self.head = mlp_head(encoder_dim, cfg.hidden_dim, cfg.embed_dim)
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

    def forward(self, ctx: StepContext) -> Bound:
        captions = list(ctx.batch["caption"])
        has_caption = torch.tensor([bool(c) for c in captions], device=self.logit_scale.device)
        text = self.encode_text(captions)
        scale = self.logit_scale.clamp(max=math.log(100)).exp()
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


class DenseTeacherTarget(Target):
    """Gaussian regression of the decoder's query outputs onto LayerNorm'd EMA-teacher tokens;
    the figure is the Gaussian-channel estimate given each query's grid position."""

    def __init__(self, name: str, cfg: Any, decoder_dim: int, encoder_dim: int) -> None:
        super().__init__(name, cfg.weight)
        self.head = nn.Linear(decoder_dim, encoder_dim)

    def target_tokens(self, ctx: StepContext) -> torch.Tensor:
        raise NotImplementedError

    def query_positions(self, ctx: StepContext) -> torch.Tensor:
        """(N, Q) grid position of each query in its target view."""
        raise NotImplementedError

    def forward(self, ctx: StepContext) -> Bound:
        prediction = self.head(ctx.decoded[self.queries])
        grid = ctx.teacher_dense[self.teacher].shape[1]
        return gaussian(prediction, self.target_tokens(ctx), self.query_positions(ctx), grid)


class IntraViewTarget(DenseTeacherTarget):
    """Image A predicts the teacher's features of its own view where image B sat (data2vec)."""

    stream, queries, teacher = "a", "masked", "view1"

    def target_tokens(self, ctx: StepContext) -> torch.Tensor:
        tokens = ctx.teacher_dense["view1"][ctx.streams["a"].samples]
        return gather_tokens(tokens, ctx.masked_positions)

    def query_positions(self, ctx: StepContext) -> torch.Tensor:
        return ctx.masked_positions


class InterViewTarget(DenseTeacherTarget):
    """Image B predicts the teacher's features of a different view, densely (SiameseIM)."""

    stream, queries, teacher = "b", "other_view", "view2"

    def target_tokens(self, ctx: StepContext) -> torch.Tensor:
        return ctx.teacher_dense["view2"][ctx.streams["b"].samples]

    def query_positions(self, ctx: StepContext) -> torch.Tensor:
        n, grid = len(ctx.streams["b"].samples), ctx.teacher_dense["view2"].shape[1]
        return torch.arange(grid, device=ctx.streams["b"].samples.device).expand(n, grid)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, P, patch_size**2 * C), row-major patches, (p, q, c) inside each."""
    n, c, h, w = images.shape
    x = images.reshape(n, c, h // patch_size, patch_size, w // patch_size, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // patch_size) * (w // patch_size), -1)


class PixelTarget(Target):
    """MAE: Gaussian regression onto per-patch normalised pixels at A's hidden positions; the
    figure is the Gaussian-channel estimate given each hidden patch's grid position."""

    stream, queries = "a", "masked"

    def __init__(self, name: str, cfg: Any, decoder_dim: int, patch_size: int) -> None:
        super().__init__(name, cfg.weight)
        self.norm_pix = cfg.norm_pix
        self.head = nn.Linear(decoder_dim, patch_size * patch_size * 3)

    def forward(self, ctx: StepContext) -> Bound:
        images = ctx.batch["view1"][ctx.streams["a"].samples]
        patches = patchify(images, ctx.patch_size)
        target = gather_tokens(patches, ctx.masked_positions)
        if self.norm_pix:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        prediction = self.head(ctx.decoded["masked"])
        return gaussian(prediction, target, ctx.masked_positions, patches.shape[1])


class PooledViewTarget(Target):
    """Another view's pooled EMA-teacher features, through an online and an EMA projector."""

    pooled_teacher = "view2"

    def __init__(self, name: str, cfg: Any, encoder_dim: int) -> None:
        super().__init__(name, cfg.weight)
        self.projector = mlp_head(encoder_dim, cfg.hidden_dim, cfg.embed_dim)
        self.teacher_projector = MomentumTeacher(self.projector)

    def momentum_update(self, momentum: float) -> None:
        self.teacher_projector.update(self.projector, momentum)

    def pairs(self, ctx: StepContext) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(online projection, teacher projection) for each encoded stream."""
        keys = self.teacher_projector(ctx.teacher_pooled["view2"])
        return [(self.projector(s.pooled), keys[s.samples]) for s in ctx.streams.values()]


class ViewContrastTarget(PooledViewTarget):
    """MoCo v3 / SimCLR: NT-Xent between a view and another view over the global batch."""

    def __init__(self, name: str, cfg: Any, encoder_dim: int) -> None:
        super().__init__(name, cfg, encoder_dim)
        self.temperature = cfg.temperature

    def forward(self, ctx: StepContext) -> Bound:
        return mean_bound(
            [
                nt_xent(gather_with_grad(q), gather_with_grad(k), self.temperature)
                for q, k in self.pairs(ctx)
            ]
        )


class ViewRegressTarget(PooledViewTarget):
    """BYOL: a predictor regresses the other view's EMA projection (normalised L2)."""

    def __init__(self, name: str, cfg: Any, encoder_dim: int) -> None:
        super().__init__(name, cfg, encoder_dim)
        self.predictor = mlp_head(cfg.embed_dim, cfg.hidden_dim, cfg.embed_dim)

    def forward(self, ctx: StepContext) -> Bound:
        return mean_bound([normalised_l2(self.predictor(q), k) for q, k in self.pairs(ctx)])


def build_targets(
    cfg: Any,
    encoder_dim: int,
    patch_size: int,
    num_classes: int,
    tokenizer: Tokenizer | None,
    label_prior: torch.Tensor | None = None,
) -> dict[str, Target]:
    """The active targets of a config (weight != 0), by name."""
    dec = cfg.decoder.dim
    makers = {
        "category": lambda c: CategoryTarget("category", c, encoder_dim, num_classes, label_prior),
        "text": lambda c: TextTarget("text", c, encoder_dim, tokenizer),
        "intra_view": lambda c: IntraViewTarget("intra_view", c, dec, encoder_dim),
        "inter_view": lambda c: InterViewTarget("inter_view", c, dec, encoder_dim),
        "pixels": lambda c: PixelTarget("pixels", c, dec, patch_size),
        "view_contrast": lambda c: ViewContrastTarget("view_contrast", c, encoder_dim),
        "view_regress": lambda c: ViewRegressTarget("view_regress", c, encoder_dim),
    }
    return {name: makers[name](target_cfg) for name, target_cfg in cfg.active_targets().items()}
