"""The README's timm snippet, run as written against the files a run of the default preset
writes."""

import re
from pathlib import Path

import torch

from m3i.config import load_config
from m3i.models.backbone import Backbone, load_timm_model
from m3i.models.timm_dir import save_backbone_files

README = Path(__file__).resolve().parents[1] / "README.md"
PLACEHOLDER = "runs/m3i"
HEADING = "A finished run folder is a timm `local-dir`"


def timm_snippet() -> str:
    """The ```python block after the README's paragraph on the timm local-dir."""
    after = README.read_text().split(HEADING, 1)[1]
    match = re.search(r"```python\n(.*?)```", after, re.DOTALL)
    assert match, f"no ```python block after {HEADING!r}"
    return match.group(1)


def test_readme_timm_snippet_gives_m3i_features(tmp_path):
    torch.manual_seed(0)
    backbone = Backbone(load_config("m3i").model).eval()  # what `m3i pretrain` writes
    with torch.no_grad():  # weights far from init, so that every pooling choice shows
        for param in backbone.parameters():
            param.normal_(std=0.5)
    save_backbone_files(backbone, tmp_path)  # what a run folder holds
    path = tmp_path / "backbone.safetensors"
    snippet = timm_snippet()
    assert PLACEHOLDER in snippet
    namespace: dict = {}
    exec(snippet.replace(PLACEHOLDER, str(tmp_path)), namespace)
    model = namespace["model"].eval()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = model(images)
        torch.testing.assert_close(features, load_timm_model(path).eval()(images))
        # m3i's pooled feature: the mean of the final-LayerNorm'd patch tokens
        torch.testing.assert_close(features, backbone(images).mean(dim=1), atol=1e-5, rtol=1e-5)
