"""Zero-shot classification through `m3i eval zeroshot`, on a run whose image projection is set
so that every val image's embedding IS its class's prompt embedding: top-1 must be 100%; and
the class names and templates it reads from files or from open_clip."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import timm.data
import torch
import torch.nn.functional as F
from open_clip import zero_shot_metadata
from PIL import Image
from safetensors.torch import load_file

from m3i.cli import main
from m3i.config import load_config
from m3i.data.specs import open_source
from m3i.eval import tasks
from m3i.eval.features import EvalError
from m3i.eval.settings import ZeroshotSettings
from m3i.eval.zeroshot import load_classnames, load_templates, load_text_target
from m3i.train.pretrain import pretrain
from tests.tiny import TINY_M3I

NUM_VAL = 32  # <= the backbone width (192): one exact linear solution for every image
TEMPLATES = ["a {}", "a photo of a {}"]
# timm's eval transform as `m3i eval` documents it (docs/evaluation.md), ImageNet's mean/std
VIEW = timm.data.create_transform(
    input_size=(3, 16, 16), crop_pct=0.875, crop_mode="center", interpolation="bicubic",
    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
)  # fmt: skip
# the tiny backbone as timm builds it (tests/tiny.py, 16 pixels, patches of 4)
TIMM = dict(img_size=16, patch_size=4, depth=2, num_classes=0, global_pool="avg", fc_norm=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """One step of the m3i preset with a linear image projection in its text target."""
    overrides = [
        *TINY_M3I,
        "model.img_size=16",
        "model.patch_size=4",
        "targets.text.head=linear",
        "data.num_train=16",
        "train.batch_size=8",
        "train.steps=1",
        "train.device=cpu",
        "monitor.every=0",
        "monitor.tensorboard=false",
    ]
    return pretrain(load_config("m3i", overrides=overrides), tmp_path_factory.mktemp("zs") / "run")


def pooled_features(run: Path, images: torch.Tensor) -> torch.Tensor:
    """GAP of the backbone's patch tokens, computed with timm on timm's eval views."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TIMM).eval()
    model.load_state_dict(load_file(run / "backbone.safetensors"))
    x = torch.stack([VIEW(Image.fromarray(np.asarray(i.permute(1, 2, 0)))) for i in images])
    with torch.no_grad():
        return model.forward_features(x)[:, model.num_prefix_tokens :].mean(dim=1).double()


def prompt_embeddings(run: Path, classes: list[str], dim: int) -> torch.Tensor:
    """Per class, the normalised mean of its normalised prompt embeddings (CLIP's ensembling)."""
    text = load_text_target(run, dim)
    rows = []
    with torch.no_grad():
        for name in classes:
            prompts = F.normalize(text.encode_text([t.format(name) for t in TEMPLATES]), dim=-1)
            rows.append(F.normalize(prompts.mean(dim=0), dim=0))
    return torch.stack(rows).double()


def set_image_projection(run: Path, weight: torch.Tensor) -> None:
    """Write `weight` (E, D) as the text target's linear image projection (CLIP's: no bias)."""
    path = run / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    model = state["model"]
    (key,) = [
        k for k, v in model.items() if k.startswith("targets.text.") and v.shape == weight.shape
    ]
    model[key] = weight.float()
    torch.save(state, path)


@pytest.fixture(scope="module")
def matched(run) -> Path:
    """The run with the image projection that maps every val image onto its class's prompt
    embedding (TEMPLATES, the data's class names)."""
    val = open_source("shapes", "val", num_samples=NUM_VAL, image_size=16)
    assert val.classes != sorted(val.classes)  # a sorted class list would be caught too
    labels = torch.tensor([val[i].label for i in range(NUM_VAL)])
    assert len(labels.unique()) >= 5
    features = pooled_features(run, torch.stack([val[i].image for i in range(NUM_VAL)]))
    prompts = prompt_embeddings(run, val.classes, features.shape[1])
    similarity = prompts @ prompts.T
    assert (similarity - torch.eye(len(val.classes), dtype=torch.float64)).max() < 0.999
    # the projection W with W pooled_i = prompt embedding of image i's class, for every i
    wanted = prompts[labels]
    weight = (torch.linalg.pinv(features) @ wanted).T
    torch.testing.assert_close(features @ weight.T, wanted, atol=1e-6, rtol=0)
    set_image_projection(run, weight)
    return run


