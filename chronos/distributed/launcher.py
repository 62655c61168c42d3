"""Run a whole job on this machine: one coordinator thread and N worker *processes*.

``PROBLEM`` is an import path ``package.module:factory``; the factory is called as
``factory(rank, world_size)`` in every worker process (so each picks its data shard) and once
in the launcher, whose problem's ``default_outer_params()`` gives the initial λ.

Worker processes start with the ``spawn`` method (torch thread pools and ZeroMQ contexts do
not survive a fork), call ``torch.set_num_threads`` so N workers do not oversubscribe the
cores, and talk to the coordinator over TCP on 127.0.0.1. :func:`run_local` returns when the
coordinator reaches ``max_steps`` (it then tells every worker to stop), when every worker
exited, or on timeout; Ctrl-C raises :class:`RunInterrupted` (a ``KeyboardInterrupt`` carrying
the partial :class:`RunResult`) after the cleanup. Either way every process it started is
stopped: workers ignore SIGINT (the launcher owns Ctrl-C), leave on the coordinator's
ShutdownNotice, stop cleanly on SIGTERM, and stop by themselves if the launcher
dies.

With ``max_restarts`` > 0 a worker process that dies before the job is done (a non-zero exit
code, e.g. killed by a signal) is started again with the same rank, id (``worker-RANK``) and
settings, up to ``max_restarts`` times per worker (see :func:`run_local`).

A PROBLEM module in the current directory (``myprob:make``) is found as with ``python -m``: the
launcher puts the current directory on ``sys.path`` (:func:`add_cwd_to_path`) and hands its
import path to every worker process. ``seed`` seeds ``random``, NumPy and torch in the launcher
and ``seed + rank`` in worker ``rank`` (:func:`seed_everything`).

Example:
    >>> cfg = RunConfig(problem="chronos.benchmarks.problems:digits_ridge", workers=2,
    ...                 max_steps=5)
    >>> cfg.mode, cfg.straggler_delays()
    ('async', (0.0, 0.0))
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import multiprocessing as mp
import multiprocessing.connection
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, cast

import torch

from chronos.communication.accounting import merge_by_op
from chronos.continuum.timescale import MultiTimescaleConfig
from chronos.core import tensordict as td
from chronos.core.errors import ChronosError, ConfigError
from chronos.core.problem import InnerProblem
from chronos.core.tensordict import TensorDict
from chronos.distributed import defaults
from chronos.distributed.coordinator import Coordinator
from chronos.distributed.group import GroupSpec, free_port
from chronos.distributed.group_worker import GroupSettings, check_group_problem, group_main
from chronos.distributed.inner_sync import SyncPolicy
from chronos.distributed.keys import load_coordinator_keys, load_worker_keys
from chronos.distributed.worker import Worker, WorkerConfig, unroll_momentum

__all__ = [
    "DEFAULT_PROBLEM",
    "RunConfig",
    "RunInterrupted",
    "RunResult",
    "add_cwd_to_path",
    "format_bytes_by_op",
    "initial_outer_params",
    "load_factory",
    "make_problem",
    "outer_losses",
    "run_local",
    "seed_everything",
    "worker_main",
]

DEFAULT_PROBLEM = "chronos.benchmarks.problems:digits_weight_decay"

log = logging.getLogger("chronos.launcher")

Factory = Callable[[int, int], InnerProblem]


def add_cwd_to_path() -> str:
    """Put the current directory first on ``sys.path`` (as ``python -m`` does) so that a PROBLEM
    module next to the user (``myprob:make``) imports; return it. Idempotent."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    return cwd


def seed_everything(seed: int | None) -> None:
    """Seed ``random``, NumPy (if installed) and torch with ``seed``; ``None`` does nothing."""
    if seed is None:
        return
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
    except ImportError:  # pragma: no cover  (numpy comes with torch in practice)
        return
    np.random.seed(seed % 2**32)


