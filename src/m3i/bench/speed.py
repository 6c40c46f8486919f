"""`m3i bench speed`: the M3I step against this package's single-objective steps, peer
libraries' implementations of the same objectives, and the machine's measured matmul peak.

Every step is one training step on a fixed synthetic batch already on the device (no data
loading): forward, backward, AdamW, and the EMA update where there is a teacher. The kinds
are timed interleaved, `repeats` rounds of `steps` calls each, in one process with one thread
count; medians and spread are over all timed calls.
"""

from __future__ import annotations

import resource
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import timm
import torch
import torch.nn.functional as F

from m3i.bench.measure import count_flops, matmul_tflops, summary, synthetic_batch, time_steps
from m3i.config import load_config
from m3i.data.batch import Batch
from m3i.data.shapes import CLASSES, ShapesDataset
from m3i.data.stream import batches
from m3i.data.views import ViewDataset
from m3i.mi.targets import RunContext
from m3i.models.text import tokenize, train_bpe
from m3i.train.batches import view_config
from m3i.train.step import M3IModel

OURS = ("m3i", "supervised", "clip", "data2vec", "siameseim", "mae")
REPLACED = ("supervised", "clip", "data2vec", "siameseim")  # what one M3I step stands for
PEERS = {"lightly_mae": "mae", "open_clip_clip": "clip"}  # peer step -> our step


@dataclass
class BenchSettings:
    model: str = "vit_tiny_patch16_224"
    img_size: int = 32
    patch_size: int = 4
    depth: int | None = 6
    batch: int = 64
    steps: int = 3  # timed calls per kind and round
    repeats: int = 5  # interleaved rounds
    peers: bool = True
    loader_workers: int = 2  # the data stream is also timed with this many worker processes
    overrides: tuple[str, ...] = ()  # config `key=value`s for this package's steps


def model_overrides(settings: BenchSettings) -> list[str]:
    depth = "null" if settings.depth is None else settings.depth
    return [
        f"model.name={settings.model}",
        f"model.img_size={settings.img_size}",
        f"model.patch_size={settings.patch_size}",
        f"model.depth={depth}",
        f"train.batch_size={settings.batch}",
        *settings.overrides,
    ]