def test_zeroshot_with_images_built_to_match_their_class_prompt_scores_100(matched, capsys):
    templates = "[" + ", ".join(f"'{t}'" for t in TEMPLATES) + "]"
    argv = ["eval", "zeroshot", "--checkpoint", str(matched), "--data", "shapes", "--json"]
    argv += ["--set", f"num_val={NUM_VAL}", "--set", f"zeroshot.templates={templates}"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["metrics"]["top1"] == 100.0


def write_lines(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n\n")  # a trailing blank line is no entry
    return str(path)


def test_imagenet1k_names_and_templates_are_open_clips():
    names = load_classnames("imagenet1k", [str(k) for k in range(1000)])
    assert len(names) == 1000 and names == list(zero_shot_metadata.IMAGENET_CLASSNAMES)
    assert names[0] == zero_shot_metadata.IMAGENET_CLASSNAMES[0]
    templates = load_templates(ZeroshotSettings(templates_file="imagenet1k"))
    openai = zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES
    assert len(templates) == len(openai) == 80
    assert [t.format("tench") for t in templates] == [make("tench") for make in openai]


def test_names_and_templates_files_round_trip(tmp_path):
    names = ["red circle", "blue square", "crème brûlée"]
    path = write_lines(tmp_path / "names.txt", [f"  {name} " for name in names])
    assert load_classnames(path, ["0", "1", "2"]) == names
    assert load_classnames(None, ["a", "b"]) == ["a", "b"]  # the data's own
    templates = ["a photo of a {}.", "itap of the {}"]
    settings = ZeroshotSettings(templates_file=write_lines(tmp_path / "t.txt", templates))
    assert load_templates(settings) == templates
    assert load_templates(ZeroshotSettings()) == ZeroshotSettings().templates


def test_bad_names_and_templates_are_refused_in_one_line(tmp_path, monkeypatch):
    names = write_lines(tmp_path / "names.txt", ["a", "b"])
    empty = write_lines(tmp_path / "empty.txt", ["", "  "])
    no_slot = write_lines(tmp_path / "t.txt", ["a {}", "a photo of {name}"])
    refusals = [
        (lambda: load_classnames(names, ["x", "y", "z"]), "holds 2 class names", "3 classes"),
        (lambda: load_classnames(names, ["x"]), "holds 2 class names", "has 1 classes"),
        (lambda: load_classnames(str(tmp_path / "nope"), ["x"]), "nope is not a file"),
        (lambda: load_classnames(empty, ["x"]), "is empty"),
        (lambda: load_templates(ZeroshotSettings(templates_file=empty)), "is empty"),
        (lambda: load_templates(ZeroshotSettings(templates_file=no_slot)), "{name}", "without"),
    ]
    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if the extra were not installed
    refusals.append((lambda: load_classnames("imagenet1k", ["x"]), "openclip extra"))
    for call, *fragments in refusals:
        with pytest.raises(EvalError) as caught:
            call()
        message = str(caught.value)
        assert "\n" not in message and all(f in message for f in fragments), message


def test_zeroshot_reads_names_and_templates_files(matched, tmp_path, capsys, monkeypatch):
    """Files in the place of the data's names and the templates list: the same prompts score
    100%; the names rotated by one (each image's class named as another) 0%; one name too few
    is refused before any feature is extracted."""
    val = open_source("shapes", "val", num_samples=NUM_VAL, image_size=16)
    templates = write_lines(tmp_path / "templates.txt", TEMPLATES)
    rotated = val.classes[1:] + val.classes[:1]
    argv = ["eval", "zeroshot", "--checkpoint", str(matched), "--data", "shapes", "--json"]
    argv += ["--set", f"num_val={NUM_VAL}", "--set", f"zeroshot.templates_file={templates}"]
    for names, top1 in ((val.classes, 100.0), (rotated, 0.0)):
        path = write_lines(tmp_path / "names.txt", names)
        assert main([*argv, "--set", f"zeroshot.classnames={path}"]) == 0
        assert json.loads(capsys.readouterr().out.splitlines()[-1])["metrics"]["top1"] == top1
    wrong = write_lines(tmp_path / "names.txt", val.classes[:-1])
    monkeypatch.setattr(tasks, "extract", None)  # extracting features would fail otherwise
    assert main([*argv, "--set", f"zeroshot.classnames={wrong}"]) == 2
    out, err = capsys.readouterr()
    assert not out and len(err.strip().splitlines()) == 1 and "class names" in err
