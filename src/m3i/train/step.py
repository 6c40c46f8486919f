"""One M3I step: batch -> mix -> backbone -> decoder / teacher -> targets -> weighted loss.

The step computes each shared piece once (one patch embedding of the input views, one
encoder pass over the mix, one student pass over the whole view 2 when a target reads it,
one teacher pass over the target views, one decoder pass per kind of query) and only the
pieces that the active targets read.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn.functional as F
from torch import nn

from m3i.config import Config
from m3i.data.batch import Batch
from m3i.data.mixing import count_a, pair_partners, split_positions
from m3i.mi.targets import RunContext, StepContext, Stream, Target, build_targets
from m3i.models.backbone import Backbone
from m3i.models.decoder import Decoder, grid_coords, view_to_view
from m3i.models.ema import MomentumTeacher

log = logging.getLogger("m3i.train")


class M3IModel(nn.Module):
    """Backbone, decoder, targets and EMA teacher of one pre-training run.

    `run` holds what the targets need from the data (classes, label prior, tokenizer: their
    specs' `prepare`); the model adds its own sizes before building them.
    """

    def __init__(self, cfg: Config, run: RunContext | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        # the Gaussian information estimates cost a D x D eigendecomposition each: the training
        # loop turns them on only for the steps it logs (their `mi/...` are NaN otherwise)
        self.measure_information = True
        self.backbone = Backbone(cfg.model)
        run = dataclasses.replace(
            run or RunContext(),
            encoder_dim=self.backbone.embed_dim,
            decoder_dim=cfg.decoder.dim,
            patch_size=cfg.model.patch_size,
        )
        self.targets = nn.ModuleDict(build_targets(cfg.active_targets(), run))
        targets = list(self.targets.values())
        self.decoder = None
        if any(t.queries for t in targets):
            d = cfg.decoder
            self.decoder = Decoder(self.backbone.embed_dim, d.dim, d.depth, d.heads)
        self.teacher = None
        if any(t.teacher or t.pooled_teacher for t in targets):
            self.teacher = MomentumTeacher(self.backbone)
        self.teacher_layers = max((t.teacher_layers for t in targets), default=0)
        if self.teacher_layers and not all(hasattr(b, "mlp") for b in self.backbone.blocks()):
            raise ValueError(
                f"norm=instance averages the teacher blocks' MLP outputs, but model.name "
                f"{cfg.model.name!r} has blocks without an `mlp`; use norm=layer"
            )
        if self.teacher_layers > self.backbone.block_outputs:
            log.warning(
                "a target averages the teacher's last %d block outputs (its layers), but %s "
                "gives %d: it averages those",
                self.teacher_layers,
                cfg.model.name,
                self.backbone.block_outputs,
            )

    def _streams_to_encode(self, grid_size: int) -> tuple[bool, bool]:
        targets: list[Target] = list(self.targets.values())
        pooled = any(t.stream == "pooled" for t in targets)
        use_a = any(t.stream == "a" for t in targets) or pooled
        use_b = count_a(self.cfg.mix.ratio, grid_size) < grid_size and (
            any(t.stream == "b" for t in targets) or pooled
        )
        return use_a, use_b

    def encode(self, batch: Batch) -> StepContext:
        """Everything the active targets read, computed once."""
        view1 = batch.views[0].image
        n, device = view1.shape[0], view1.device
        backbone = self.backbone
        partners = pair_partners(n, device)
        pos_a, pos_b = split_positions(n, backbone.num_patches, self.cfg.mix.ratio, device)
        use_a, use_b = self._streams_to_encode(backbone.num_patches)
        hidden_from_a = pos_b
        if not use_a:
            pos_a = pos_a[:, :0]
        if not use_b:
            pos_b = pos_b[:, :0]
        tokens_a, tokens_b = backbone.encode_mix(
            view1, partners, pos_a, pos_b, self.cfg.mix.isolate
        )
        samples = torch.arange(n, device=device)
        streams = {}
        if use_a:
            streams["a"] = Stream(tokens_a, pos_a, samples)
        if use_b:
            streams["b"] = Stream(tokens_b, pos_b, partners)
        ctx = StepContext(
            batch,
            streams,
            backbone.patch_size,
            masked_positions=hidden_from_a,
            measure=self.measure_information,
        )
        for view in sorted({t.pooled_student for t in self.targets.values() if t.pooled_student}):
            ctx.student_pooled[view] = backbone.pooled(batch.view(view).image)  # the whole view
        self._run_teacher(ctx)
        self._run_decoder(ctx)
        return ctx

    def _run_teacher(self, ctx: StepContext) -> None:
        targets = list(self.targets.values())
        views = sorted(
            {t.teacher for t in targets if t.teacher}
            | {view for t in targets for view in t.pooled_teacher}
        )
        if self.teacher is None or not views:
            return
        images = [ctx.batch.view(v).image for v in views]
        if images[0].is_cuda:  # one call on all views: a GPU is launch-bound at small batches,
            tokens, layers = self._teach(torch.cat(images))
            outputs = [
                (chunk, [layer.chunk(len(views))[i] for layer in layers])
                for i, chunk in enumerate(tokens.chunk(len(views)))
            ]
        else:  # while a CPU runs a batch twice as large slower (docs/performance.md)
            outputs = [self._teach(x) for x in images]
        for view, (tokens, layers) in zip(views, outputs, strict=True):
            tokens = tokens.float()
            ctx.teacher_dense[view] = F.layer_norm(tokens, tokens.shape[-1:])
            ctx.teacher_pooled[view] = tokens.mean(dim=1)
            if layers:
                ctx.teacher_layers[view] = layers

    def _teach(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The teacher's tokens of full views and, only when a target reads block outputs
        (norm=instance), the MLP outputs of its last `teacher_layers` blocks."""
        if not self.teacher_layers:
            return self.teacher(images), []
        with torch.no_grad():
            return self.teacher.module.forward_with_block_outputs(images, self.teacher_layers)

    def _run_decoder(self, ctx: StepContext) -> None:
        if self.decoder is None:
            return
        grid = self.backbone.grid
        coords = grid_coords(grid, ctx.batch.views[0].image.device)
        kinds = {t.queries for t in self.targets.values() if t.queries}
        if "masked" in kinds:
            a = ctx.streams["a"]
            ctx.decoded["masked"] = self.decoder(
                a.tokens, coords[a.positions], coords[ctx.masked_positions]
            )
        if "other_view" in kinds:
            b, (view1, view2) = ctx.streams["b"], ctx.batch.views[:2]
            query_coords, geometry = view_to_view(
                grid,
                view2.box[b.samples],
                view2.flip[b.samples],
                view1.box[b.samples],
                view1.flip[b.samples],
            )
            ctx.decoded["other_view"] = self.decoder(
                b.tokens, coords[b.positions], query_coords, geometry
            )

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted loss and the monitors `loss/<target>` (still attached: detach them),
        `mi/<target>` (detached; nats, a lower bound or an estimate as
        `m3i.mi.targets.information()` says) and, for the estimates, `mi_se/<target>`, the
        figure's jackknife standard error.

        A target's loss is not detached here because under torch.compile (inductor) a detached
        copy of a lone weight-1 target's loss, which is the total itself, took the total's
        gradient with it (pytorch/pytorch#195357): the data2vec and mae steps had no gradient."""
        ctx = self.encode(batch)
        total = torch.zeros((), device=batch.views[0].image.device)
        monitors = {}
        for name, target in self.targets.items():
            bound = target(ctx)
            total = total + target.weight * bound.loss
            monitors[f"loss/{name}"] = bound.loss
            monitors[f"mi/{name}"] = bound.mi.detach()
            if bound.se is not None:
                monitors[f"mi_se/{name}"] = bound.se.detach()
        return total, monitors

    def no_weight_decay(self) -> set[str]:
        """Position embeddings, prefix and <mask> tokens and the temperature (timm's convention)."""
        names = (
            "pos_embed",
            "cls_token",
            "reg_token",
            "mask_token",
            "position_embedding",
            "logit_scale",
        )
        return {n for n, _ in self.named_parameters() if n.split(".")[-1] in names}

    @torch.no_grad()
    def momentum_update(self, momentum: float) -> None:
        """The EMA update of the teacher and of the targets' own EMA heads."""
        if self.teacher is not None:
            self.teacher.update(self.backbone, momentum)
        for target in self.targets.values():
            target.momentum_update(momentum)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Keep constrained parameters in range (e.g. CLIP's logit scale <= log 100)."""
        for target in self.targets.values():
            target.after_optimizer_step()
