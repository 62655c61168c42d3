"""Fixtures of the solver conformance battery (problems live in solver_problems.py)."""

import pytest
import torch
from solver_problems import Logistic, Ridge, make_logistic, make_ridge


@pytest.fixture
def ridge() -> Ridge:
    return make_ridge()


@pytest.fixture
def logistic() -> Logistic:
    return make_logistic()


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Small problems run fastest (and least noisily on a shared 2-core box) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
