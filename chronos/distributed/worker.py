"""The worker: checkout → inner solve → hypergradient → commit, against a coordinator.

A worker talks to the coordinator through one ZeroMQ DEALER socket owned by a background
*network thread*. The thread sends what the compute thread queues, routes replies to whoever
waits for that request id, and sends heartbeats every ``heartbeat_interval`` seconds — so the
lease stays alive while a long inner solve runs. The compute thread (the caller of
:meth:`Worker.run`) loops:

1. ``Checkout(have_version)``: ``granted`` (new λ), ``not_modified`` (λ unchanged: no tensors
   resent) or ``deferred`` (the version window is full: keep waiting for the grant that follows
   with the same request id).
2. ``inner_problem.solve(λ)`` (warm-started from the previous θ), then the hypergradient on
   the worker's own data: implicit (CG by default, warm-started from the previous linear-system
   solution) or unrolled.
3. Optional significance filter: a hypergradient whose ‖g‖/‖λ‖ is below
   ``significance_threshold`` is held back in an error-feedback residual instead of sent.
4. ``Commit(version, hypergradient, commit_id)``; a reply that does not come within
   ``request_timeout`` is re-sent with the *same* commit id (applied once).

When the coordinator goes away, requests time out and the worker re-registers with exponential
backoff (ZeroMQ reconnects the socket) until ``connect_timeout``. A :class:`ShutdownNotice`
ends :meth:`Worker.run`.

Example (see ``examples/`` and ``chronos run`` for complete jobs):
    >>> cfg = WorkerConfig(coordinator_addr="tcp://127.0.0.1:5555", significance_threshold=0.0)
    >>> cfg.hypergradient, cfg.method
    ('implicit', 'cg')
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from chronos.communication.significance import SignificanceConfig, SignificanceFilter
from chronos.core.errors import ChronosError, ConfigError
from chronos.core.problem import InnerProblem
from chronos.core.tensordict import TensorDict
from chronos.distributed.messages import (
    Checkout,
    CheckoutReply,
    Commit,
    CommitReply,
    Deregister,
    ErrorReply,
    Heartbeat,
    Message,
    Register,
    Registered,
    ShutdownNotice,
)
from chronos.distributed.protocol import DecodeError
from chronos.distributed.transport import ClientTransport, CurveClientConfig
from chronos.solver import implicit_hypergradient, unrolled_hypergradient

__all__ = ["Worker", "WorkerConfig", "WorkerStopped"]

log = logging.getLogger("chronos.worker")


class WorkerStopped(ChronosError):
    """Raised inside the worker loop when it is told to stop (caught by :meth:`Worker.run`)."""


@dataclass(frozen=True)
class WorkerConfig:
    """How a worker runs.

    Args:
        coordinator_addr: ``tcp://host:port`` of the coordinator.
        worker_id: unique name (default: ``host-pid-random``).
        inner_steps: inner solver steps per checkout (default: the problem's own).
        hypergradient: ``"implicit"`` or ``"unrolled"``.
        method, max_iter, tol, damping: the implicit linear solve.
        unroll_steps, unroll_lr, truncate: the unrolled hypergradient.
        warm_start: start each inner solve from the previous θ and each linear solve from the
            previous solution.
        significance_threshold: hold back hypergradients with ‖g‖/‖λ‖ at or below this
            (0: send every one).
        heartbeat_interval: seconds between heartbeats (default: the coordinator's).
        request_timeout: seconds to wait for a reply before re-sending.
        connect_timeout: give up after this many seconds without reaching the coordinator.
        straggler_delay: extra seconds of (simulated) work per iteration, for experiments.
        num_threads: ``torch.set_num_threads`` for this worker (None: leave as is).
        curve: CURVE client keys when the coordinator uses CURVE.
    """

    coordinator_addr: str = "tcp://127.0.0.1:5555"
    worker_id: str | None = None
    inner_steps: int | None = None
    hypergradient: Literal["implicit", "unrolled"] = "implicit"
    method: str = "cg"
    max_iter: int = 100
    tol: float = 1e-10
    damping: float = 0.0
    unroll_steps: int = 20
    unroll_lr: float | str = 0.1
    truncate: int | None = None
    warm_start: bool = True
    significance_threshold: float = 0.0
    heartbeat_interval: float | None = None
    request_timeout: float = 10.0
    connect_timeout: float = 60.0
    straggler_delay: float = 0.0
    num_threads: int | None = None
    curve: CurveClientConfig | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.coordinator_addr, str) or not self.coordinator_addr.startswith(
            "tcp://"
        ):
            raise ConfigError(
                f"coordinator_addr must look like 'tcp://127.0.0.1:5555', "
                f"got {self.coordinator_addr!r}"
            )
        if self.worker_id is not None and (
            not isinstance(self.worker_id, str) or not 0 < len(self.worker_id.encode()) <= 200
        ):
            raise ConfigError(f"worker_id must be a non-empty str (<= 200 bytes), got "
                              f"{self.worker_id!r}")
        if self.hypergradient not in ("implicit", "unrolled"):
            raise ConfigError(
                f"hypergradient must be 'implicit' or 'unrolled', got {self.hypergradient!r}"
            )
        if self.inner_steps is not None and self.inner_steps < 1:
            raise ConfigError(f"inner_steps must be >= 1 or None, got {self.inner_steps}")
        if self.significance_threshold < 0 or not math.isfinite(self.significance_threshold):
            raise ConfigError(
                f"significance_threshold must be a finite number >= 0, "
                f"got {self.significance_threshold}"
            )
        for name in ("request_timeout", "connect_timeout"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0):
                raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.heartbeat_interval is not None and not self.heartbeat_interval > 0:
            raise ConfigError(f"heartbeat_interval must be > 0 or None, got "
                              f"{self.heartbeat_interval}")
        if self.straggler_delay < 0:
            raise ConfigError(f"straggler_delay must be >= 0, got {self.straggler_delay}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"num_threads must be >= 1 or None, got {self.num_threads}")


def _default_worker_id() -> str:
    return f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class _Network:
    """The network thread: owns the DEALER socket; routes replies by request id."""

    def __init__(self, address: str, worker_id: str, curve: CurveClientConfig | None) -> None:
        self.address = address
        self.worker_id = worker_id
        self.curve = curve
        self.outbox: queue.Queue[Message] = queue.Queue()
        self.waiters: dict[int, queue.Queue[Message]] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.shutdown = threading.Event()
        self.shutdown_reason = ""
        self.heartbeat_interval: float | None = None
        self.counters = {"bytes_sent": 0, "bytes_received": 0, "messages_sent": 0,
                         "messages_received": 0, "heartbeats": 0, "decode_errors": 0}
        self._ids = itertools.count(1)
        self._ids_lock = threading.Lock()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"chronos-net-{worker_id}",
                                       daemon=True)

    def next_id(self) -> int:
        with self._ids_lock:
            return next(self._ids)

    def start(self) -> None:
        self.thread.start()
        self.ready.wait(10.0)
        if self.error is not None:
            raise self.error

    def stop(self, timeout: float = 5.0) -> None:
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(timeout)

    @contextlib.contextmanager
    def waiting(self, request_id: int) -> Iterator[queue.Queue[Message]]:
        q: queue.Queue[Message] = queue.Queue()
        with self.lock:
            self.waiters[request_id] = q
        try:
            yield q
        finally:
            with self.lock:
                self.waiters.pop(request_id, None)

    def _run(self) -> None:
        try:
            transport = ClientTransport(self.address, identity=self.worker_id.encode("utf-8"),
                                        curve=self.curve)
        except BaseException as e:
            self.error = e
            self.ready.set()
            return
        self.ready.set()
        next_beat = time.monotonic()
        try:
            while not self.stopping.is_set():
                while True:
                    try:
                        msg = self.outbox.get_nowait()
                    except queue.Empty:
                        break
                    transport.send_message(msg)
                interval = self.heartbeat_interval
                now = time.monotonic()
                if interval is not None and now >= next_beat:
                    transport.send_message(Heartbeat(request_id=self.next_id(),
                                                     worker_id=self.worker_id))
                    self.counters["heartbeats"] += 1
                    next_beat = now + interval
                try:
                    reply = transport.recv_message(timeout_ms=10)
                except DecodeError as e:
                    self.counters["decode_errors"] += 1
                    log.warning("dropped an invalid message from the coordinator: %s", e)
                    continue
                if reply is not None:
                    self._route(reply)
                self.counters.update({k: v for k, v in transport.stats().items()
                                      if k in self.counters})
        finally:
            # best effort: leave the job so our lease does not hold the window until it expires
            with contextlib.suppress(Exception):
                transport.send_message(Deregister(request_id=self.next_id(),
                                                  worker_id=self.worker_id))
            transport.close()

    def _route(self, msg: Message) -> None:
        if isinstance(msg, ShutdownNotice):
            self.shutdown_reason = msg.reason
            self.shutdown.set()
        with self.lock:
            if isinstance(msg, ShutdownNotice):
                targets = list(self.waiters.values())
            else:
                q = self.waiters.get(msg.request_id)
                targets = [] if q is None else [q]
        for q in targets:
            q.put(msg)


class Worker:
    """Runs checkout → solve → hypergradient → commit against a :class:`~.Coordinator`.

    Args:
        inner_problem: the :class:`~chronos.core.InnerProblem` on this worker's data.
        config: a :class:`WorkerConfig`.
    """

    def __init__(self, inner_problem: InnerProblem, config: WorkerConfig | None = None) -> None:
        if not isinstance(inner_problem, InnerProblem):
            raise ConfigError(
                f"inner_problem must be an InnerProblem, got {type(inner_problem).__name__}; "
                "build one with InnerProblem.from_functions(...) or subclass it"
            )
        self.problem = inner_problem
        self.config = config or WorkerConfig()
        self.worker_id = self.config.worker_id or _default_worker_id()
        self._net: _Network | None = None
        self._stop = threading.Event()
        self._outer: TensorDict | None = None
        self._version = -1
        self._theta: TensorDict | None = None
        self._solution: TensorDict | None = None
        self._filter = (
            SignificanceFilter(SignificanceConfig(threshold=self.config.significance_threshold))
            if self.config.significance_threshold > 0 else None
        )
        self._commit_seq = itertools.count(1)
        self._stats: dict[str, float] = {
            "iterations": 0, "commits_accepted": 0, "commits_rejected": 0,
            "commits_duplicate": 0, "commits_skipped": 0, "checkouts_deferred": 0,
            "checkouts_not_modified": 0, "reconnects": 0, "solve_seconds": 0.0,
            "hypergrad_seconds": 0.0, "linear_iterations": 0,
        }
        self.last_metrics: dict[str, float] = {}
        self.commit_log: list[CommitReply] = []  # every commit reply, in order

    # -- lifecycle ---------------------------------------------------------------------------

    def connect(self) -> Worker:
        """Open the socket, start the network thread and register (with retries)."""
        if self.config.num_threads is not None:
            torch.set_num_threads(self.config.num_threads)
        if self._net is None:
            self._net = _Network(self.config.coordinator_addr, self.worker_id, self.config.curve)
            self._net.start()
        self._register()
        return self

    def stop(self) -> None:
        """Ask the loop to finish its current step and leave (idempotent, thread-safe)."""
        self._stop.set()

    def close(self) -> None:
        """Stop and close the socket (deregisters, best effort)."""
        self._stop.set()
        if self._net is not None:
            self._net.stop()

    def __enter__(self) -> Worker:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> dict[str, float]:
        """Counters of this worker: iterations, commits by outcome, bytes, timings."""
        out = dict(self._stats)
        if self._net is not None:
            out.update(self._net.counters)
        out["version"] = self._version
        return out

    def run(self, max_iterations: int | None = None) -> dict[str, float]:
        """Loop until shut down, stopped, or ``max_iterations`` commits were attempted.

        Returns :meth:`stats`. Raises :class:`ChronosError` if the coordinator stays
        unreachable for ``connect_timeout`` seconds.
        """
        if self._net is None:
            self.connect()
        try:
            while not self._stop.is_set():
                if max_iterations is not None and self._stats["iterations"] >= max_iterations:
                    break
                self.step()
        except WorkerStopped:
            pass
        finally:
            self.close()
        return self.stats()

    # -- one iteration -----------------------------------------------------------------------

    def step(self) -> None:
        """One checkout → solve → hypergradient → commit."""
        version, outer = self._checkout()
        cfg = self.config
        t0 = time.perf_counter()
        init = self._theta if (cfg.warm_start and self._theta is not None) else None
        theta, traj = self.problem.solve(outer, init_params=init, num_steps=cfg.inner_steps,
                                         version=version, worker_id=self.worker_id)
        if cfg.straggler_delay > 0:
            self._stop.wait(cfg.straggler_delay)  # injected slowness, interruptible
        t1 = time.perf_counter()
        grad, metrics = self._hypergradient(theta, outer)
        t2 = time.perf_counter()
        self._theta = theta
        self._stats["iterations"] += 1
        self._stats["solve_seconds"] += t1 - t0
        self._stats["hypergrad_seconds"] += t2 - t1
        metrics.update(inner_loss=traj.final_loss or math.nan, inner_steps=traj.num_steps,
                       solve_seconds=t1 - t0)
        self.last_metrics = metrics
        if self._filter is not None:
            held = self._filter.update(grad, outer)
            if held is None:
                self._stats["commits_skipped"] += 1
                return
            grad = held
        self._commit(version, grad, metrics)

    def _hypergradient(self, theta: TensorDict, outer: TensorDict) -> tuple[TensorDict,
                                                                             dict[str, float]]:
        cfg, prob = self.config, self.problem

        def inner(p: TensorDict, h: TensorDict) -> torch.Tensor:
            return prob.inner_loss(p, h)

        def outer_fn(p: TensorDict, h: TensorDict) -> torch.Tensor:
            return prob.outer_loss(p, h)

        if cfg.hypergradient == "implicit":
            init = self._solution if cfg.warm_start else None
            grad, info = implicit_hypergradient(
                inner, outer_fn, theta, outer, method=cfg.method, max_iter=cfg.max_iter,
                tol=cfg.tol, damping=cfg.damping, init=init, return_info=True,
            )
            self._solution = info.solution
            self._stats["linear_iterations"] += info.iterations
            return grad, {"outer_loss": info.outer_loss, "linear_iterations": info.iterations}
        start = self.problem.init_params()
        grad, uinfo = unrolled_hypergradient(
            inner, outer_fn, start, outer, steps=cfg.unroll_steps, lr=cfg.unroll_lr,
            truncate=cfg.truncate, return_info=True,
        )
        return grad, {"outer_loss": float(getattr(uinfo, "outer_loss", math.nan))}

    # -- requests ----------------------------------------------------------------------------

    def _request(self, make: Any, *, allow_deferred: bool = False) -> Message:
        """Send ``make(request_id)`` and return its reply, re-sending on timeouts and
        re-registering (with backoff) when the coordinator lost track of us."""
        net = self._require_net()
        deadline = time.monotonic() + self.config.connect_timeout
        backoff = 0.1
        msg = make(net.next_id())
        while True:
            with net.waiting(msg.request_id) as replies:
                net.outbox.put(msg)
                reply = self._await(replies, allow_deferred)
            if reply is None:  # timed out: the coordinator may be gone or restarted
                if time.monotonic() >= deadline:
                    raise ChronosError(
                        f"coordinator at {self.config.coordinator_addr} did not answer for "
                        f"{self.config.connect_timeout:.0f} s; is it running? (chronos "
                        "coordinator --port ...)"
                    )
                self._stats["reconnects"] += 1
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                if not isinstance(msg, Register):
                    self._register()
                msg = _with_request_id(msg, net.next_id())
                continue
            if isinstance(reply, ShutdownNotice):
                raise WorkerStopped(reply.reason)
            if isinstance(reply, ErrorReply) and reply.code == "unknown_worker" and not isinstance(
                msg, Register
            ):
                self._stats["reconnects"] += 1
                self._register()
                msg = _with_request_id(msg, net.next_id())
                continue
            return reply

    def _await(self, replies: queue.Queue[Message], allow_deferred: bool) -> Message | None:
        timeout = self.config.request_timeout
        while True:
            if self._stop.is_set():
                raise WorkerStopped("stopped")
            try:
                reply = replies.get(timeout=min(timeout, 0.1))
            except queue.Empty:
                timeout -= 0.1
                if timeout <= 0:
                    return None
                continue
            if (allow_deferred and isinstance(reply, CheckoutReply)
                    and reply.status == "deferred"):
                self._stats["checkouts_deferred"] += 1
                timeout = max(self.config.request_timeout, 3 * self._lease_hint())
                continue  # the grant follows with the same request id
            return reply

    def _lease_hint(self) -> float:
        net = self._require_net()
        return 3.0 * (net.heartbeat_interval or 1.0)

    def _register(self) -> None:
        net = self._require_net()
        info: dict[str, Any] = {"pid": os.getpid(), "host": os.uname().nodename}
        reply = self._request(lambda rid: Register(request_id=rid, worker_id=self.worker_id,
                                                   info=info))
        if isinstance(reply, ErrorReply) and reply.code == "duplicate_worker":
            # our previous registration is still alive (e.g. after a lost reply): take it over
            net.outbox.put(Deregister(request_id=net.next_id(), worker_id=self.worker_id))
            reply = self._request(lambda rid: Register(request_id=rid, worker_id=self.worker_id,
                                                       info=info))
        if not isinstance(reply, Registered):
            raise ChronosError(f"registration refused: {_describe(reply)}")
        interval = self.config.heartbeat_interval or reply.config.get("heartbeat_interval")
        net.heartbeat_interval = float(interval) if isinstance(interval, (int, float)) else 1.0
        self._version = -1 if self._outer is None else self._version

    def _checkout(self) -> tuple[int, TensorDict]:
        have = self._version if self._outer is not None else -1
        reply = self._request(
            lambda rid: Checkout(request_id=rid, worker_id=self.worker_id, have_version=have),
            allow_deferred=True,
        )
        if not isinstance(reply, CheckoutReply):
            raise ChronosError(f"checkout refused: {_describe(reply)}")
        if reply.status == "not_modified" and self._outer is not None:
            self._stats["checkouts_not_modified"] += 1
        else:
            self._outer = {k: v.clone() for k, v in reply.outer_params.items()}
        self._version = reply.version
        assert self._outer is not None
        return reply.version, self._outer

    def _commit(self, version: int, grad: TensorDict, metrics: dict[str, float]) -> None:
        commit_id = f"{self.worker_id}-{next(self._commit_seq)}"
        payload = {k: v.detach().contiguous() for k, v in grad.items()}
        clean = {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}
        reply = self._request(lambda rid: Commit(
            request_id=rid, worker_id=self.worker_id, version=version, commit_id=commit_id,
            hypergradient=payload, metrics=clean,
        ))
        if isinstance(reply, CommitReply):
            self.commit_log.append(reply)
            key = {"accepted": "commits_accepted", "rejected": "commits_rejected",
                   "duplicate": "commits_duplicate"}[reply.status]
            self._stats[key] += 1
            if reply.status == "rejected":
                log.info("%s: commit on version %d rejected: %s", self.worker_id, version,
                         reply.reason)
            return
        raise ChronosError(f"commit refused: {_describe(reply)}")

    def _require_net(self) -> _Network:
        if self._net is None:
            raise ChronosError("the worker is not connected; call connect() first")
        if self._net.shutdown.is_set():
            raise WorkerStopped(self._net.shutdown_reason)
        return self._net


def _with_request_id(msg: Message, request_id: int) -> Message:
    return replace(msg, request_id=request_id)


def _describe(reply: Message) -> str:
    if isinstance(reply, ErrorReply):
        return f"{reply.code}: {reply.message}"
    return f"unexpected {reply.op} reply"

