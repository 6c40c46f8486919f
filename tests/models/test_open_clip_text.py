"""open_clip's text side (models/open_clip_text.py) against open_clip itself: the CLIP BPE ids
of `open_clip.tokenize`, and a tiny open_clip architecture of our own whose text tower embeds
exactly as open_clip's model loaded from the same checkpoint file; locked, it stays bit-identical
and out of state dicts (FSDP leaves it whole); unlocked, it trains."""

import json
from pathlib import Path

import open_clip
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from timm.optim import create_optimizer_v2
from torch import nn

from m3i.bench.measure import synthetic_batch
from m3i.config import load_config
from m3i.data.shapes import ShapesDataset
from m3i.method import M3IModel
from m3i.mi.targets import RunContext
from m3i.models.open_clip_text import ClipTokenizer, OpenCLIPTextEncoder, model_tokenizer
from m3i.train import sharding
from tests.models.locked_tower import sharded_step
from tests.tiny import TINY_M3I
from tests.train.test_ddp import free_ports

CAPTIONS = [
    "A red circle.",
    "A red circle on a blue background.",
    "Ünïcode café, naïve résumé — 東京!",
    "wow!~ a bang",  # "!" before "~" is CLIP's id 0, the padding id: a valid token all the same
    "",
    "a large green square " * 8,  # longer than every context below: cut with EOT kept last
]
SHORT = [0, 3, 4]  # the captions that fit in 8 tokens (SOT and EOT included)
TINY_MODEL = "m3i-tiny-text"  # registered with open_clip by `save_tiny_open_clip`
TINY_CONTEXT = 12
TINY_WIDTH = 16  # the tiny model's embed_dim: its text_projection's output
TINY_CONFIG = {
    "embed_dim": TINY_WIDTH,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 16, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": TINY_CONTEXT, "vocab_size": 49408, "width": 16, "heads": 2,
                 "layers": 1, "tokenizer_kwargs": {"clean": "canonicalize"}},
}  # fmt: skip
# the tiny model's tokenizer cleans texts as SigLIP's do (lower case, no punctuation): the
# tower's tokenizer must be its model's own, not the plain CLIP BPE
TOWER = [
    "targets.text.tower=open_clip",
    f"targets.text.open_clip_model={TINY_MODEL}",
    "targets.text.head=linear",
]


def save_tiny_open_clip(directory: Path, suffix: str = ".pt") -> Path:
    """Register the tiny architecture with open_clip and save a random model of it as open_clip
    saves a state dict (torch.save, or safetensors); the file's path."""
    config = directory / f"{TINY_MODEL}.json"
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(1)
    state = open_clip.create_model(TINY_MODEL, pretrained=None).state_dict()
    path = directory / f"tiny{suffix}"
    if suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    return path


def open_clip_embeddings(checkpoint: Path, captions: list[str]) -> torch.Tensor:
    """open_clip's own model loaded from `checkpoint`: `encode_text` of its tokenizer's ids."""
    model = open_clip.create_model(TINY_MODEL, pretrained=str(checkpoint)).eval()
    with torch.no_grad():
        return model.encode_text(open_clip.get_tokenizer(TINY_MODEL)(captions))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_open_clip(tmp_path_factory.mktemp("open_clip"))


@pytest.mark.parametrize("context_length", [1, 8, 77])
def test_clip_tokenizer_ids_are_open_clips_and_valid_from_sot_to_eot(context_length):
    ids, valid = ClipTokenizer().tokenize(CAPTIONS, context_length)
    assert torch.equal(ids, open_clip.tokenize(CAPTIONS, context_length))
    assert torch.equal(ids, open_clip.SimpleTokenizer()(CAPTIONS, context_length))
    reference = open_clip.SimpleTokenizer()
    for row, caption in enumerate(CAPTIONS):  # SOT, the caption's BPE, EOT: cut to the context
        length = min(len(reference.encode(caption)) + 2, context_length)
        assert valid[row].tolist() == [True] * length + [False] * (context_length - length)
    if context_length == 77:
        assert (ids[valid] == 0).any()  # id 0 ("!") inside a caption is valid
        assert valid[4].sum() == 2  # the empty caption: SOT and EOT


def test_the_towers_tokenizer_is_its_models_own(checkpoint):
    ids, _ = model_tokenizer(TINY_MODEL).tokenize(CAPTIONS, TINY_CONTEXT)
    assert torch.equal(ids, open_clip.get_tokenizer(TINY_MODEL)(CAPTIONS))
    assert not torch.equal(ids, open_clip.tokenize(CAPTIONS, TINY_CONTEXT))


