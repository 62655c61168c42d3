"""Fixtures of the solver conformance battery (problems live in solver_problems.py)."""

import pytest
from solver_problems import Logistic, Ridge, make_logistic, make_ridge


@pytest.fixture
def ridge() -> Ridge:
    return make_ridge()


@pytest.fixture
def logistic() -> Logistic:
    return make_logistic()


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every solver test runs on one torch thread (see tests/conftest.py)."""
