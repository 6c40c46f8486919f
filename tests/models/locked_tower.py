"""A locked text tower under FSDP, shared by the MiniLM and open_clip tower tests."""

import torch
from timm.optim import create_optimizer_v2
from torch import nn
from torch.distributed.tensor import DTensor

from m3i.bench.measure import synthetic_batch
from m3i.data.shapes import ShapesDataset
from m3i.train import sharding


def sharded_step(model: nn.Module) -> tuple[torch.optim.Optimizer, dict[str, torch.Tensor]]:
    """Shard `model` (a process group is up), check that its text tower stays plain parameters
    and its projection is sharded, take one AdamW step; the optimizer and the gathered full
    state (copied), which must hold no tower weight."""
    sharding.shard(model)
    encoder = model.targets["text"].encoder
    assert all(type(p) is nn.Parameter for p in encoder.tower.parameters())
    assert isinstance(encoder.projection.weight, DTensor)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-2)
    captions = ShapesDataset("train", num_samples=40).captions()
    loss, _ = model(synthetic_batch(8, 16, captions, torch.device("cpu")))
    loss.backward()
    optimizer.step()
    # one rank: the "full" tensors share the parameters' storage; copy them
    state = {k: v.clone() for k, v in sharding.full_model_state(model).items()}
    assert not [k for k in state if ".tower." in k]
    return optimizer, state
