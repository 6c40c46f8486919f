"""The logged figures of a step: means over micro-batches and over ranks leave out a target's
NaN figure (a part without its samples) instead of counting it, and stay NaN (null) when no
part has one."""

import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from m3i.train.logged_means import finite_mean, mean_over_ranks

NAN = float("nan")


def test_a_micro_batch_without_a_figure_is_left_out_of_the_mean():
    assert finite_mean([torch.tensor(1.0), torch.tensor(NAN), torch.tensor(4.0)]).item() == 2.5
    assert finite_mean([torch.tensor(1.0), torch.tensor(4.0)]).item() == 2.5
    assert math.isnan(finite_mean([torch.tensor(NAN), torch.tensor(NAN)]).item())


def test_one_process_keeps_its_figures():
    loss, monitors = mean_over_ranks(
        torch.tensor(2.0), {"a": torch.tensor(NAN), "b": torch.tensor(3.0)}
    )
    assert loss == 2.0 and monitors["b"] == 3.0 and math.isnan(monitors["a"])


def worker(rank: int, root: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{root / 'store'}", rank=rank, world_size=2)
    mine = {  # rank 0 has no sample of "a"; neither has one of "c"
        "a": torch.tensor([NAN, 5.0][rank]),
        "b": torch.tensor([1.0, 3.0][rank]),
        "c": torch.tensor(NAN),
    }
    loss, monitors = mean_over_ranks(torch.tensor(float(rank)), mine)
    (root / f"rank{rank}.txt").write_text(repr((loss, monitors)))
    dist.destroy_process_group()


def test_a_rank_without_a_figure_is_left_out_of_the_mean_over_ranks(tmp_path):
    mp.spawn(worker, args=(tmp_path,), nprocs=2, join=True)
    for rank in (0, 1):
        loss, monitors = eval((tmp_path / f"rank{rank}.txt").read_text(), {"nan": NAN})
        assert loss == 0.5 and monitors["a"] == 5.0 and monitors["b"] == 2.0
        assert math.isnan(monitors["c"])
