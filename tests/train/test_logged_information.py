"""The Gaussian information estimates cost an eigendecomposition each: the training loop asks
for them only on the steps it logs, and those records carry them."""

import json

import m3i.mi.posteriors as posteriors
from m3i.config import load_config
from m3i.train.pretrain import pretrain
from tests.tiny import TINY_M3I


def test_estimates_are_computed_on_logged_steps_only(tmp_path, monkeypatch):
    calls = []
    real = posteriors.gaussian_information

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(posteriors, "gaussian_information", counted)
    overrides = [*TINY_M3I, "model.img_size=16", "model.patch_size=4", "train.batch_size=16"]
    overrides += ["data.num_train=64", "train.steps=5", "train.log_every=2", "monitor.every=0"]
    overrides += ["monitor.final_eval=[]", "monitor.tensorboard=false"]
    pretrain(load_config("m3i", overrides=overrides), tmp_path, progress=False)
    # steps 2, 4 and the last (5) are logged; m3i has two Gaussian targets (intra, inter view)
    assert len(calls) == 3 * 2
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 5]
    assert all("mi/intra_view" in r and "mi/inter_view" in r for r in records)


def test_unmeasured_gaussian_keeps_the_loss_and_reports_nan():
    import torch

    prediction, target = torch.randn(50, 4), torch.randn(50, 4)
    measured = posteriors.gaussian(prediction, target)
    skipped = posteriors.gaussian(prediction, target, measure=False)
    assert torch.equal(measured.loss, skipped.loss)
    assert torch.isfinite(measured.mi) and torch.isnan(skipped.mi)
