"""A worker whose own computation goes non-finite skips that round (it is not killed by it),
and gives up with a clear error only after several such rounds in a row. Real coordinator."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_worker import Toy

from chronos.core.errors import NonFiniteError
from chronos.distributed.coordinator import Coordinator
from chronos.distributed.worker import MAX_NONFINITE_ROUNDS


class NanToy(Toy):
    """Toy whose inner loss is NaN in the solves numbered in ``bad`` (1-based)."""

    def __init__(self, bad: range) -> None:
        super().__init__()
        self.bad, self.solves = bad, 0

    def solve(self, *args: Any, **kwargs: Any) -> Any:
        self.solves += 1
        return super().solve(*args, **kwargs)

    def inner_loss(self, params: Any, outer_params: Any, batch: Any = None) -> torch.Tensor:
        loss = super().inner_loss(params, outer_params, batch)
        return loss * float("nan") if self.solves in self.bad else loss


@pytest.mark.timeout(60)
def test_a_non_finite_round_is_skipped_and_the_worker_goes_on(workers: Any) -> None:
    problem = NanToy(bad=range(2, 4))
    with Coordinator(problem.default_outer_params(), port=0) as coord:
        w = workers(problem, coord.address, worker_id="nan")
        w.connect()
        replies = [w.step() for _ in range(5)]
        assert [r is None for r in replies] == [False, True, True, False, False]
        assert w.stats()["hypergradients_nonfinite"] == 2
        assert coord.stats()["commits_accepted"] == 3


@pytest.mark.timeout(60)
def test_rounds_that_keep_going_non_finite_end_the_worker_with_the_reason(
        workers: Any) -> None:
    problem = NanToy(bad=range(1, 1000))
    with Coordinator(problem.default_outer_params(), port=0) as coord:
        w = workers(problem, coord.address, worker_id="nan")
        w.connect()
        for _ in range(MAX_NONFINITE_ROUNDS - 1):
            assert w.step() is None
        with pytest.raises(NonFiniteError, match="rounds in a row went non-finite"):
            w.step()
