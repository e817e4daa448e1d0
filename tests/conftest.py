"""Shared by the whole suite."""

import pytest
import torch


@pytest.fixture
def single_thread():
    """One intra-op thread for the test: the tensors of most tests are tiny, and extra threads only add contention
    on a busy 2-core CI machine. Directories of such tests request it from an autouse fixture of their conftest."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
