"""Shared by the layer tests."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield
