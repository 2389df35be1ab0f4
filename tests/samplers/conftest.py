"""Shared fixtures for the samplers tests."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # The CI box has 2 cores shared by several jobs: intra-op threads only oversubscribe them (the small
    # tensors here gain nothing from threading), which made one energy evaluation ~50x slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
