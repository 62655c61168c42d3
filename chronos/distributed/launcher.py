"""Run a whole job on this machine: one coordinator thread and N worker *processes*.

``PROBLEM`` is an import path ``package.module:factory``; the factory is called as
``factory(rank, world_size)`` in every worker process (so each picks its data shard) and once
in the launcher, whose problem's ``default_outer_params()`` gives the initial λ.

Worker processes start with the ``spawn`` method (torch thread pools and ZeroMQ contexts do
not survive a fork), call ``torch.set_num_threads`` so N workers do not oversubscribe the
cores, and talk to the coordinator over TCP on 127.0.0.1. :func:`run_local` returns when the
coordinator reaches ``max_steps`` (it then tells every worker to stop), on timeout, or on
Ctrl-C, and always stops every process it started.

Example:
    >>> cfg = RunConfig(problem="chronos.benchmarks.problems:digits_ridge", workers=2,
    ...                 max_steps=5)
    >>> cfg.mode, cfg.straggler_delays()
    ('async', (0.0, 0.0))
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch

from chronos.core import tensordict as td
from chronos.core.errors import ChronosError, ConfigError
from chronos.core.problem import InnerProblem
from chronos.distributed.coordinator import Coordinator
from chronos.distributed.worker import Worker, WorkerConfig

__all__ = ["RunConfig", "RunResult", "load_factory", "run_local", "worker_main"]

log = logging.getLogger("chronos.launcher")

Factory = Callable[[int, int], InnerProblem]


def load_factory(spec: str) -> Factory:
    """Import ``package.module:factory`` and return the factory."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ConfigError(
            f"PROBLEM must look like 'package.module:factory', got {spec!r} "
            "(e.g. chronos.benchmarks.problems:digits_weight_decay)"
        )
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"cannot import {module_name!r} from PROBLEM {spec!r}: {e}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"{module_name!r} has no callable {attr!r} (PROBLEM {spec!r})")
    return factory


def make_problem(spec: str, rank: int, world_size: int) -> InnerProblem:
    """Call the factory and check that it returned an :class:`InnerProblem`."""
    problem = load_factory(spec)(rank, world_size)
    if not isinstance(problem, InnerProblem):
        raise ConfigError(
            f"factory {spec!r} returned {type(problem).__name__}, not an InnerProblem"
        )
    return problem


def worker_main(
    spec: str, rank: int, world_size: int, config: WorkerConfig,
    max_iterations: int | None = None, log_level: int = logging.WARNING,
) -> None:
    """Entry point of a worker process (picklable for the ``spawn`` start method)."""
    logging.basicConfig(level=log_level, format=f"[worker {rank}] %(levelname)s %(message)s")
    torch.set_num_threads(config.num_threads or 1)
    problem = make_problem(spec, rank, world_size)
    Worker(problem, config).run(max_iterations=max_iterations)


@dataclass(frozen=True)
class RunConfig:
    """A local job: coordinator settings, worker settings and how many workers.

    ``straggler_delay`` is either one number for every worker or a tuple with one per worker
    (seconds of injected delay per iteration).
    """

    problem: str
    workers: int = 2
    mode: Literal["async", "sync"] = "async"
    max_steps: int = 50
    max_in_flight: int = 3
    max_staleness: int = 2
    decay: float = 0.5
    outer_lr: float = 0.1
    optimizer: str = "sgd"
    min_commits: int = 1
    lease_timeout: float = 20.0
    heartbeat_interval: float = 1.0
    straggler_delay: float | tuple[float, ...] = 0.0
    inner_steps: int | None = None
    hypergradient: Literal["implicit", "unrolled"] = "implicit"
    significance_threshold: float = 0.0
    threads_per_worker: int = 1
    timeout: float = 300.0
    port: int = 0
    worker_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(f"workers must be an int >= 1, got {self.workers!r}")
        if self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if not self.timeout > 0:
            raise ConfigError(f"timeout must be > 0 seconds, got {self.timeout}")
        self.straggler_delays()  # validates

    def straggler_delays(self) -> tuple[float, ...]:
        """One injected delay per worker."""
        d = self.straggler_delay
        delays = (float(d),) * self.workers if isinstance(d, (int, float)) else tuple(d)
        if len(delays) != self.workers or any(x < 0 for x in delays):
            raise ConfigError(
                f"straggler_delay must be one number >= 0 or {self.workers} of them, got {d!r}"
            )
        return delays


@dataclass(frozen=True)
class RunResult:
    """What a local job did."""

    outer_params: dict[str, torch.Tensor]
    version: int
    wall_time: float
    stats: dict[str, Any]
    history: list[dict[str, Any]]
    worker_exitcodes: tuple[int | None, ...]
    completed: bool

    def summary(self) -> dict[str, Any]:
        """JSON-friendly summary (λ as lists)."""
        return {
            "version": self.version,
            "wall_time_s": self.wall_time,
            "completed": self.completed,
            "outer_params": {k: v.tolist() for k, v in self.outer_params.items()},
            "stats": self.stats,
            "worker_exitcodes": list(self.worker_exitcodes),
        }