def training_step(
    model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], ema: Callable[[], None] | None
) -> tuple[Callable[[], None], Callable[[], None]]:
    """(one full step, forward + backward only) for a model whose loss `loss_fn` computes."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def backward() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn().backward()

    def step() -> None:
        backward()
        optimizer.step()
        if ema is not None:
            ema()

    return step, backward


def our_step(preset: str, settings: BenchSettings, batch: Batch, tokenizer, device):
    cfg = load_config(preset, overrides=model_overrides(settings))
    text = tokenizer if cfg.targets.text.weight else None
    model = M3IModel(cfg, RunContext(num_classes=len(CLASSES), tokenizer=text)).to(device).train()
    ema = (lambda: model.momentum_update(0.996)) if model.teacher is not None else None
    return training_step(model, lambda: model(batch)[0], ema)


def lightly_mae_step(settings: BenchSettings, batch: Batch, device):
    """lightly's MAE: MaskedVisionTransformerTIMM + MAEDecoderTIMM, 75% masked, MSE on
    per-patch normalised pixels, the same timm ViT and decoder size as ours."""
    from lightly.models import utils
    from lightly.models.modules import MAEDecoderTIMM, MaskedVisionTransformerTIMM

    cfg = load_config("mae", overrides=model_overrides(settings))
    vit = timm.create_model(
        settings.model, img_size=settings.img_size, patch_size=settings.patch_size,
        num_classes=0, **({"depth": settings.depth} if settings.depth else {}),
    )  # fmt: skip
    encoder = MaskedVisionTransformerTIMM(vit=vit)
    with warnings.catch_warnings():  # lightly 1.6 deprecates it for 1.7; it is its MAE decoder
        warnings.simplefilter("ignore", FutureWarning)
        decoder = MAEDecoderTIMM(
            num_patches=vit.patch_embed.num_patches, patch_size=settings.patch_size,
            embed_dim=vit.embed_dim, decoder_embed_dim=cfg.decoder.dim,
            decoder_depth=cfg.decoder.depth, decoder_num_heads=cfg.decoder.heads,
            num_prefix_tokens=vit.num_prefix_tokens,
        )  # fmt: skip
    model = torch.nn.ModuleDict({"encoder": encoder, "decoder": decoder}).to(device).train()
    images, n = batch.views[0].image, len(batch)
    length = vit.patch_embed.num_patches + vit.num_prefix_tokens

    def loss() -> torch.Tensor:
        keep, mask = utils.random_token_mask((n, length), mask_ratio=0.75, device=device)
        encoded = decoder.embed(encoder.encode(images=images, idx_keep=keep))
        tokens = utils.repeat_token(decoder.mask_token, (n, length))
        decoded = decoder.decode(utils.set_at_index(tokens, keep, encoded))
        predicted = decoder.predict(utils.get_at_index(decoded, mask))
        patches = utils.patchify(images, settings.patch_size)
        target = utils.get_at_index(patches, mask - vit.num_prefix_tokens)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        return F.mse_loss(predicted, (target - mean) / (var + 1e-6).sqrt())

    return training_step(model, loss, None)


def open_clip_step(settings: BenchSettings, batch: Batch, tokenizer, device):
    """open_clip's CLIP: its TextTransformer and ClipLoss, our timm ViT with the same MLP
    projection as our clip preset, the same text width, depth, context and vocabulary."""
    from open_clip import ClipLoss
    from open_clip.transformer import TextTransformer

    cfg = load_config("clip", overrides=model_overrides(settings)).targets.text
    vit = timm.create_model(
        settings.model, img_size=settings.img_size, patch_size=settings.patch_size,
        num_classes=0, global_pool="avg", fc_norm=False,
        **({"depth": settings.depth} if settings.depth else {}),
    )  # fmt: skip
    head = torch.nn.Sequential(
        torch.nn.Linear(vit.embed_dim, cfg.hidden_dim), torch.nn.GELU(),
        torch.nn.Linear(cfg.hidden_dim, cfg.embed_dim),
    )  # fmt: skip
    text = TextTransformer(
        context_length=cfg.context_length, vocab_size=tokenizer.get_vocab_size(),
        width=cfg.width, heads=cfg.heads, layers=cfg.depth, output_dim=cfg.embed_dim,
    )  # fmt: skip
    scale = torch.nn.Parameter(torch.tensor(1 / cfg.temperature).log())
    model = torch.nn.ModuleDict({"vit": vit, "head": head, "text": text}).to(device).train()
    model.register_parameter("logit_scale", scale)
    ids, _ = tokenize(tokenizer, batch.captions, cfg.context_length)
    ids, clip_loss = ids.to(device), ClipLoss()

    def loss() -> torch.Tensor:
        image = F.normalize(head(vit(batch.views[0].image)), dim=-1)
        return clip_loss(image, F.normalize(text(ids), dim=-1), model.logit_scale.exp())

    return training_step(model, loss, None)


def loader_batches(settings: BenchSettings, workers: int):
    """The training loop's own batch stream over `shapes` at the bench's sizes."""
    cfg = load_config("m3i", overrides=model_overrides(settings))
    cfg.data.image_size = settings.img_size
    source = ShapesDataset("train", None, settings.img_size, cfg.data.seed)
    dataset = ViewDataset(source, view_config(cfg), seed=0)
    return batches(dataset, settings.batch, 0, workers, torch.device("cpu"))


def time_loader(settings: BenchSettings, workers: int, count: int = 20) -> dict[str, float]:
    """Steady throughput of the data stream alone (rendering shapes and making both views):
    `count` batches after the first, timed together (worker prefetch included)."""
    stream = loader_batches(settings, workers)
    next(stream)  # start-up (and worker start)
    seconds = sum(time_steps(lambda: next(stream), count, torch.device("cpu")))
    return {"s_per_batch": seconds / count, "img_per_s": count * settings.batch / seconds}


def peak_rss_gb() -> float:
    """The process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_speed(settings: BenchSettings, device: torch.device, log=print) -> dict[str, Any]:
    """Build every step, count its FLOPs, time them interleaved; the report as a dict."""
    torch.manual_seed(0)
    captions = ShapesDataset("train", num_samples=500).captions()
    tokenizer = train_bpe(captions, load_config("clip").targets.text.vocab_size)
    batch = synthetic_batch(settings.batch, settings.img_size, captions, device)
    builders: dict[str, Callable[[], tuple]] = {
        name: (lambda name=name: our_step(name, settings, batch, tokenizer, device))
        for name in OURS
    }
    if settings.peers:
        builders["lightly_mae"] = lambda: lightly_mae_step(settings, batch, device)
        builders["open_clip_clip"] = lambda: open_clip_step(settings, batch, tokenizer, device)
    peak = matmul_tflops(device)  # measured again in every round: the best rate seen is the peak
    steps, results = {}, {}
    for name, build in builders.items():
        if device.type == "cuda":  # this step's own peak: above what earlier steps still hold
            held = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        step, backward = build()
        step()  # warm-up
        results[name] = {"gflop": count_flops(backward) / 1e9, "times": []}
        if device.type == "cuda":
            own = torch.cuda.max_memory_allocated(device) - held
            results[name]["peak_memory_gb"] = own / 1e9
        else:
            results[name]["process_peak_rss_gb"] = peak_rss_gb()
        steps[name] = step
    for round_ in range(settings.repeats):
        for name, step in steps.items():
            results[name]["times"] += time_steps(step, settings.steps, device)
        peak = max(peak, matmul_tflops(device))
        log(f"round {round_ + 1}/{settings.repeats} done")
    log(f"matmul peak {peak * 1e3:.1f} GFLOP/s ({torch.get_num_threads()} threads)")
    for result in results.values():
        result.update(summary(result.pop("times")))
        result["img_per_s"] = settings.batch / result["median_s"]
        result["utilisation"] = result["gflop"] * 1e9 / result["median_s"] / (peak * 1e12)
    replaced = sum(results[name]["median_s"] for name in REPLACED)
    loader = {f"workers={w}": time_loader(settings, w) for w in (0, settings.loader_workers)}
    return {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "settings": vars(settings),
        "matmul_gflops": peak * 1e3,
        "steps": results,
        "loader": loader,
        "m3i_over_replaced": results["m3i"]["median_s"] / replaced,
        "peer_over_ours": {
            peer: results[peer]["median_s"] / results[ours]["median_s"]
            for peer, ours in PEERS.items()
            if peer in results
        },
    }


def format_table(report: dict[str, Any]) -> str:
    lines = [
        "step              img/s   s/step median (min-max)   GFLOP/step  utilisation  memory GB",
    ]
    for name, r in report["steps"].items():
        memory = r.get("peak_memory_gb", r.get("process_peak_rss_gb"))
        lines.append(
            f"{name:<16} {r['img_per_s']:7.1f}   {r['median_s']:.3f} ({r['min_s']:.3f}-"
            f"{r['max_s']:.3f})       {r['gflop']:8.2f}      {100 * r['utilisation']:5.1f}%"
            f"      {memory:6.2f}"
        )
    lines.append(
        "memory: the step's own CUDA peak allocation on a GPU; on a CPU the process's peak RSS "
        "so far, which only grows"
    )
    lines.append(
        f"M3I step / (supervised + clip + data2vec + siameseim): {report['m3i_over_replaced']:.2f}"
    )
    for peer, ratio in report["peer_over_ours"].items():
        lines.append(f"{peer} time / ours ({PEERS[peer]}): {ratio:.2f}")
    for name, r in report["loader"].items():
        lines.append(
            f"data stream ({name}): {r['img_per_s']:.1f} img/s, {r['s_per_batch']:.3f} s/batch"
        )
    return "\n".join(lines)
