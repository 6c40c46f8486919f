"""Run torch single-threaded in tests: with 2 cores, tiny ops on 2 threads slow down ~100x
whenever another process (a spawned distributed worker, a parallel job) holds a core."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
