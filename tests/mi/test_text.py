"""The text target (`targets.text`): CLIP's loss and learnt temperature against open_clip's
ClipLoss on a hand-built StepContext; with open_clip's text side, the CLIP BPE under the scratch
tower (targets.text.tokenizer=clip) and open_clip text towers (targets.text.tower=open_clip):
each refusal one line at config time, tiny `m3i pretrain` runs, and zero-shot rebuilding their
text target against open_clip's own models."""

import math
import re
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from m3i.config import ConfigError, load_config
from m3i.data.batch import Batch
from m3i.eval.features import EvalError
from m3i.eval.zeroshot import load_text_target
from m3i.mi.targets import RunContext, StepContext
from m3i.mi.targets.text import TextTarget, TextTargetConfig
from m3i.models.text import train_bpe
from m3i.train.pretrain import pretrain
from tests.mi.step_inputs import ENC_DIM, make_streams
from tests.models.test_open_clip_text import (
    CAPTIONS,
    TINY_MODEL,
    TOWER,
    open_clip_embeddings,
    save_tiny_open_clip,
)
from tests.tiny import TINY_M3I

TINY = [*TINY_M3I, "model.img_size=16", "model.patch_size=4"]
RUN = [
    *TINY,
    "data.num_train=16",
    "train.batch_size=8",
    "train.steps=2",
    "train.device=cpu",
    "monitor.every=0",
    "monitor.tensorboard=false",
]
CONTEXT = 8  # TINY_M3I's targets.text.context_length
# the tiny open_clip tower, reading its model's whole context (12): every caption as open_clip
OPEN_CLIP_RUN = [*RUN, *TOWER, "targets.text.context_length=12"]
ENCODER_DIM = 192  # vit_tiny's width
INSTALL = 'pip install -e ".[openclip]"'


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_open_clip(tmp_path_factory.mktemp("open_clip"))


