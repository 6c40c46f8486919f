"""The `m3i` preset's step, pinned from outside: the EMA teacher that `pretrain` leaves in its
checkpoints follows the METHOD.md recurrence, the step's loss is the weighted sum of the
losses each target gives on its own, and the inter-view decoder reads image B's tokens at the
other view's geometry."""

import math
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from m3i.config import load_config
from m3i.data.batch import collate
from m3i.data.specs import open_source
from m3i.data.views import ViewDataset
from m3i.method import M3IModel
from m3i.mi.targets import RunContext
from m3i.models.backbone import Backbone
from m3i.models.text import train_bpe
from m3i.train.pretrain import pretrain
from tests.tiny import TINY_M3I

TINY = [*TINY_M3I, "model.img_size=16", "model.patch_size=4"]
STEPS = 4
STUDENT, TEACHER = "backbone.", "teacher.module."  # prefixes of the checkpoint's model state

load = partial(torch.load, weights_only=True)


# ---------------------------------------------------------------- the EMA teacher in pretrain


def cosine_momentum(step: int, total: int, base: float = 0.995, final: float = 1.0) -> float:
    """METHOD.md section 3: 0.995 -> 1.0 on a cosine; update k (1-based) of `total` uses the
    value at progress k / total, so the last update leaves the teacher where it was."""
    return final - (final - base) * (1 + math.cos(math.pi * step / total)) / 2


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory) -> Path:
    """STEPS steps of the m3i preset from known initial weights, a checkpoint after each step."""
    root = tmp_path_factory.mktemp("ema")
    cfg = load_config(
        "m3i",
        overrides=[
            *TINY,
            "data.num_train=16",
            "train.batch_size=8",
            f"train.steps={STEPS}",
            "train.lr=1e-2",  # large updates: the teacher's share of them is far above rounding
            "train.warmup_steps=0",
            "train.checkpoint_every=1",
            f"train.keep_checkpoints={STEPS}",
            "train.device=cpu",
            "monitor.every=0",
            "monitor.tensorboard=false",
        ],
    )
    assert (cfg.teacher.momentum, cfg.teacher.momentum_final) == (0.995, 1.0)  # METHOD.md
    torch.manual_seed(1)
    Backbone(cfg.model).save(root / "init.safetensors")  # student_0 = teacher_0, known
    cfg.init = str(root / "init.safetensors")
    return pretrain(cfg, root / "run", progress=False)