def test_clip_tokenizer_vocabulary_is_clips():
    assert (
        ClipTokenizer().vocab_size == open_clip.get_model_config("RN50")["text_cfg"]["vocab_size"]
    )


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_tower_embeds_as_open_clips_model_loaded_from_the_same_file(tmp_path, suffix):
    path = save_tiny_open_clip(tmp_path, suffix)
    expected = open_clip_embeddings(path, CAPTIONS)
    tokenizer = model_tokenizer(TINY_MODEL)
    assert all(len(open_clip.SimpleTokenizer().encode(CAPTIONS[i])) + 2 <= 8 for i in SHORT)
    encoder = OpenCLIPTextEncoder(TINY_MODEL, str(path), lock=False, embed_dim=TINY_WIDTH)
    assert isinstance(encoder.projection, nn.Identity)  # unlocked and as wide: no projection
    with torch.no_grad():
        text = encoder(*tokenizer.tokenize(CAPTIONS, TINY_CONTEXT))
        short = encoder(*tokenizer.tokenize([CAPTIONS[i] for i in SHORT], 8))  # padded to 12
    torch.testing.assert_close(text, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(short, expected[SHORT], atol=1e-6, rtol=0)


def test_locked_tower_embeds_through_a_trained_projection(checkpoint):
    encoder = OpenCLIPTextEncoder(TINY_MODEL, str(checkpoint), lock=True, embed_dim=TINY_WIDTH)
    expected = open_clip_embeddings(checkpoint, CAPTIONS) @ encoder.projection.weight.T
    with torch.no_grad():
        text = encoder(*model_tokenizer(TINY_MODEL).tokenize(CAPTIONS, TINY_CONTEXT))
    torch.testing.assert_close(text, expected, atol=1e-6, rtol=0)


def tiny_model(checkpoint: Path, lock: bool) -> M3IModel:
    overrides = [*TINY_M3I, "model.img_size=16", "model.patch_size=4", *TOWER]
    overrides += [f"targets.text.open_clip_checkpoint={checkpoint}", f"targets.text.lock={lock}"]
    cfg = load_config("clip", overrides=overrides)
    torch.manual_seed(0)
    return M3IModel(cfg, RunContext(num_classes=10, tokenizer=model_tokenizer(TINY_MODEL)))


def train_steps(model: M3IModel, steps: int) -> list[str]:
    """AdamW steps on synthetic batches; the trainable parameters the first backward missed."""
    optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-2, weight_decay=0.05)
    captions = ShapesDataset("train", num_samples=40).captions()
    model.train()
    missing = []
    for step in range(steps):
        loss, _ = model(synthetic_batch(8, 16, captions, torch.device("cpu")))
        optimizer.zero_grad()
        loss.backward()
        if step == 0:  # DDP (no find_unused_parameters): every trainable one gets a gradient
            missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        optimizer.step()
    return missing


def reference_text_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The text tower's weights as open_clip loads the file into its CustomTextCLIP."""
    model = open_clip.create_model(TINY_MODEL, pretrained=str(checkpoint), force_custom_text=True)
    return model.text.state_dict()


def test_locked_tower_stays_bit_identical_and_out_of_the_state_dict(checkpoint):
    model = tiny_model(checkpoint, lock=True)
    encoder = model.targets["text"].encoder
    projection = encoder.projection.weight.detach().clone()
    assert train_steps(model, 3) == []
    assert not any(m.training for m in encoder.tower.modules())  # no dropout
    assert all(p.grad is None for p in encoder.tower.parameters())
    assert not torch.equal(encoder.projection.weight, projection)
    reference = reference_text_state(checkpoint)
    assert reference.keys() == encoder.tower.text.state_dict().keys()
    for name, tensor in encoder.tower.text.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    state = model.state_dict()
    assert not [k for k in state if ".tower." in k]
    assert [k for k in state if k.startswith("targets.text.encoder.")] == [
        "targets.text.encoder.projection.weight"
    ]
    model.load_state_dict(state)  # strict: the tower's weights are not expected


def test_unlocked_tower_receives_gradients_and_trains(checkpoint):
    model = tiny_model(checkpoint, lock=False)
    tower = model.targets["text"].encoder.tower
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    assert train_steps(model, 1) == []
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tower.parameters())
    assert all(not torch.equal(p, before[n]) for n, p in tower.named_parameters())
    assert {f"targets.text.encoder.tower.{k}" for k in before} <= model.state_dict().keys()


def test_fsdp_leaves_a_locked_tower_whole_and_out_of_the_gathered_state(checkpoint):
    """One gloo rank: the locked tower stays plain parameters, the projection is sharded, and
    the full state round trip holds no tower weight."""
    port = free_ports(1)[0]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        model = tiny_model(checkpoint, lock=True)
        optimizer, state = sharded_step(model)
        saved = {"model": state, "optimizer": sharding.full_optimizer_state(model, optimizer)}
        sharding.load_full_state(model, optimizer, saved)  # strict, without the tower's keys
    finally:
        dist.destroy_process_group()