def refusal(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as error:
        load_config("clip", overrides=[*TINY, *overrides])
    message = str(error.value)
    assert "\n" not in message
    return message


def test_each_refusal_is_one_line_at_config_time(checkpoint, tmp_path):
    text_file = tmp_path / "notes.pt"
    text_file.write_text("not a state dict")
    state = torch.load(checkpoint, weights_only=True)
    del state["token_embedding.weight"]
    torch.save(state, tmp_path / "no_embedding.pt")
    unlocked = "targets.text.lock=false"
    cases = [
        ([unlocked, "targets.text.open_clip_model=''"], "open_clip_model='' is not an open_clip"),
        ([unlocked, "targets.text.open_clip_model=nope"], "e.g. RN50, ViT-B-32, ViT-B-16"),
        ([unlocked, "targets.text.open_clip_model=ViT-B-16-SigLIP"], "from the Hugging Face hub"),
        ([unlocked, "targets.text.open_clip_model=coca_ViT-B-32"], "is a CoCa model"),
        (["targets.text.tokenizer=minilm"], "the open_clip tower reads its model's own tokenizer"),
        ([], "is locked (targets.text.lock=true) and needs its weights"),
        ([f"targets.text.open_clip_checkpoint={tmp_path / 'gone.pt'}"], "gone.pt does not exist"),
        ([f"targets.text.open_clip_checkpoint={text_file}"], "does not fit open_clip model"),
        (
            [f"targets.text.open_clip_checkpoint={tmp_path / 'no_embedding.pt'}"],
            "1 text weights missing or unexpected: ['text.token_embedding.weight']",
        ),
        (
            [
                "targets.text.open_clip_model=RN50",
                f"targets.text.open_clip_checkpoint={checkpoint}",
            ],
            f"open_clip_checkpoint={checkpoint} does not fit open_clip model RN50",
        ),
        (
            [unlocked, "targets.text.context_length=13"],
            f"context_length=13: the text tower of open_clip model {TINY_MODEL} reads at most 12",
        ),
    ]
    for overrides, expected in cases:
        tower = ["targets.text.tower=open_clip", f"targets.text.open_clip_model={TINY_MODEL}"]
        assert expected in refusal([*tower, *overrides]), overrides


def test_without_open_clip_the_refusal_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # `import open_clip` fails
    message = f"targets.text.tokenizer=clip needs open_clip: {INSTALL}"
    assert refusal(["targets.text.tokenizer=clip"]) == message
    assert refusal(TOWER) == f"targets.text.tower=open_clip needs open_clip: {INSTALL}"


@pytest.fixture(scope="module")
def clip_bpe_run(tmp_path_factory) -> Path:
    """2 steps of the clip preset, tiny, its scratch tower reading the CLIP BPE."""
    cfg = load_config("clip", overrides=[*RUN, "targets.text.tokenizer=clip"])
    return pretrain(cfg, tmp_path_factory.mktemp("clip_bpe") / "run")


def test_scratch_tower_reads_clip_ids_and_zeroshot_rebuilds_them(clip_bpe_run):
    assert not (clip_bpe_run / "tokenizer.json").exists()  # open_clip's vocabulary: nothing
    saved = torch.load(clip_bpe_run / "checkpoint.pt", weights_only=True)["model"]
    embedding = saved["targets.text.encoder.token_embedding.weight"]
    assert embedding.shape[0] == len(open_clip.SimpleTokenizer().encoder)
    target = load_text_target(clip_bpe_run, ENCODER_DIM)
    ids, valid = target.tokenizer.tokenize(CAPTIONS, CONTEXT)
    assert torch.equal(ids, open_clip.tokenize(CAPTIONS, CONTEXT))
    for name, tensor in target.state_dict().items():
        assert torch.equal(tensor, saved[f"targets.text.{name}"]), name


@pytest.fixture(scope="module")
def locked_run(tmp_path_factory, checkpoint) -> Path:
    """2 steps of the clip preset, tiny, on the tiny open_clip text tower, locked."""
    overrides = [*OPEN_CLIP_RUN, f"targets.text.open_clip_checkpoint={checkpoint}"]
    return pretrain(
        load_config("clip", overrides=overrides), tmp_path_factory.mktemp("lit") / "run"
    )


def test_locked_run_keeps_the_tower_out_and_zeroshot_rebuilds_it(locked_run, checkpoint):
    assert not (locked_run / "tokenizer.json").exists()
    state = torch.load(locked_run / "checkpoint.pt", weights_only=True)["model"]
    assert sorted(k for k in state if k.startswith("targets.text.")) == [
        "targets.text.encoder.projection.weight",
        "targets.text.head.weight",
        "targets.text.logit_scale",
    ]
    projection = state["targets.text.encoder.projection.weight"]
    expected = F.normalize(open_clip_embeddings(checkpoint, CAPTIONS) @ projection.T, dim=-1)
    with torch.no_grad():
        text = load_text_target(locked_run, ENCODER_DIM).encode_text(CAPTIONS)
    torch.testing.assert_close(text, expected, atol=1e-6, rtol=0)


def test_unlocked_run_trains_the_tower_and_zeroshot_needs_no_open_clip_file(tmp_path, checkpoint):
    copy = tmp_path / "start.pt"
    copy.write_bytes(checkpoint.read_bytes())
    overrides = [*OPEN_CLIP_RUN, f"targets.text.open_clip_checkpoint={copy}"]
    overrides += ["targets.text.lock=false", "targets.text.embed_dim=16"]  # 16: no projection
    run = pretrain(load_config("clip", overrides=overrides), tmp_path / "run")
    copy.unlink()  # a trained tower's weights are all in checkpoint.pt
    state = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    prefix = "targets.text.encoder.tower."
    reference = open_clip.create_model(TINY_MODEL, pretrained=None, force_custom_text=True).eval()
    tower = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    reference.text.load_state_dict(tower)
    ids = open_clip.get_tokenizer(TINY_MODEL)(CAPTIONS)
    with torch.no_grad():
        expected = reference.encode_text(ids, normalize=True)
        text = load_text_target(run, ENCODER_DIM).encode_text(CAPTIONS)
    torch.testing.assert_close(text, expected, atol=1e-6, rtol=0)
    original = open_clip.create_model(
        TINY_MODEL, pretrained=str(checkpoint), force_custom_text=True
    )
    assert not torch.equal(
        original.text.token_embedding.weight, reference.text.token_embedding.weight
    )


def test_zeroshot_of_a_locked_run_whose_checkpoint_moved_says_so(locked_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes((locked_run / "checkpoint.pt").read_bytes())
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["config"]["targets"]["text"]["open_clip_checkpoint"] = str(tmp_path / "moved.pt")
    torch.save(state, run / "checkpoint.pt")
    message = f"zeroshot cannot rebuild the text target of {run}: targets.text.open_clip_checkpoint"
    with pytest.raises(EvalError, match=re.escape(message)):
        load_text_target(run, ENCODER_DIM)


# ---------------------------------------------------------------- the loss, by hand


BPE_CAPTIONS = [
    "a red circle on a blue background",
    "a green square next to a yellow triangle",
    "two small blue circles",
    "a large red square",
    "a yellow triangle above a green circle",
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(BPE_CAPTIONS, vocab_size=80)


def text_target(tokenizer) -> TextTarget:
    torch.manual_seed(0)
    cfg = TextTargetConfig(
        weight=1.0, embed_dim=8, hidden_dim=16, width=16, depth=1, heads=2, context_length=12
    )
    return TextTarget(cfg, RunContext(ENC_DIM, tokenizer=tokenizer)).eval()


def test_text_init_temperature(tokenizer):
    target = text_target(tokenizer)
    assert (1 / target.logit_scale.exp()).item() == pytest.approx(0.07, rel=1e-6)


@pytest.mark.parametrize("log_scale", [math.log(14.0), math.log(99.0), math.log(150.0)])
def test_text_logit_scale_gradient_is_open_clips_below_and_above_the_cap(log_scale, tokenizer):
    """The forward pass uses exp(logit_scale) as it is: its gradient is open_clip's ClipLoss
    gradient, never cut to zero (the cap is applied after the optimizer step instead)."""
    target = text_target(tokenizer)
    with torch.no_grad():
        target.logit_scale.fill_(log_scale)
    streams = make_streams(3, 16, seed=7, both=False)
    bound = target(StepContext(Batch([], captions=BPE_CAPTIONS[:3]), streams, 4))
    bound.loss.backward()
    image = target.encode_image(streams["a"].tokens.mean(dim=1)).detach()
    text = target.encode_text(BPE_CAPTIONS[:3]).detach()
    reference_log_scale = torch.tensor(log_scale, requires_grad=True)
    ClipLoss()(image, text, reference_log_scale.exp()).backward()
    assert reference_log_scale.grad.abs() > 1e-4
    torch.testing.assert_close(
        target.logit_scale.grad[0], reference_log_scale.grad, atol=1e-5, rtol=1e-4
    )


def test_text_after_optimizer_step_caps_the_scale_at_100(tokenizer):
    target = text_target(tokenizer)
    for log_scale, expected in [(math.log(250.0), 100.0), (math.log(40.0), 40.0), (-1.0, 1.0)]:
        with torch.no_grad():
            target.logit_scale.fill_(log_scale)
        target.after_optimizer_step()
        assert target.logit_scale.exp().item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_text_one_stream_equals_open_clip(n, tokenizer):
    target = text_target(tokenizer)
    streams = make_streams(n, 16, seed=n, both=False)
    captions = [BPE_CAPTIONS[i] for i in range(n)]
    bound = target(StepContext(Batch([], captions=captions), streams, 4))
    image = target.encode_image(streams["a"].tokens.mean(dim=1))
    text = target.encode_text(captions)
    reference = ClipLoss()(image, text, target.logit_scale.exp())
    torch.testing.assert_close(bound.loss, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bound.mi, math.log(n) - reference.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [2, 3])
def test_text_excludes_captionless_samples(n, tokenizer):
    target = text_target(tokenizer)
    streams = make_streams(n, 16, seed=n, both=False)
    captions = [BPE_CAPTIONS[i] if i != 1 else "" for i in range(n)]
    bound = target(StepContext(Batch([], captions=captions), streams, 4))
    keep = [i for i in range(n) if captions[i]]
    image = target.encode_image(streams["a"].tokens.mean(dim=1))[keep]
    text = target.encode_text([captions[i] for i in keep])  # encoded without the empty ones
    reference = ClipLoss()(image, text, target.logit_scale.exp())
    torch.testing.assert_close(bound.loss, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_text_two_streams_average_their_clip_losses(n, tokenizer):
    target = text_target(tokenizer)
    streams = make_streams(n, 16, seed=10 + n)
    captions = [BPE_CAPTIONS[i] if i != 0 or n == 1 else "" for i in range(n)]
    bound = target(StepContext(Batch([], captions=captions), streams, 4))
    losses = []
    for stream in streams.values():
        image = target.encode_image(stream.tokens.mean(dim=1))
        rows = [r for r in range(n) if captions[int(stream.samples[r])]]
        text = target.encode_text([captions[int(stream.samples[r])] for r in rows])
        losses.append(ClipLoss()(image[rows], text, target.logit_scale.exp()))
    torch.testing.assert_close(bound.loss, sum(losses) / 2, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 2])
def test_text_without_captions_is_zero_without_a_figure(n, tokenizer):
    target = text_target(tokenizer)
    bound = target(StepContext(Batch([], captions=[""] * n), make_streams(n, 16, seed=n), 4))
    assert torch.isfinite(bound.loss) and bound.loss.item() == 0.0
    assert math.isnan(bound.mi.item())  # null in the log, left out of means
