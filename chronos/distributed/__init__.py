"""Distributed runtime: ZeroMQ coordinator and workers, wire protocol, local launcher.

Example:
    >>> from chronos.distributed import Coordinator, Worker, WorkerConfig
    >>> WorkerConfig(coordinator_addr="tcp://127.0.0.1:5555").hypergradient
    'implicit'
"""

from chronos.distributed.coordinator import Coordinator
from chronos.distributed.launcher import RunConfig, RunResult, run_local
from chronos.distributed.messages import PROTOCOL_VERSION
from chronos.distributed.state import CoordinatorConfig, CoordinatorState, Outgoing
from chronos.distributed.worker import Worker, WorkerConfig

__all__ = [
    "PROTOCOL_VERSION",
    "Coordinator",
    "CoordinatorConfig",
    "CoordinatorState",
    "Outgoing",
    "RunConfig",
    "RunResult",
    "Worker",
    "WorkerConfig",
    "run_local",
]