def load_factory(spec: str) -> Factory:
    """Import ``package.module:factory`` and return the factory.

    Raises :class:`ConfigError` (one line, saying what to fix) for a malformed spec, a module
    that cannot be imported (or fails while importing) and a missing or non-callable attribute.
    """
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ConfigError(
            f"PROBLEM must look like 'package.module:factory', got {spec!r} "
            f"(e.g. {DEFAULT_PROBLEM})"
        )
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(
            f"cannot import {module_name!r} (PROBLEM {spec!r}): {e}; searched the current "
            f"directory {os.getcwd()!r} and sys.path"
        ) from None
    except Exception as e:  # the module itself failed while importing
        raise ConfigError(
            f"importing {module_name!r} (PROBLEM {spec!r}) failed: {type(e).__name__}: {e}"
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"module {module_name!r} has no callable {attr!r} (PROBLEM {spec!r})")
    return cast(Factory, factory)


def make_problem(spec: str, rank: int, world_size: int) -> InnerProblem:
    """Call the factory as ``factory(rank, world_size)`` and check it gave an InnerProblem."""
    factory = load_factory(spec)
    try:
        problem = factory(rank, world_size)
    except ChronosError:
        raise
    except Exception as e:
        raise ConfigError(
            f"PROBLEM factory {spec!r} failed for rank {rank} of {world_size}: "
            f"{type(e).__name__}: {e}"
        ) from None
    if not isinstance(problem, InnerProblem):
        raise ConfigError(
            f"PROBLEM factory {spec!r} returned {type(problem).__name__}, not an InnerProblem"
        )
    return problem


def default_outer_lr(problem: InnerProblem) -> float:
    """The step size the problem's own outer optimizer gets by default (see
    :func:`~chronos.distributed.defaults.resolve_outer_optimizer`)."""
    return defaults.resolve_outer_optimizer(None, None, problem)[1]


def coordinator_settings(
    optimizer: str | MultiTimescaleConfig | None, outer_lr: float | None,
    min_commits: int | str, problem: InnerProblem,
) -> dict[str, Any]:
    """``optimizer``, ``outer_lr`` and ``min_commits`` for :class:`Coordinator`, resolved: the
    user's choice, else the problem's, else :mod:`~chronos.distributed.defaults`."""
    opt, lr = defaults.resolve_outer_optimizer(optimizer, outer_lr, problem)
    return {"optimizer": opt, "outer_lr": lr, "min_commits": min_commits}


def make_coordinator(outer0: TensorDict, settings: dict[str, Any], **kwargs: Any) -> Coordinator:
    """``Coordinator(outer0, **settings, **kwargs)`` (``settings`` from
    :func:`coordinator_settings`)."""
    return Coordinator(outer0, **settings, **kwargs)


def initial_outer_params(problem: InnerProblem, spec: str) -> TensorDict:
    """The problem's ``default_outer_params()``: the coordinator's initial λ."""
    init = getattr(problem, "default_outer_params", None)
    if not callable(init):
        raise ConfigError(
            f"the problem from {spec!r} needs a default_outer_params() method giving the "
            "initial outer parameters"
        )
    return td.clone(td.as_tensor_dict(init(), what="default_outer_params()"))


