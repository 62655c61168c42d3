"""Fixtures shared by the worker tests: real :class:`Worker` s, each closed after its test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from chronos.core import InnerProblem
from chronos.distributed.worker import Worker, WorkerConfig


@pytest.fixture
def workers() -> Iterator[Callable[..., Worker]]:
    made: list[Worker] = []

    def make(problem: InnerProblem, address: str, **kwargs: Any) -> Worker:
        kwargs.setdefault("request_timeout", 2.0)
        kwargs.setdefault("connect_timeout", 10.0)
        w = Worker(problem, WorkerConfig(coordinator_addr=address, **kwargs))
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()
