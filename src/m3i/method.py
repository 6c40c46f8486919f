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
        d = cfg.decoder
        run = dataclasses.replace(
            run or RunContext(),
            encoder_dim=self.backbone.embed_dim,
            decoder_dim=d.dim,
            dense_dim=d.dim if d.projector_depth else 0,
            patch_size=cfg.model.patch_size,
        )
        self.targets = nn.ModuleDict(build_targets(cfg.active_targets(), run))
        targets = list(self.targets.values())
        self.decoder = None
        if any(t.queries for t in targets):
            self.decoder = Decoder(
                self.backbone.embed_dim,
                d.dim,
                d.depth,
                d.heads,
                d.norm,
                d.projector_depth,
                d.qkv_bias,
            )
        self.teacher = None
        if any(t.teacher or t.pooled_teacher for t in targets):
            self.teacher = MomentumTeacher(self.backbone)
        # SiameseIM: an EMA copy of the decoder's embedding and projector maps the teacher's
        # tokens to the dense targets, its BatchNorm with the batch's statistics
        self.teacher_projector = None
        if self.decoder is not None and d.projector_depth and any(t.teacher for t in targets):
            self.teacher_projector = MomentumTeacher(self.decoder.projection(), True)
        self.teacher_layers = max((t.teacher_layers for t in targets), default=0)
        # a target pools with the class token (MoCo v3): the step also reads every image's
        self.class_tokens = any(t.pool == "cls" for t in targets)
        if self.class_tokens and not self.backbone.has_class_token:
            raise ValueError(
                f"a target pools with the class token (pool=cls), but model.name "
                f"{cfg.model.name!r} has none; use pool=mean or a ViT with a class token"
            )
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
        mix = self.cfg.mix
        pos_a, pos_b = split_positions(
            n, backbone.num_patches, mix.ratio, device, mix.masking, backbone.grid
        )
        use_a, use_b = self._streams_to_encode(backbone.num_patches)
        hidden_from_a = pos_b
        if not use_a:
            pos_a = pos_a[:, :0]
        if not use_b:
            pos_b = pos_b[:, :0]
        tokens_a, tokens_b, *classes = backbone.encode_mix(
            view1, partners, pos_a, pos_b, self.cfg.mix.isolate, self.class_tokens
        )
        class_a, class_b = classes or (None, None)
        samples = torch.arange(n, device=device)
        streams = {}
        if use_a:
            streams["a"] = Stream(tokens_a, pos_a, samples, class_a)
        if use_b:
            streams["b"] = Stream(tokens_b, pos_b, partners, class_b)
        ctx = StepContext(
            batch,
            streams,
            backbone.patch_size,
            masked_positions=hidden_from_a,
            measure=self.measure_information,
        )
        for view in sorted({t.pooled_student for t in self.targets.values() if t.pooled_student}):
            images = batch.view(view).image  # the whole view
            if self.class_tokens:
                tokens, _, class_token = backbone.forward_with_class_token(images)
                ctx.student_pooled[view] = tokens.mean(dim=1)
                ctx.student_class_token[view] = class_token
            else:
                ctx.student_pooled[view] = backbone.pooled(images)
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
            tokens, layers, classes = self._teach(torch.cat(images))
            outputs = [
                (
                    chunk,
                    [layer.chunk(len(views))[i] for layer in layers],
                    None if classes is None else classes.chunk(len(views))[i],
                )
                for i, chunk in enumerate(tokens.chunk(len(views)))
            ]
        else:  # while a CPU runs a batch twice as large slower (docs/performance.md)
            outputs = [self._teach(x) for x in images]
        dense_views = {t.teacher for t in targets}
        for view, (tokens, layers, class_token) in zip(views, outputs, strict=True):
            tokens = tokens.float()
            dense = tokens
            if self.teacher_projector is not None and view in dense_views:
                dense = self.teacher_projector(tokens).float()
            ctx.teacher_dense[view] = F.layer_norm(dense, dense.shape[-1:])
            ctx.teacher_pooled[view] = tokens.mean(dim=1)
            if layers:
                ctx.teacher_layers[view] = layers
            if class_token is not None:
                ctx.teacher_class_token[view] = class_token.float()

    def _teach(
        self, images: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
        """The teacher's tokens of full views and, only when a target reads them, the MLP
        outputs of its last `teacher_layers` blocks (norm=instance) and its class token
        (pool=cls), in one pass."""
        with torch.no_grad():
            if self.class_tokens:
                return self.teacher.module.forward_with_class_token(images, self.teacher_layers)
            if not self.teacher_layers:
                return self.teacher(images), [], None
            tokens, layers = self.teacher.module.forward_with_block_outputs(
                images, self.teacher_layers
            )
            return tokens, layers, None

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
        if self.teacher_projector is not None:
            self.teacher_projector.update(self.decoder.projection(), momentum)
        for target in self.targets.values():
            target.momentum_update(momentum)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Keep constrained parameters in range (e.g. CLIP's logit scale <= log 100)."""
        for target in self.targets.values():
            target.after_optimizer_step()
