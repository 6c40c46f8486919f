"""The target registry: the data checks and preparations that reach the run through it, the
generic mix checks, and its refusals."""

from dataclasses import dataclass, field, fields

import pytest
import torch

from m3i.config import Config, ConfigError, load_config
from m3i.mi.targets import TARGETS, Target, TargetSpec, information
from m3i.mi.targets.category import CategoryTargetConfig
from m3i.mi.targets.registry import register
from m3i.train.build import build_model, target_run_context
from m3i.train.stopping import TrainingError
from tests.tiny import TINY_M3I

TINY = [*TINY_M3I, "model.img_size=16", "model.patch_size=4", "targets.text.vocab_size=60"]


@dataclass
class Source:
    """A training source as the targets see it: classes, every sample's label, captions."""

    classes: list[str] | None
    sample_labels: list[int] = field(default_factory=lambda: [-1])
    sample_captions: list[str] = field(default_factory=list)
    name: str = "shapes"

    def __len__(self) -> int:
        return len(self.sample_labels)

    def labels(self) -> list[int]:
        return self.sample_labels

    def captions(self) -> list[str]:
        return self.sample_captions


def test_the_category_target_refuses_data_without_labels():
    cfg = load_config("supervised", overrides=TINY)
    with pytest.raises(TrainingError, match="targets.category needs labels, and no sample of"):
        build_model(cfg, Source(classes=None))
    with pytest.raises(TrainingError, match="no sample of data 'shapes' has one"):
        build_model(cfg, Source(classes=["a", "b"], sample_labels=[-1, -1]))


def test_the_text_target_refuses_data_without_captions_for_its_bpe():
    cfg = load_config("clip", overrides=TINY)
    with pytest.raises(TrainingError, match="targets.text needs captions, and data 'shapes'"):
        build_model(cfg, Source(classes=None, sample_captions=[]))


def test_the_run_context_holds_the_label_prior_and_the_tokenizer_the_data_gave():
    cfg = load_config("m3i", overrides=TINY)
    captions = ["a red square", "a blue circle", "two green triangles"] * 4
    labels = [0, 2, 2, -1, 2, 0]  # class 1 has no sample, -1 is unlabelled
    run = target_run_context(cfg, Source(["a", "b", "c"], labels, captions))
    assert run.num_classes == 3
    torch.testing.assert_close(
        run.label_prior, torch.tensor([2 / 5, 0.0, 3 / 5], dtype=torch.float64)
    )
    assert run.tokenizer.decode(run.tokenizer.encode("a red square").ids) == "a red square"


@pytest.mark.parametrize(
    ("preset", "message"),
    [
        ("siameseim", "targets.inter_view needs image B in the mix"),
        ("mae", "targets.pixels needs masked positions"),
        ("data2vec", "targets.intra_view needs masked positions"),
    ],
)
def test_a_target_that_reads_image_b_or_hidden_positions_needs_a_mix(preset, message):
    with pytest.raises(ConfigError, match=f"{message}: set mix.ratio < 1"):
        load_config(preset, overrides=["mix.ratio=1.0"])
    load_config("supervised", overrides=["mix.ratio=1.0"])  # reads pooled tokens only


def test_a_name_is_registered_once():
    spec = TargetSpec("category", CategoryTargetConfig, Target, "lower bound")
    with pytest.raises(ValueError, match="target 'category' is registered twice"):
        register(spec)
    with pytest.raises(ValueError, match="information must be 'lower bound' or 'estimate'"):
        register(TargetSpec("new", CategoryTargetConfig, Target, "a bound"))
    assert "new" not in TARGETS


def test_every_target_says_whether_its_figure_is_a_bound_or_an_estimate():
    # by hand, from docs/information.md: Boltzmann posteriors give InfoNCE-style lower bounds,
    # Gaussian ones the Gaussian-channel estimate
    expected = {
        "category": "lower bound",
        "text": "lower bound",
        "view_contrast": "lower bound",
        "intra_view": "estimate",
        "inter_view": "estimate",
        "pixels": "estimate",
        "view_regress": "estimate",
    }
    assert {name: information()[name] for name in expected} == expected
    assert [f.name for f in fields(Config().targets)] == [
        "category", "text", "intra_view", "inter_view", "pixels", "view_contrast", "view_regress"
    ]  # fmt: skip
