"""Shared by the layer tests."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # the tensors here are tiny: intra-op threads only add contention on a busy CI machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
