"""`m3i bench speed`: the M3I step against this package's single-objective steps, peer
libraries' implementations of the same objectives, and the machine's measured matmul peak.

Every step is one training step on a fixed synthetic batch already on the device (no data
loading): forward, backward, AdamW, and the EMA update where there is a teacher. The kinds
are timed interleaved, `repeats` rounds of `steps` calls each, in one process with one thread
count; medians and spread are over all timed calls.
"""

from __future__ import annotations

import dataclasses
import resource
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import timm
import torch
import torch.nn.functional as F

from m3i.bench.measure import count_flops, matmul_tflops, summary, synthetic_batch, time_steps
from m3i.config import Config, ConfigError, load_config
from m3i.data.batch import Batch
from m3i.data.shapes import CLASSES, ShapesDataset
from m3i.data.stream import batches
from m3i.data.views import ViewDataset
from m3i.method import M3IModel
from m3i.mi.targets import RunContext
from m3i.models.text import tokenize, train_bpe

OURS = ("m3i", "supervised", "clip", "data2vec", "siameseim", "mae")
REPLACED = ("supervised", "clip", "data2vec", "siameseim")  # what one M3I step stands for
PEERS = {"lightly_mae": "mae", "open_clip_clip": "clip"}  # peer step -> our step


@dataclass
class BenchSettings:
    """How long to time; what to time is the config (`overrides` on each compared preset)."""

    steps: int = 3  # timed calls per kind and round
    repeats: int = 5  # interleaved rounds
    peers: bool = True
    loader_workers: int = 2  # the data stream is also timed with this many worker processes
    overrides: tuple[str, ...] = ()  # config `key=value`s applied to every compared preset


def bench_configs(settings: BenchSettings) -> dict[str, Config]:
    """The resolved config of every compared preset, `settings.overrides` applied to each (a
    ConfigError for a bad one); they must share the backbone and the batch size."""
    configs = {name: load_config(name, overrides=settings.overrides) for name in OURS}
    shape = {  # a frozen patch embedding (siameseim) is the preset's own, not another model
        name: (dataclasses.replace(cfg.model, freeze_patch_embed=False), cfg.train.batch_size)
        for name, cfg in configs.items()
    }
    differ = [name for name in OURS if shape[name] != shape["m3i"]]
    if differ:
        raise ConfigError(
            f"bench speed compares steps on one backbone and batch: presets {', '.join(differ)} "
            "differ from m3i in model.* or train.batch_size; set them with --set"
        )
    return configs


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


def our_step(cfg: Config, batch: Batch, tokenizer, device):
    text = tokenizer if cfg.targets.text.weight else None
    model = M3IModel(cfg, RunContext(num_classes=len(CLASSES), tokenizer=text)).to(device).train()
    ema = (lambda: model.momentum_update(0.996)) if model.teacher is not None else None
    return training_step(model, lambda: model(batch)[0], ema)


def timm_vit(cfg: Config, **kwargs: Any) -> torch.nn.Module:
    """A peer's backbone: `cfg.model`'s timm ViT with no classifier (`kwargs`: its pooling)."""
    model = cfg.model
    depth = {"depth": model.depth} if model.depth else {}
    return timm.create_model(
        model.name, img_size=model.img_size, patch_size=model.patch_size, num_classes=0,
        **depth, **kwargs,
    )  # fmt: skip


def lightly_mae_step(cfg: Config, batch: Batch, device):
    """lightly's MAE: MaskedVisionTransformerTIMM + MAEDecoderTIMM, 75% masked, MSE on
    per-patch normalised pixels, the same timm ViT and decoder size as ours (`cfg`: mae's)."""
    from lightly.models import utils
    from lightly.models.modules import MAEDecoderTIMM, MaskedVisionTransformerTIMM

    vit = timm_vit(cfg)
    patch_size = cfg.model.patch_size
    encoder = MaskedVisionTransformerTIMM(vit=vit)
    with warnings.catch_warnings():  # lightly 1.6 deprecates it for 1.7; it is its MAE decoder
        warnings.simplefilter("ignore", FutureWarning)
        decoder = MAEDecoderTIMM(
            num_patches=vit.patch_embed.num_patches, patch_size=patch_size,
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
        patches = utils.patchify(images, patch_size)
        target = utils.get_at_index(patches, mask - vit.num_prefix_tokens)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        return F.mse_loss(predicted, (target - mean) / (var + 1e-6).sqrt())

    return training_step(model, loss, None)


def open_clip_step(clip: Config, batch: Batch, tokenizer, device):
    """open_clip's CLIP: its TextTransformer and ClipLoss, our timm ViT with the same image
    head as our clip preset (CLIP's bias-free linear projection, or the MLP of head=mlp), the
    same text width, depth, context and vocabulary."""
    from open_clip import ClipLoss
    from open_clip.transformer import TextTransformer

    cfg = clip.targets.text
    vit = timm_vit(clip, global_pool="avg", fc_norm=False)
    head = torch.nn.Linear(vit.embed_dim, cfg.embed_dim, bias=False)  # open_clip's `proj`
    if cfg.head == "mlp":
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


def loader_batches(cfg: Config, workers: int):
    """The training loop's own batch stream over `shapes` at the bench's sizes."""
    size, batch_size = cfg.model.img_size, cfg.train.batch_size
    source = ShapesDataset("train", None, size, cfg.data.seed)
    dataset = ViewDataset(source, cfg.views, size, seed=0)
    return batches(dataset, batch_size, 0, workers, torch.device("cpu"))


def time_loader(cfg: Config, workers: int, count: int = 20) -> dict[str, float]:
    """Steady throughput of the data stream alone (rendering shapes and making both views):
    `count` batches after the first, timed together (worker prefetch included)."""
    stream = loader_batches(cfg, workers)
    next(stream)  # start-up (and worker start)
    seconds = sum(time_steps(lambda: next(stream), count, torch.device("cpu")))
    return {"s_per_batch": seconds / count, "img_per_s": count * cfg.train.batch_size / seconds}


def peak_rss_gb() -> float:
    """The process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_speed(settings: BenchSettings, device: torch.device, log=print) -> dict[str, Any]:
    """Build every step, count its FLOPs, time them interleaved; the report as a dict. The
    configs are resolved first: a bad override fails before any work."""
    configs = bench_configs(settings)
    m3i = configs["m3i"]
    batch_size = m3i.train.batch_size
    torch.manual_seed(0)
    captions = ShapesDataset("train", num_samples=500).captions()
    tokenizer = train_bpe(captions, configs["clip"].targets.text.vocab_size)
    batch = synthetic_batch(batch_size, m3i.model.img_size, captions, device)
    builders: dict[str, Callable[[], tuple]] = {
        name: (lambda cfg=cfg: our_step(cfg, batch, tokenizer, device))
        for name, cfg in configs.items()
    }
    if settings.peers:
        builders["lightly_mae"] = lambda: lightly_mae_step(configs["mae"], batch, device)
        builders["open_clip_clip"] = lambda: open_clip_step(
            configs["clip"], batch, tokenizer, device
        )
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
        result["img_per_s"] = batch_size / result["median_s"]
        result["utilisation"] = result["gflop"] * 1e9 / result["median_s"] / (peak * 1e12)
    replaced = sum(results[name]["median_s"] for name in REPLACED)
    loader = {f"workers={w}": time_loader(m3i, w) for w in (0, settings.loader_workers)}
    return {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "settings": vars(settings),
        "model": dataclasses.asdict(m3i.model),
        "batch_size": batch_size,
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
