"""Shared test settings: hypothesis profile without deadlines (the machine is shared/noisy), and
the ``one_torch_thread`` fixture."""

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "chronos", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=60
)
settings.load_profile("chronos")


@pytest.fixture
def one_torch_thread():
    """Small problems run fastest (and least noisily on a shared 2-core box) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
