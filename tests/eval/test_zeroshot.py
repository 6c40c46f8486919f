"""Zero-shot classification through `m3i eval zeroshot`, on a run whose image projection is set
so that every val image's embedding IS its class's prompt embedding: top-1 must be 100%."""

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from m3i.cli import main
from m3i.config import load_config
from m3i.data.specs import open_source
from m3i.eval.zeroshot import load_text_target
from m3i.train.pretrain import pretrain
from tests.tiny import TINY_M3I

NUM_VAL = 32  # <= the backbone width (192): one exact linear solution for every image
TEMPLATES = ["a {}", "a photo of a {}"]
MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]  # ImageNet's, as every view uses
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
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
    """GAP of the backbone's patch tokens, computed with timm on hand-normalised images."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TIMM).eval()
    model.load_state_dict(load_file(run / "backbone.safetensors"))
    x = (images.float() / 255 - MEAN) / STD
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


def test_zeroshot_with_images_built_to_match_their_class_prompt_scores_100(run, capsys):
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

    templates = "[" + ", ".join(f"'{t}'" for t in TEMPLATES) + "]"
    argv = ["eval", "zeroshot", "--checkpoint", str(run), "--data", "shapes", "--json"]
    argv += ["--set", f"num_val={NUM_VAL}", "--set", f"zeroshot.templates={templates}"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["metrics"]["top1"] == 100.0