def run_local(
    cfg: RunConfig,
    progress: Callable[[dict[str, Any]], None] | None = None,
    progress_interval: float = 1.0,
) -> RunResult:
    """Start the coordinator and ``cfg.workers`` worker processes; run until done.

    ``progress`` (if given) is called about every ``progress_interval`` seconds with the
    coordinator's :meth:`~Coordinator.stats` plus ``outer_loss`` and ``commits_per_s``.
    """
    problem = make_problem(cfg.problem, 0, cfg.workers)
    init = getattr(problem, "default_outer_params", None)
    if not callable(init):
        raise ConfigError(
            f"the problem from {cfg.problem!r} needs a default_outer_params() method giving the "
            "initial outer parameters"
        )
    outer0 = td.clone(init())
    coordinator = Coordinator(
        outer0, port=cfg.port, mode=cfg.mode, num_workers=cfg.workers,
        max_in_flight=cfg.max_in_flight, max_staleness=cfg.max_staleness, decay=cfg.decay,
        outer_lr=cfg.outer_lr, optimizer=cfg.optimizer, min_commits=cfg.min_commits,
        max_steps=cfg.max_steps, lease_timeout=cfg.lease_timeout,
        heartbeat_interval=cfg.heartbeat_interval,
    )
    coordinator.start()
    ctx = mp.get_context("spawn")
    procs: list[Any] = []
    t0 = time.perf_counter()
    completed = False
    try:
        base = WorkerConfig(
            coordinator_addr=coordinator.address, inner_steps=cfg.inner_steps,
            hypergradient=cfg.hypergradient, significance_threshold=cfg.significance_threshold,
            num_threads=cfg.threads_per_worker, connect_timeout=max(30.0, cfg.lease_timeout),
            **cfg.worker_options,
        )
        for rank, delay in enumerate(cfg.straggler_delays()):
            wcfg = replace(base, worker_id=f"worker-{rank}", straggler_delay=delay)
            p = ctx.Process(target=worker_main, args=(cfg.problem, rank, cfg.workers, wcfg),
                            name=f"chronos-worker-{rank}", daemon=True)
            p.start()
            procs.append(p)
        deadline = t0 + cfg.timeout
        next_report = t0
        while True:
            if coordinator.wait(timeout=0.1):
                completed = coordinator.version >= cfg.max_steps
                break
            now = time.perf_counter()
            if progress is not None and now >= next_report:
                progress(_progress_stats(coordinator, now - t0))
                next_report = now + progress_interval
            if all(not p.is_alive() for p in procs):
                log.error("every worker process exited before the job finished")
                break
            if now >= deadline:
                log.error("job timed out after %.0f s at version %d", cfg.timeout,
                          coordinator.version)
                break
        if progress is not None:
            progress(_progress_stats(coordinator, time.perf_counter() - t0))
    finally:
        wall = time.perf_counter() - t0
        coordinator.stop()  # tells every worker to shut down
        codes = _join_all(procs, timeout=10.0)
    return RunResult(
        outer_params=coordinator.outer_params,
        version=coordinator.version,
        wall_time=wall,
        stats=coordinator.stats(),
        history=coordinator.history,
        worker_exitcodes=codes,
        completed=completed,
    )


def _progress_stats(coordinator: Coordinator, elapsed: float) -> dict[str, Any]:
    s = coordinator.stats()
    hist = coordinator.history
    losses = [h["outer_loss"] for h in hist if isinstance(h.get("outer_loss"), float)]
    s["outer_loss"] = losses[-1] if losses else float("nan")
    s["elapsed_s"] = elapsed
    s["commits_per_s"] = s.get("commits_accepted", 0) / elapsed if elapsed > 0 else 0.0
    return s


def _join_all(procs: list[Any], timeout: float) -> tuple[int | None, ...]:
    """Join every process; terminate, then kill, whatever is still running."""
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(2.0)
        if p.is_alive():
            p.kill()
            p.join(2.0)
    return tuple(p.exitcode for p in procs)


def config_dict(cfg: RunConfig) -> dict[str, Any]:
    """``asdict`` with tuples as lists (for JSON reports)."""
    out = asdict(cfg)
    out["straggler_delay"] = list(cfg.straggler_delays())
    out["pid"] = os.getpid()
    return out


def require(condition: bool, message: str) -> None:
    """Raise :class:`ChronosError` with ``message`` unless ``condition``."""
    if not condition:
        raise ChronosError(message)
