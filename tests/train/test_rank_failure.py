"""A rank that dies does not leave the others hanging: they fail after train.dist_timeout."""

import multiprocessing
import os
import time
from pathlib import Path

from m3i.config import load_config
from tests.tiny import TINY_M3I
from tests.train.test_ddp import free_ports

TIMEOUT = 5


def worker(rank: int, port: int, out: Path, queue) -> None:
    import torch

    from m3i.train import optimizer_step
    from m3i.train.pretrain import pretrain

    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    if rank == 1:  # dies at its second step, without a word to rank 0
        calls = []
        step = optimizer_step.OptimizerStep.__call__

        def dying(self, batch):
            calls.append(1)
            if len(calls) == 2:
                os._exit(1)
            return step(self, batch)

        optimizer_step.OptimizerStep.__call__ = dying
    cfg = load_config(
        "supervised",
        overrides=TINY_M3I
        + ["train.steps=20", "data.num_train=64", "train.batch_size=8", "monitor.every=0"]
        + [f"train.dist_timeout={TIMEOUT}", "train.device=cpu", "monitor.tensorboard=false"],
    )
    start = time.monotonic()
    try:
        pretrain(cfg, out / f"rank{rank}", progress=False)
        queue.put((rank, "finished", time.monotonic() - start))
    except Exception as err:  # noqa: BLE001 - the test reports whatever ended the rank
        queue.put((rank, f"{type(err).__name__}: {err}", time.monotonic() - start))


def test_the_surviving_rank_fails_after_the_timeout(tmp_path):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    port = free_ports(1)[0]
    processes = [
        context.Process(target=worker, args=(rank, port, tmp_path, queue)) for rank in (0, 1)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert not any(p.is_alive() for p in processes), "a rank hung"
    assert processes[1].exitcode == 1
    rank, outcome, seconds = queue.get(timeout=5)
    assert rank == 0 and outcome.startswith("TrainingError: rank 0: a collective failed")
    assert "another rank died" in outcome
    assert seconds < 60  # failed after about TIMEOUT seconds, not the 30-minute default