def split_state(model_state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(student, teacher) backbone weights of a checkpoint, keyed alike, in float64."""
    student = {
        k[len(STUDENT) :]: v.double() for k, v in model_state.items() if k.startswith(STUDENT)
    }
    teacher = {
        k[len(TEACHER) :]: v.double() for k, v in model_state.items() if k.startswith(TEACHER)
    }
    assert student and student.keys() == teacher.keys()
    return student, teacher


def test_pretrain_teacher_follows_the_ema_recurrence(ema_run):
    """teacher_k = m_k teacher_(k-1) + (1 - m_k) student_k, student_k after optimizer step k,
    with teacher_0 = student_0 = the init weights."""
    init = load_file(ema_run.parent / "init.safetensors")
    init = {f"vit.{k}": v.double() for k, v in init.items()}
    history = ema_run / "checkpoints"
    states = [split_state(load(history / f"step-{k:08d}.pt")["model"]) for k in range(1, STEPS + 1)]
    assert init.keys() == states[0][0].keys()
    previous_teacher, previous_student = init, init
    for step, (student, teacher) in enumerate(states, start=1):
        momentum = cosine_momentum(step, STEPS)
        moved = sum((student[k] - previous_student[k]).norm() ** 2 for k in student).sqrt()
        assert moved > 0.1, (step, moved)  # the optimizer did step the student
        expected_moves, errors = [], []
        for name, value in teacher.items():
            expected = momentum * previous_teacher[name] + (1 - momentum) * student[name]
            expected_moves.append((expected - previous_teacher[name]).norm() ** 2)
            errors.append((value - expected).norm() ** 2)
        expected_move, error = sum(expected_moves).sqrt(), sum(errors).sqrt()
        if momentum == 1.0:  # the last step: the teacher stays
            assert error == 0.0, step
        else:  # the error is float32 rounding, far below the update the teacher takes
            assert expected_move > 1e-4, (step, expected_move)
            assert error < 1e-3 * expected_move, (step, error, expected_move)
        previous_teacher, previous_student = teacher, student


# ---------------------------------------------------------------- the weighted loss

WEIGHTS = {"category": 0.3, "text": 2.0, "intra_view": 0.7, "inter_view": 1.5}


def weighted(active: dict[str, float]) -> list[str]:
    return TINY + [f"targets.{name}.weight={active.get(name, 0)}" for name in WEIGHTS]


@pytest.fixture(scope="module")
def shapes():
    return open_source("shapes", "train", num_samples=8, image_size=16)


def test_loss_is_the_weighted_sum_of_each_targets_own_loss(shapes):
    """The m3i step with weights 0.3 / 2.0 / 0.7 / 1.5 against four models with one target each
    (weight 1, the same weights copied in, the same masks drawn from the same seed)."""
    tokenizer = train_bpe(shapes.captions(), 200)
    cfg = load_config("m3i", overrides=weighted(WEIGHTS))
    assert set(cfg.active_targets()) == set(WEIGHTS)
    torch.manual_seed(0)
    full = M3IModel(cfg, RunContext(num_classes=len(shapes.classes), tokenizer=tokenizer))
    batch = collate(
        [ViewDataset(shapes, cfg.views, cfg.model.img_size, seed=0)[i] for i in range(4)]
    )
    with torch.no_grad():
        torch.manual_seed(5)  # the masks
        loss, _ = full(batch)
        state = full.state_dict()
        alone = {}
        for name in WEIGHTS:
            one = load_config("m3i", overrides=weighted({name: 1.0}))
            model = M3IModel(one, RunContext(num_classes=len(shapes.classes), tokenizer=tokenizer))
            missing = model.state_dict().keys() - state.keys()
            assert not missing, missing
            model.load_state_dict({k: state[k] for k in model.state_dict()})
            torch.manual_seed(5)
            alone[name], _ = model(batch)
    assert all(value > 0.05 for value in alone.values()), alone  # each target has a loss
    expected = sum(WEIGHTS[name] * alone[name] for name in WEIGHTS)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    unweighted = sum(alone.values())
    assert abs(unweighted - expected) > 0.1  # the weights matter at these values


# ---------------------------------------------------------------- the decoder's inputs


def test_inter_view_decoder_reads_stream_b_at_the_other_views_geometry(shapes, monkeypatch):
    """In the m3i step the inter-view decoder call gets image B's own encoder tokens (B = sample
    N-1-k, encoded alone at the positions the mix gave it), those tokens' grid coordinates, and
    queries at view_to_view(box2, flip2 -> box1, flip1) of sample B: the target view's patch
    centres in the input view's frame, not the other way round."""
    import m3i.method as step
    from m3i.data.mixing import gather_tokens
    from m3i.models.decoder import grid_coords, view_to_view

    cfg = load_config("m3i", overrides=TINY)
    torch.manual_seed(0)
    model = M3IModel(
        cfg, RunContext(num_classes=10, tokenizer=train_bpe(shapes.captions(), 200))
    ).eval()
    items = [ViewDataset(shapes, cfg.views, cfg.model.img_size, seed=3)[i] for i in range(4)]
    batch = collate(items)
    view1, view2 = batch.views
    assert not torch.equal(view1.box, view2.box)  # the two views differ
    assert view1.flip.tolist() != view2.flip.tolist()
    splits, calls = [], []
    real_split = step.split_positions

    def spy_split(*args, **kwargs):
        splits.append(real_split(*args, **kwargs))
        return splits[-1]

    monkeypatch.setattr(step, "split_positions", spy_split)
    real_forward = model.decoder.forward
    monkeypatch.setattr(model.decoder, "forward", lambda *a: calls.append(a) or real_forward(*a))
    with torch.no_grad():
        model(batch)
        ((_, pos_b),) = splits
        partners = torch.arange(3, -1, -1)  # image B of mix k is sample N - 1 - k
        patches = model.backbone.embed_patches(view1.image)
        b_tokens = model.backbone.encode(gather_tokens(patches[partners], pos_b))
    inter = [c for c in calls if len(c) == 4 and c[3] is not None]
    assert len(inter) == 1 and len(calls) == 2  # one intra-view, one inter-view decoder call
    tokens, token_coords, query_coords, geometry = inter[0]
    torch.testing.assert_close(tokens, b_tokens, atol=1e-5, rtol=1e-5)
    grid = model.backbone.grid
    torch.testing.assert_close(token_coords, grid_coords(grid)[pos_b])
    expected_coords, expected_geometry = view_to_view(
        grid,
        view2.box[partners],
        view2.flip[partners],
        view1.box[partners],
        view1.flip[partners],
    )
    torch.testing.assert_close(query_coords, expected_coords)
    torch.testing.assert_close(geometry, expected_geometry)
