"""The worker's unrolled hypergradient differentiates the inner solve the worker really ran.

A real coordinator (plain SGD, lr 1, one step) and a real worker over 127.0.0.1: the step
moves λ by exactly the committed hypergradient, which must equal
:func:`~chronos.solver.unrolled_hypergradient` through the problem's own solve (its start, its
number of steps, its ``inner_lr``), not some fixed 20 steps of lr 0.1.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from chronos.core import InnerProblem
from chronos.core.errors import ConfigError
from chronos.distributed.coordinator import Coordinator
from chronos.distributed.worker import Worker, WorkerConfig
from chronos.solver import unrolled_hypergradient

f64 = torch.float64


class Quadratic(InnerProblem):
    """f(θ, λ) = ½‖θ − a‖² + ½ Σ e^{λ_i} θ_i², F(θ) = ½‖θ − b‖², solved by SGD."""

    num_steps = 7
    inner_lr = 0.3
    optimizer = "sgd"
    tol = 0.0

    def __init__(self, optimizer: str = "sgd") -> None:
        self.optimizer = optimizer
        self.a = torch.linspace(0.5, 1.5, 4, dtype=f64)
        self.b = torch.full((4,), 0.25, dtype=f64)

    def default_outer_params(self) -> dict[str, torch.Tensor]:
        return {"lam": torch.zeros(4, dtype=f64)}

    def init_params(self) -> dict[str, torch.Tensor]:
        return {"theta": torch.zeros(4, dtype=f64)}

    def inner_loss(self, params, outer_params, batch=None):
        th = params["theta"]
        return 0.5 * ((th - self.a) ** 2).sum() + 0.5 * (outer_params["lam"].exp() * th**2).sum()

    def outer_loss(self, params, outer_params, batch=None):
        return 0.5 * ((params["theta"] - self.b) ** 2).sum()


@pytest.fixture
def coordinator() -> Iterator[Coordinator]:
    c = Coordinator(Quadratic().default_outer_params(), port=0, optimizer="sgd", outer_lr=1.0,
                    max_steps=1, min_commits=1, heartbeat_interval=0.1).start()
    yield c
    c.stop()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("optimizer, momentum", [("sgd", 0.0), ("momentum", 0.9)])
def test_unrolled_commit_replays_the_problems_own_solve(coordinator, optimizer, momentum):
    prob = Quadratic(optimizer)
    lam0 = prob.default_outer_params()
    w = Worker(prob, WorkerConfig(coordinator_addr=coordinator.address, hypergradient="unrolled",
                                  request_timeout=2.0, connect_timeout=10.0))
    try:
        w.run(max_iterations=1)
    finally:
        w.close()
    assert coordinator.version == 1
    committed = lam0["lam"] - coordinator.outer_params["lam"]  # SGD, lr 1, weight 1
    expected = unrolled_hypergradient(prob.inner_loss, prob.outer_loss, prob.init_params(), lam0,
                                      steps=prob.num_steps, lr=prob.inner_lr, momentum=momentum)
    assert torch.allclose(committed, expected["lam"], rtol=1e-9, atol=1e-12)
    # the old fixed path (20 steps of lr 0.1) gives a different answer on this problem
    old = unrolled_hypergradient(prob.inner_loss, prob.outer_loss, prob.init_params(), lam0,
                                 steps=20, lr=0.1)
    assert not torch.allclose(committed, old["lam"], rtol=1e-3)


def test_unrolled_on_a_problem_that_cannot_be_replayed_says_what_to_do():
    with pytest.raises(ConfigError, match="unroll_lr"):
        Worker(Quadratic("lbfgs"), WorkerConfig(hypergradient="unrolled"))
    Worker(Quadratic("lbfgs"), WorkerConfig(hypergradient="unrolled", unroll_lr=0.1)).close()
    with pytest.raises(ConfigError, match="unroll_lr too"):
        WorkerConfig(hypergradient="unrolled", unroll_steps=5)