def worker_main(
    spec: str, rank: int, world_size: int, config: WorkerConfig,
    max_iterations: int | None = None, log_level: int = logging.WARNING,
    import_path: tuple[str, ...] = (), seed: int | None = None,
    result_queue: Any = None,
) -> None:
    """Entry point of a worker process started by :func:`run_local` (``spawn``).

    Ctrl-C belongs to the launcher: SIGINT is ignored here (the launcher starts its workers
    with SIGINT ignored already, so not even their imports are interrupted). SIGTERM, a
    ShutdownNotice or the launcher's death stop the worker cleanly (exit code 0); a
    :class:`ChronosError` is logged as one line and exits with code 1. ``import_path`` goes
    first on ``sys.path`` (the launcher's current directory: where a user's PROBLEM module
    lives); ``seed`` (``None``: unseeded) seeds this process with ``seed + rank``.
    ``result_queue`` (a ``multiprocessing`` ``SimpleQueue``, or ``None``) receives
    ``(rank, worker.stats())`` once the worker's loop ended: how the launcher learns each
    worker's counters (per-op bytes included).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for entry in reversed(import_path):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    seed_everything(None if seed is None else seed + rank)
    logging.basicConfig(level=log_level, format=f"[worker {rank}] %(levelname)s %(message)s")
    logging.captureWarnings(True)  # e.g. solver ConvergenceWarnings, tagged with the rank
    torch.set_num_threads(config.num_threads or 1)
    holder: list[Worker] = []

    def on_sigterm(signum: int, frame: Any) -> None:
        if not holder:  # still starting up: nothing to clean up yet
            raise SystemExit(0)
        holder[0].stop()

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        problem = make_problem(spec, rank, world_size)
        worker = Worker(problem, config)
        holder.append(worker)
        _stop_when_parent_dies(worker)
        final = worker.run(max_iterations=max_iterations)  # closes its socket and thread
        if result_queue is not None:
            result_queue.put((rank, final))
    except ChronosError as e:
        logging.getLogger("chronos.launcher").error("%s", e)
        raise SystemExit(1) from None
    exit_fast()


def exit_fast() -> None:
    """End a spawned worker process at once with code 0 (in-process callers just return).

    Everything the process opened is closed by then. This skips the interpreter's teardown of
    torch / scikit-learn module state: it takes ~1 s per process (2.4 s for 4 workers on 2
    cores), which is most of the time a finished job spends waiting for its workers.
    """
    if mp.parent_process() is None:  # called in-process (not as a spawned worker): return
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


def _stop_when_parent_dies(worker: Worker) -> None:
    """Stop ``worker`` if the launcher process disappears (e.g. it was SIGKILLed)."""
    parent = mp.parent_process()
    sentinel = getattr(parent, "sentinel", None)
    if sentinel is None:
        return

    def watch() -> None:
        mp.connection.wait([sentinel])
        logging.getLogger("chronos.launcher").warning("the launcher is gone; stopping")
        worker.stop()

    threading.Thread(target=watch, name="chronos-parent-watch", daemon=True).start()


@dataclass(frozen=True)
class RunConfig:
    """A local job: coordinator settings, worker settings and how many workers.

    ``straggler_delay`` is either one number for every worker or a tuple with one per worker
    (seconds of injected delay per iteration). ``optimizer`` / ``outer_lr`` ``None``: the
    problem's (``default_outer_optimizer`` / ``default_outer_lr``), else
    :data:`~chronos.distributed.defaults.OUTER_OPTIMIZER` and its step size. ``seed``
    (``None``: unseeded) seeds the launcher with ``seed`` and worker ``rank`` with
    ``seed + rank``. ``max_iterations``: each worker does that many checkout → solve →
    commit rounds, flushes what its error-feedback residual holds, and leaves; the job is
    complete when every worker did (or when ``max_steps`` versions are reached, whichever
    comes first): equal work per worker, for comparisons. ``worker_options``: further
    :class:`~chronos.distributed.worker.WorkerConfig` fields (``codec``, ``max_skip``,
    ``target_rate``, ``local_lr``, ``amortized``...). ``stale_correction``, ``aggregation``: see
    :class:`~chronos.distributed.aggregation.CoordinatorConfig`. ``max_restarts``: how many
    times :func:`run_local` starts a worker again (same rank, same id ``worker-RANK``, same
    settings) after its process died before the job was done (0: never; not with worker
    groups, ``group_size > 1``: a restarted rank cannot rejoin its group's
    ``torch.distributed`` world). ``curve_keys`` (a directory from ``chronos keys generate``):
    CURVE on every connection, worker ``worker-RANK`` with its own key pair
    (``allowed_keys``: another directory of admitted public keys). ``state_dir``: the
    coordinator's state is durable there, and a job started on an existing one resumes from
    it (see :class:`~chronos.distributed.coordinator.Coordinator`). Every other default comes
    from :mod:`~chronos.distributed.defaults`.
    """

    problem: str
    workers: int = 2
    mode: Literal["async", "sync"] = "async"
    max_steps: int = 50
    max_in_flight: int = defaults.MAX_IN_FLIGHT
    max_staleness: int = defaults.MAX_STALENESS
    decay: float = defaults.DECAY
    outer_lr: float | None = None
    optimizer: str | MultiTimescaleConfig | None = None
    min_commits: int | str = defaults.MIN_COMMITS
    lease_timeout: float = defaults.LEASE_TIMEOUT
    heartbeat_interval: float = defaults.HEARTBEAT_INTERVAL
    straggler_delay: float | tuple[float, ...] = 0.0
    inner_steps: int | None = None
    hypergradient: Literal["implicit", "unrolled"] = "implicit"
    unroll_lr: float | None = None  # None: replay the problem's own (SGD/momentum) solve
    significance_threshold: float = 0.0
    stale_correction: bool = False
    aggregation: Literal["latest", "buffered"] = defaults.AGGREGATION
    threads_per_worker: int = 1
    timeout: float = 300.0
    port: int = 0
    seed: int | None = None
    max_iterations: int | None = None
    worker_options: dict[str, Any] = field(default_factory=dict)
    group_size: int = 1
    sync: str = "significance"
    group_hypergradient: str = "cg"
    group_codec: str = "identity"
    max_restarts: int = 0
    curve_keys: str | None = None
    allowed_keys: str | None = None
    state_dir: str | None = None

    def __post_init__(self) -> None:
        if self.allowed_keys is not None and self.curve_keys is None:
            raise ConfigError("allowed_keys (--allowed-keys) needs curve_keys (--curve-keys DIR, "
                              "the coordinator's own keys); make them with `chronos keys "
                              "generate DIR`")
        if not isinstance(self.problem, str):
            raise ConfigError(f"problem must be a 'package.module:factory' str, got "
                              f"{self.problem!r}")
        if not _is_int(self.workers) or self.workers < 1:
            raise ConfigError(f"workers must be an int >= 1, got {self.workers!r}")
        if self.mode not in ("async", "sync"):
            raise ConfigError(f"mode must be 'async' or 'sync', got {self.mode!r}")
        if not _is_int(self.max_steps) or self.max_steps < 1:
            raise ConfigError(f"max_steps must be an int >= 1, got {self.max_steps!r}")
        if not _is_int(self.threads_per_worker) or self.threads_per_worker < 1:
            raise ConfigError(
                f"threads_per_worker must be an int >= 1, got {self.threads_per_worker!r}"
            )
        if not (isinstance(self.timeout, (int, float)) and self.timeout > 0):
            raise ConfigError(f"timeout must be > 0 seconds, got {self.timeout!r}")
        it = self.max_iterations
        if it is not None and (not _is_int(it) or it < 1):
            raise ConfigError(f"max_iterations must be an int >= 1 or None, got {it!r}")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise ConfigError(f"seed must be an int >= 0 or None, got {self.seed!r}")
        mc = self.min_commits
        if mc != "auto" and (not _is_int(mc) or int(mc) < 1):
            raise ConfigError(f"min_commits must be an int >= 1 or 'auto', got {mc!r}")
        self.straggler_delays()  # validates
        g = self.group_size
        if not _is_int(g) or g < 1 or self.workers % g:
            raise ConfigError(
                f"group_size must be an int >= 1 that divides workers={self.workers}, got {g!r} "
                "(workers counts every process: workers=4, group_size=2 is two groups of two)"
            )
        self.group_settings()  # validates sync / group_hypergradient / group_codec
        if not _is_int(self.max_restarts) or self.max_restarts < 0:
            raise ConfigError(f"max_restarts must be an int >= 0, got {self.max_restarts!r}")
        if g > 1 and self.max_restarts:
            raise ConfigError(
                f"max_restarts={self.max_restarts} needs group_size=1: a restarted process "
                "cannot rejoin its worker group's torch.distributed world; drop the restarts "
                "(chronos run --restart-workers / --max-restarts) or the worker groups"
            )
        if g > 1 and (self.hypergradient != "implicit" or self.worker_options.get("amortized")):
            raise ConfigError(
                "a worker group computes implicit hypergradients (distributed CG) and solves "
                "from its previous θ; drop hypergradient='unrolled' / amortized=True, or use "
                "group_size=1"
            )

    @property
    def num_groups(self) -> int:
        """Coordinator workers: one per group (``workers // group_size``)."""
        return self.workers // self.group_size

    def group_settings(self) -> GroupSettings:
        """How each worker group solves (``group_size > 1``)."""
        return GroupSettings(policy=SyncPolicy.parse(self.sync, codec=self.group_codec),
                             method=self.group_hypergradient, inner_steps=self.inner_steps,
                             control_timeout=max(60.0, self.timeout))

    def straggler_delays(self) -> tuple[float, ...]:
        """One injected delay per worker."""
        d = self.straggler_delay
        try:
            delays = (float(d),) * self.workers if isinstance(d, (int, float)) else tuple(
                float(x) for x in d)
        except (TypeError, ValueError):
            delays = ()
        if len(delays) != self.workers or not all(0 <= x < math.inf for x in delays):
            raise ConfigError(
                f"straggler_delay must be one number >= 0 or {self.workers} of them, got {d!r}"
            )
        return delays


@dataclass(frozen=True)
class RunResult:
    """What a local job did. ``stats``: the coordinator's; ``worker_stats``: each worker's
    final :meth:`~chronos.distributed.worker.Worker.stats` by worker id (workers that exited
    cleanly; a killed or failed one is missing). ``worker_restarts``: how many times each
    restarted worker was started again (by worker id; workers never restarted are left out).
    A restarted worker's ``worker_stats`` and ``worker_exitcodes`` entry are those of its last
    process (the earlier ones died without reporting; the coordinator's ``stats["workers"]``
    counts every process under the same id)."""

    outer_params: dict[str, torch.Tensor]
    version: int
    wall_time: float
    stats: dict[str, Any]
    history: list[dict[str, Any]]
    worker_exitcodes: tuple[int | None, ...]
    completed: bool
    interrupted: bool = False
    worker_stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    worker_restarts: dict[str, int] = field(default_factory=dict)

    def bytes_by_op(self) -> dict[str, dict[str, dict[str, int]]]:
        """Per-op wire counters: ``{"coordinator": {op: {...}}, "workers": {op: {...}}}``
        (the workers' summed with :func:`~chronos.communication.accounting.merge_by_op`;
        each op has ``sent``, ``received``, ``messages_sent``, ``messages_received``), and with
        worker groups ``"collective"``: every rank's ``torch.distributed`` payload bytes
        (:mod:`~chronos.distributed.group`)."""
        out = {
            "coordinator": dict(self.stats.get("bytes_by_op", {})),
            "workers": merge_by_op(s.get("bytes_by_op", {}) for s in self.worker_stats.values()),
        }
        groups = [s["group"] for s in self.worker_stats.values() if "group" in s]
        if groups:
            out["collective"] = merge_by_op(g.get("collective_bytes_by_op", {}) for g in groups)
        return out

    def summary(self) -> dict[str, Any]:
        """JSON-friendly summary (λ as lists), with ``bytes_by_op`` (:meth:`bytes_by_op`),
        ``worker_stats`` and ``worker_restarts``."""
        return {
            "version": self.version,
            "wall_time_s": self.wall_time,
            "completed": self.completed,
            "interrupted": self.interrupted,
            "outer_params": {k: v.tolist() for k, v in self.outer_params.items()},
            "stats": self.stats,
            "bytes_by_op": self.bytes_by_op(),
            "worker_stats": self.worker_stats,
            "worker_exitcodes": list(self.worker_exitcodes),
            "worker_restarts": dict(self.worker_restarts),
        }


def format_bytes_by_op(result: RunResult) -> list[str]:
    """One line per side (coordinator, workers) of per-op bytes, for a printed summary:
    ``op sent/received`` with the biggest ops first."""
    lines = []
    for side, by_op in result.bytes_by_op().items():
        if not by_op:
            continue
        ordered = sorted(by_op.items(), key=lambda kv: -(kv[1]["sent"] + kv[1]["received"]))
        shown = ", ".join(f"{op} {c['sent']}/{c['received']}" for op, c in ordered)
        lines.append(f"  bytes by op, {side} (sent/received): {shown}")
    return lines


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped :func:`run_local`; ``result`` is what the job had done (every process
    already stopped). A ``KeyboardInterrupt``, so code that does not care sees the usual one."""

    def __init__(self, result: RunResult) -> None:
        super().__init__("interrupted")
        self.result = result


def run_local(
    cfg: RunConfig,
    progress: Callable[[dict[str, Any]], None] | None = None,
    progress_interval: float = 1.0,
    *,
    track_outer_params: bool = False,
    on_start: Callable[[str], None] | None = None,
) -> RunResult:
    """Start the coordinator and ``cfg.workers`` worker processes; run until done.

    ``progress`` (if given) is called about every ``progress_interval`` seconds with the
    coordinator's :meth:`~Coordinator.stats` plus ``outer_loss`` (the mean over the last
    ``workers`` steps: each step's loss comes from one worker's shard), ``elapsed_s``,
    ``commits_per_s`` (accepted), ``workers_running``, ``worker_pids`` (one per rank: the pid
    of its running process, ``None`` while it has none: exited, or waiting to be restarted)
    and ``worker_restarts`` (as in :class:`RunResult`); with ``track_outer_params`` also
    ``outer_params``, a copy of λ at that moment (for benchmarks that trace λ over time).
    ``on_start`` (if given) is called once with the coordinator's address (``tcp://HOST:PORT``)
    as soon as it is bound, before the workers start: where more workers can attach.

    Restarts (``cfg.max_restarts`` > 0): a worker process that exits with a non-zero code (or
    is killed by a signal) while the job is not done is started again with the same rank, id
    and settings, at most ``max_restarts`` times per worker; each restart is logged as a
    warning. The new process starts once the coordinator has let go of the dead one's id (it
    expired or was noticed gone; at the latest ``lease_timeout`` + 2 s after the death), since
    a live id cannot register twice. A worker whose restarts are spent is left dead, as
    without restarts. A restarted worker does ``max_iterations`` rounds afresh.

    Returns when the coordinator reached ``max_steps`` (``completed``), every worker process
    exited (none waiting for a restart), or ``timeout`` passed. Ctrl-C raises
    :class:`RunInterrupted` (with the partial result), but only after every worker process was
    stopped; a Ctrl-C before the coordinator started raises a plain ``KeyboardInterrupt``.
    Every process started here is stopped (ShutdownNotice, then SIGTERM, then SIGKILL) before
    this returns or raises.
    """
    import_path = (add_cwd_to_path(),)
    seed_everything(cfg.seed)
    problem = make_problem(cfg.problem, 0, cfg.workers)
    outer0 = initial_outer_params(problem, cfg.problem)
    settings = coordinator_settings(cfg.optimizer, cfg.outer_lr, cfg.min_commits, problem)
    grouped = cfg.group_size > 1
    if grouped:
        check_group_problem(problem)  # an L-BFGS problem or no λ structure fails here
    base = WorkerConfig(**{
        "inner_steps": cfg.inner_steps, "hypergradient": cfg.hypergradient,
        "unroll_lr": cfg.unroll_lr,
        "significance_threshold": cfg.significance_threshold,
        "num_threads": cfg.threads_per_worker,
        "connect_timeout": max(30.0, cfg.lease_timeout),
        **cfg.worker_options,
    })
    unroll_momentum(problem, base)  # an unrolled hypergradient it cannot replay fails here
    del problem
    ring = None if cfg.curve_keys is None else load_coordinator_keys(cfg.curve_keys,
                                                                     cfg.allowed_keys)
    worker_curves = [None if cfg.curve_keys is None else
                     load_worker_keys(cfg.curve_keys, f"worker-{rank}")
                     for rank in range(cfg.workers)]  # a missing key fails here, at once
    coordinator = make_coordinator(
        outer0, settings, port=cfg.port, mode=cfg.mode, num_workers=cfg.num_groups,
        max_in_flight=cfg.max_in_flight, max_staleness=cfg.max_staleness, decay=cfg.decay,
        max_steps=cfg.max_steps, lease_timeout=cfg.lease_timeout,
        heartbeat_interval=cfg.heartbeat_interval, stale_correction=cfg.stale_correction,
        aggregation=cfg.aggregation, state_dir=cfg.state_dir,
        curve=None if ring is None else ring.server,
        key_names=None if ring is None else ring.key_names,
    )
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()  # (rank, final worker stats) from each worker that ends cleanly
    worker_stats: dict[int, dict[str, Any]] = {}

    def collect() -> None:
        while not results.empty():
            rank, final = results.get()
            worker_stats[int(rank)] = final  # a restarted rank: its last process's

    procs: list[Any] = []
    delays = cfg.straggler_delays()
    ports: list[int] = []

    def spawn(rank: int) -> None:
        """Start worker ``rank``'s process (again) and put it in ``procs[rank]``."""
        wcfg = replace(base, coordinator_addr=coordinator.address,
                       worker_id=f"worker-{rank}", straggler_delay=delays[rank],
                       curve=worker_curves[rank])
        target: Callable[..., None] = worker_main
        args: tuple[Any, ...] = (cfg.problem, rank, cfg.workers, wcfg)
        if grouped:
            g = cfg.group_size
            gspec = GroupSpec(rank=rank % g, world_size=g, port=ports[rank // g],
                              timeout=max(30.0, cfg.lease_timeout))
            target = group_main
            settings_g = replace(cfg.group_settings(), max_iter=base.max_iter, tol=base.tol,
                                 damping=base.damping, warm_start=base.warm_start)
            args = (cfg.problem, rank, cfg.workers, gspec, settings_g, wcfg)
        p = ctx.Process(target=target, args=args,
                        kwargs={"import_path": import_path, "seed": cfg.seed,
                                "result_queue": results,
                                "max_iterations": cfg.max_iterations},
                        name=f"chronos-worker-{rank}", daemon=True)
        # the child inherits SIG_IGN: Ctrl-C is the launcher's to handle (ignored only
        # for the few ms of the start itself, so a Ctrl-C between starts is seen)
        with _sigint_ignored():
            p.start()
            if rank < len(procs):
                procs[rank] = p
            else:
                procs.append(p)

    restartable = cfg.max_restarts > 0 and not grouped  # RunConfig refuses groups + restarts
    restarts: dict[int, int] = {}  # rank -> processes started after the first
    pending: dict[int, float] = {}  # rank -> restart it at the latest then (perf_counter)
    t0 = time.perf_counter()
    completed = False
    interrupted = False
    try:
        coordinator.start()
        if on_start is not None:
            on_start(coordinator.address)
        if grouped:
            ports = [free_port() for _ in range(cfg.num_groups)]
        for rank in range(cfg.workers):
            spawn(rank)
        deadline = t0 + cfg.timeout
        next_report = t0
        failed: set[int] = set()
        while True:
            collect()
            if coordinator.wait(timeout=0.1):
                completed = coordinator.version >= cfg.max_steps
                break
            now = time.perf_counter()
            if progress is not None and now >= next_report:
                progress(_progress_stats(coordinator, now - t0, procs, track_outer_params,
                                         restarts))
                next_report = now + progress_interval
            for rank, p in enumerate(procs):
                if rank in failed or rank in pending or p.exitcode in (None, 0):
                    continue
                used = restarts.get(rank, 0)
                if restartable and used < cfg.max_restarts:
                    log.warning("worker %d exited with code %s; restarting it (restart %d of "
                                "%d)", rank, p.exitcode, used + 1, cfg.max_restarts)
                    pending[rank] = now + cfg.lease_timeout + 2.0
                    continue
                failed.add(rank)
                if restartable:
                    log.error("worker %d exited with code %s; not restarting it: its %d "
                              "restarts are spent", rank, p.exitcode, cfg.max_restarts)
                else:
                    log.error("worker %d exited with code %s", rank, p.exitcode)
            if pending:
                alive = _registered_workers(coordinator)
                for rank, latest in sorted(pending.items()):
                    if f"worker-{rank}" in alive and now < latest:
                        continue  # its id is still taken: a Register now would be refused
                    del pending[rank]
                    restarts[rank] = restarts.get(rank, 0) + 1
                    spawn(rank)
            if not pending and all(not p.is_alive() for p in procs):
                if cfg.max_iterations is not None and all(p.exitcode == 0 for p in procs):
                    completed = True  # every worker did its max_iterations rounds
                else:
                    log.error("every worker process exited before the job finished")
                break
            if now >= deadline:
                log.error("job timed out after %.0f s at version %d", cfg.timeout,
                          coordinator.version)
                break
        if progress is not None:
            progress(_progress_stats(coordinator, time.perf_counter() - t0, procs,
                                     track_outer_params, restarts))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        wall = time.perf_counter() - t0
        with _sigint_ignored():  # a second Ctrl-C must not leave orphans behind
            coordinator.stop()  # tells every registered worker to shut down
            codes = _join_all(procs, grace=2.0 if interrupted else 3.0, drain=collect)
            collect()
            results.close()
    result = RunResult(
        outer_params=coordinator.outer_params,
        version=coordinator.version,
        wall_time=wall,
        stats=coordinator.stats(),
        history=coordinator.history,
        worker_exitcodes=codes,
        completed=completed,
        interrupted=interrupted,
        worker_stats={f"worker-{r}": worker_stats[r] for r in sorted(worker_stats)},
        worker_restarts={f"worker-{r}": n for r, n in sorted(restarts.items())},
    )
    if interrupted:
        raise RunInterrupted(result)
    return result


def _registered_workers(coordinator: Coordinator) -> set[str]:
    """Worker ids the coordinator holds as alive (registered, not yet expired or gone)."""
    workers = coordinator.stats().get("workers")
    if not isinstance(workers, dict):
        return set()
    return {w for w, rec in workers.items() if not isinstance(rec, dict) or rec.get("alive")}


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ignore SIGINT inside the block (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _progress_stats(
    coordinator: Coordinator, elapsed: float, procs: list[Any], with_params: bool = False,
    restarts: dict[int, int] | None = None,
) -> dict[str, Any]:
    s = coordinator.stats()
    if with_params:
        s["outer_params"] = coordinator.outer_params
    losses = outer_losses(coordinator.history)
    window = losses[-max(1, len(procs)):]  # one step per worker: smooths over their shards
    s["outer_loss"] = sum(window) / len(window) if window else float("nan")
    s["elapsed_s"] = elapsed
    s["commits_per_s"] = s.get("commits_accepted", 0) / elapsed if elapsed > 0 else 0.0
    alive = [p.is_alive() for p in procs]
    s["workers_running"] = sum(alive)
    s["worker_pids"] = [p.pid if a else None for p, a in zip(procs, alive, strict=True)]
    s["worker_restarts"] = {f"worker-{r}": n for r, n in sorted((restarts or {}).items())}
    return s


def outer_losses(history: list[dict[str, Any]]) -> list[float]:
    """The (worker-reported, mean per step) outer loss of every step that has one."""
    return [float(h["outer_loss"]) for h in history
            if isinstance(h.get("outer_loss"), (int, float)) and math.isfinite(h["outer_loss"])]


def _join_all(
    procs: list[Any], grace: float, drain: Callable[[], None] | None = None
) -> tuple[int | None, ...]:
    """Wait up to ``grace`` s for every process; SIGTERM (a clean stop), then SIGKILL, the rest.
    ``drain`` is called while waiting (it empties the result queue, so that no worker blocks
    on a full pipe while it reports its stats)."""
    deadline = time.monotonic() + grace
    while True:
        if drain is not None:
            drain()
        waiting = [p for p in procs if p.is_alive()]
        left = deadline - time.monotonic()
        if not waiting or left <= 0:
            break
        waiting[0].join(min(0.05, left))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.terminate()
    deadline = time.monotonic() + 3.0
    for p in alive:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            log.warning("worker process %s did not stop on SIGTERM; killing it", p.pid)
            p.kill()
            p.join(2.0)
    return tuple(p.exitcode for p in procs)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def config_dict(cfg: RunConfig) -> dict[str, Any]:
    """``asdict`` with tuples as lists (for JSON reports)."""
    out = asdict(cfg)
    out["straggler_delay"] = list(cfg.straggler_delays())
    out["pid"] = os.getpid()
    return out

