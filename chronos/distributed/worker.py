"""The worker: checkout → inner solve → hypergradient → commit, against a coordinator.

A worker talks to the coordinator through one ZeroMQ DEALER socket owned by a background
*network thread*. That thread sends what the compute thread queues, routes each reply to the
request id that waits for it, and sends a heartbeat every ``heartbeat_interval`` seconds, so the
lease stays alive however long an inner solve runs. The compute thread (the caller of
:meth:`Worker.run`) loops over :meth:`Worker.step`:

1. ``Checkout(have_version)``, answered ``granted`` (new λ), ``not_modified`` (λ unchanged: no
   tensors resent, the cached λ is reused) or ``deferred`` (the version window is full; the
   grant follows later with the *same* request id, and the worker waits for it as long as the
   coordinator is alive).
2. ``inner_problem.solve(λ)`` (warm-started from the previous θ), then the hypergradient on the
   worker's own data: implicit (CG by default, warm-started from the previous linear-system
   solution) or unrolled.
3. Optional significance filter (``significance_threshold > 0``): a hypergradient whose
   ‖g + r‖/‖λ‖ is at or below the threshold is held back in the error-feedback residual ``r``
   and sent, with later ones, once the sum is significant; ``Σ sent + r = Σ computed`` always
   (see :meth:`Worker.error_feedback`).
4. ``Commit(version, hypergradient, commit_id)``. The commit id is unique per commit (worker id,
   a random per-instance nonce, a counter), so a re-send is applied once.

Failure handling:

* **No reply** within ``request_timeout`` while the coordinator is alive (it answers
  heartbeats): the request is re-sent with the same request id (a commit with the same commit
  id, so it is applied once).
* **Coordinator gone** (silent for ``max(request_timeout, 3 × heartbeat_interval)``) or
  **forgot us** (an ``unknown_worker`` reply, e.g. it restarted or our lease expired): open a
  fresh socket (dropping what was queued for the dead peer) and register again, re-sending with
  exponential backoff until ``connect_timeout``, then raise :class:`ChronosError`. After a
  re-registration the cached λ is dropped (a restarted coordinator may reuse version numbers)
  and a commit the new coordinator cannot place (``bad_version``) is dropped and counted in
  ``commits_refused``, not fatal.
* **Duplicate worker id**: if the id is taken before this worker ever registered, the worker
  refuses to start (two live workers cannot share an id); if it is our own earlier registration
  (a lost reply), the worker takes it over.
* **Lease cancelled** (:class:`~.messages.LeaseCancelled`, a late answer to the checkout that
  granted the lease): the version moved more than ``max_staleness`` past the checked-out one,
  so a commit would be rejected. The worker abandons the work at its next inner step (or
  before the hypergradient) and checks out again; counted in ``leases_cancelled``.
* :class:`~.messages.ShutdownNotice` (the job is done or the coordinator stops) or
  :meth:`Worker.stop` end :meth:`Worker.run` promptly: a pending request is abandoned and the
  inner solve is interrupted at its next step.

Example (see ``examples/`` and ``chronos run`` for complete jobs):
    >>> cfg = WorkerConfig(coordinator_addr="tcp://127.0.0.1:5555", significance_threshold=0.0)
    >>> cfg.hypergradient, cfg.method
    ('implicit', 'cg')
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import math
import os
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from chronos.communication.significance import SignificanceConfig, SignificanceFilter
from chronos.core import tensordict as td
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
    LeaseCancelled,
    Message,
    Register,
    Registered,
    ShutdownNotice,
)
from chronos.distributed.worker_config import WorkerConfig, default_tol, is_int
from chronos.distributed.worker_link import WorkerLink
from chronos.solver import implicit_hypergradient, unrolled_hypergradient

__all__ = ["Worker", "WorkerConfig", "WorkerStopped", "unroll_momentum"]

log = logging.getLogger("chronos.worker")

_POLL_S = 0.05  # how often a waiting compute thread re-checks stop / liveness
_REFUSED_COMMIT_CODES = ("bad_version", "non_finite")  # drop the commit, keep working


class WorkerStopped(ChronosError):
    """Raised inside the worker loop when it is told to stop (caught by :meth:`Worker.run`)."""


class _LeaseLost(ChronosError):
    """The coordinator cancelled the lease this iteration works on (caught by :meth:`step`)."""


def _default_worker_id() -> str:
    return f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class _Outcome:
    """Why :meth:`Worker._exchange` returned without a reply."""

    def __init__(self, why: str) -> None:
        self.why = why


_LOST = _Outcome("the coordinator no longer knows this worker")
_SILENT = _Outcome("the coordinator stopped answering")


def unroll_momentum(problem: InnerProblem, cfg: WorkerConfig) -> float:
    """The momentum of the inner solve that the unrolled hypergradient replays (0 for SGD,
    0.9 for ``"momentum"``; 0 when ``cfg`` does not replay), or raise :class:`ConfigError`
    when the problem's solve cannot be replayed as gradient descent (L-BFGS, Adam, a custom
    optimizer) and no ``unroll_lr`` was given. The launcher calls it before starting any
    process, so a bad combination fails at once."""
    if cfg.hypergradient != "unrolled" or cfg.unroll_lr is not None:
        return 0.0
    if problem.optimizer == "sgd":
        return 0.0
    if problem.optimizer == "momentum":
        return 0.9  # chronos.core.make_optimizer's "momentum"
    name = problem.optimizer if isinstance(problem.optimizer, str) else "a custom factory"
    raise ConfigError(
        f"hypergradient='unrolled' replays the inner solve as gradient descent, but this "
        f"problem solves with optimizer {name!r}; set WorkerConfig(unroll_lr=...) (plain "
        "gradient-descent steps unrolled from the solution; --unroll-lr on the CLI) or "
        "use hypergradient='implicit'"
    )


class Worker:
    """Runs checkout → solve → hypergradient → commit against a :class:`~.Coordinator`.

    Args:
        inner_problem: the :class:`~chronos.core.InnerProblem` on this worker's data.
        config: a :class:`WorkerConfig`.

    A worker is single-use: after :meth:`close` (which :meth:`run` calls on its way out) create
    a new one to join again.
    """

    def __init__(self, inner_problem: InnerProblem, config: WorkerConfig | None = None) -> None:
        if not isinstance(inner_problem, InnerProblem):
            raise ConfigError(
                f"inner_problem must be an InnerProblem, got {type(inner_problem).__name__}; "
                "build one with InnerProblem.from_functions(...) or subclass it"
            )
        if config is not None and not isinstance(config, WorkerConfig):
            raise ConfigError(f"config must be a WorkerConfig, got {type(config).__name__}")
        self.problem = inner_problem
        self.config = config or WorkerConfig()
        self.worker_id = self.config.worker_id or _default_worker_id()
        self._nonce = uuid.uuid4().hex[:8]  # commit ids stay unique across restarts of an id
        self._net: WorkerLink | None = None
        self._stop = threading.Event()
        self._closed = False
        self._registered_once = False
        self._outer: TensorDict | None = None  # cached λ (None: ask for a full copy)
        self._version = -1
        self._theta: TensorDict | None = None
        self._solution: TensorDict | None = None
        self._filter = (
            SignificanceFilter(SignificanceConfig(threshold=self.config.significance_threshold))
            if self.config.significance_threshold > 0 else None
        )
        self._computed_sum: TensorDict | None = None  # error-feedback bookkeeping (filter on)
        self._sent_sum: TensorDict | None = None
        self._commit_seq = itertools.count(1)
        self._solve_callback = self._accepts_callback(inner_problem)
        self._unroll_momentum = unroll_momentum(inner_problem, self.config)
        self._stats: dict[str, float] = {
            "iterations": 0, "registrations": 0, "reconnects": 0, "resends": 0,
            "commits_sent": 0, "commits_accepted": 0, "commits_rejected": 0,
            "commits_duplicate": 0, "commits_refused": 0, "commits_skipped": 0,
            "hypergradients_nonfinite": 0, "checkouts": 0, "checkouts_deferred": 0,
            "checkouts_not_modified": 0, "solve_seconds": 0.0, "hypergrad_seconds": 0.0,
            "linear_iterations": 0,
        }
        self.stop_reason = ""
        self.last_metrics: dict[str, float] = {}
        self.commit_log: deque[CommitReply] = deque(maxlen=10_000)  # latest commit replies
        # replies routed to the request id of the checkout that granted the current lease,
        # where a LeaseCancelled arrives (see _watch_lease)
        self._lease_watch: contextlib.ExitStack | None = None
        self._lease_replies: queue.Queue[Message] | None = None
        self._stats["leases_cancelled"] = 0

    @staticmethod
    def _accepts_callback(problem: InnerProblem) -> bool:
        try:
            params = inspect.signature(problem.solve).parameters.values()
        except (TypeError, ValueError):
            return False
        return any(p.name == "callback" or p.kind is inspect.Parameter.VAR_KEYWORD
                   for p in params)

    # -- lifecycle ---------------------------------------------------------------------------

    def connect(self) -> Worker:
        """Open the socket, start the network thread and register (retrying with backoff up
        to ``connect_timeout``). Raises :class:`ChronosError` if no coordinator answers."""
        if self._closed:
            raise ChronosError("this Worker was closed; create a new Worker to join again")
        if self.config.num_threads is not None:
            torch.set_num_threads(self.config.num_threads)
        if self._net is None:
            net = WorkerLink(self.config.coordinator_addr, self.worker_id, self.config.curve,
                             self._stop, self.config.heartbeat_interval)
            net.start()
            self._net = net
        if not self._registered_once:
            try:
                self._register()
            except BaseException:
                self.close()
                raise
        return self

    def stop(self) -> None:
        """Ask :meth:`run` to leave as soon as possible (idempotent, thread-safe): a pending
        request is abandoned and the inner solve stops at its next step."""
        self.stop_reason = self.stop_reason or "stopped"
        self._stop.set()

    def close(self) -> None:
        """Stop, deregister (best effort) and close the socket. Idempotent."""
        self._stop.set()
        self._closed = True
        if self._net is not None:
            self._net.stop()

    def __enter__(self) -> Worker:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> dict[str, float]:
        """Counters of this worker: iterations; commits sent / accepted / rejected /
        duplicate (a re-send answered for an earlier accept) / refused (an error reply, dropped)
        / skipped (held back by the significance filter); checkouts (deferred, not modified);
        registrations, reconnects, resends; bytes and messages on the wire, heartbeats;
        timings; ``version`` (of the cached λ) and ``residual_norm``."""
        out = dict(self._stats)
        if self._net is not None:
            out.update(self._net.counters)
            out["coordinator_version"] = self._net.coordinator_version
        out["version"] = self._version
        out["residual_norm"] = 0.0 if self._filter is None else float(self._filter.residual_norm)
        return out

    def error_feedback(self) -> dict[str, TensorDict]:
        """With the significance filter on: ``computed`` (Σ of every hypergradient computed),
        ``sent`` (Σ of what went out in commits) and ``residual`` (held back). Always
        ``sent + residual == computed`` (up to float rounding). Empty dicts before the first
        hypergradient or with the filter off."""
        if self._filter is None or self._computed_sum is None or self._sent_sum is None:
            return {"computed": {}, "sent": {}, "residual": {}}
        return {"computed": td.clone(self._computed_sum), "sent": td.clone(self._sent_sum),
                "residual": self._filter.residual}

    def run(self, max_iterations: int | None = None) -> dict[str, float]:
        """Loop until shut down, stopped, or ``max_iterations`` iterations were done (an
        iteration whose commit the significance filter held back counts).

        Returns :meth:`stats`. Raises :class:`ChronosError` if the coordinator stays
        unreachable for ``connect_timeout`` seconds, or refuses this worker for good.
        """
        if max_iterations is not None and (not is_int(max_iterations) or max_iterations < 0):
            raise ConfigError(f"max_iterations must be an int >= 0 or None, got {max_iterations!r}")
        try:
            if self._net is None:
                self.connect()
            while max_iterations is None or self._stats["iterations"] < max_iterations:
                self._check()
                self.step()
        except WorkerStopped as e:
            self.stop_reason = str(e)
            log.info("%s: stopping: %s", self.worker_id, e)
        finally:
            self.close()
        return self.stats()

    # -- one iteration -----------------------------------------------------------------------

    def step(self) -> CommitReply | None:
        """One checkout → solve → hypergradient → commit. Returns the coordinator's reply, or
        ``None`` if nothing was committed (held back by the significance filter, a non-finite
        hypergradient, a commit the coordinator refused, or a lease the coordinator cancelled
        because the work could no longer be accepted: abandoned, nothing committed)."""
        try:
            return self._iteration()
        except _LeaseLost as e:
            self._stats["leases_cancelled"] += 1
            log.info("%s: %s", self.worker_id, e)
            return None
        finally:
            self._unwatch_lease()

    def _iteration(self) -> CommitReply | None:
        version, outer = self._checkout()
        cfg = self.config
        t0 = time.perf_counter()
        init = self._theta if (cfg.warm_start and self._theta is not None) else None
        kwargs: dict[str, Any] = {}
        if self._solve_callback:
            kwargs["callback"] = self._interrupt_solve
        theta, traj = self.problem.solve(outer, init_params=init, num_steps=cfg.inner_steps,
                                         version=version, worker_id=self.worker_id, **kwargs)
        if cfg.straggler_delay > 0:
            self._stop.wait(cfg.straggler_delay)  # injected slowness, interruptible
            self._check()
        self._check_lease()  # before the linear solve: is this work still wanted?
        t1 = time.perf_counter()
        grad, metrics = self._hypergradient(theta, outer, init, traj.num_steps)
        t2 = time.perf_counter()
        self._theta = theta
        self._stats["iterations"] += 1
        self._stats["solve_seconds"] += t1 - t0
        self._stats["hypergrad_seconds"] += t2 - t1
        final_loss = traj.final_loss
        metrics.update(inner_loss=math.nan if final_loss is None else float(final_loss),
                       inner_steps=traj.num_steps, solve_seconds=t1 - t0)
        self.last_metrics = metrics
        if not td.is_finite(grad):
            self._stats["hypergradients_nonfinite"] += 1
            self._solution = None  # do not warm-start the next linear solve from garbage
            log.warning("%s: non-finite hypergradient on version %d; not committed",
                        self.worker_id, version)
            return None
        if self._filter is not None:
            grad = td.detach(grad)
            if self._computed_sum is None or self._sent_sum is None:
                self._computed_sum, self._sent_sum = td.zeros_like(grad), td.zeros_like(grad)
            self._computed_sum = td.add(self._computed_sum, grad)
            held = self._filter.update(grad, outer)
            if held is None:
                self._stats["commits_skipped"] += 1
                return None
            grad = held
        return self._commit(version, grad, metrics)

    def _interrupt_solve(self, step: int, loss: float) -> None:
        if self._stop.is_set():
            raise WorkerStopped(self._stop_why())
        self._check_lease()

    # -- lease cancellation ------------------------------------------------------------------

    def _watch_lease(self, net: WorkerLink, request_id: int) -> None:
        """Keep receiving replies to the checkout ``request_id`` that granted our lease: a
        :class:`LeaseCancelled` arrives there (the link routes replies by request id)."""
        self._unwatch_lease()
        stack = contextlib.ExitStack()
        self._lease_replies = stack.enter_context(net.waiting(request_id))
        self._lease_watch = stack

    def _unwatch_lease(self) -> None:
        if self._lease_watch is not None:
            self._lease_watch.close()
        self._lease_watch = self._lease_replies = None

    def _check_lease(self) -> None:
        """Raise :class:`_LeaseLost` if the coordinator cancelled our lease (cheap: a
        non-blocking look at a queue; called between inner steps and before the linear solve).
        """
        replies = self._lease_replies
        while replies is not None:
            try:
                msg = replies.get_nowait()
            except queue.Empty:
                return
            if isinstance(msg, LeaseCancelled):
                self._unwatch_lease()
                raise _LeaseLost(msg.reason or f"lease on version {msg.version} cancelled")
            # anything else (an answer to a re-sent checkout, a shutdown: the stop event is set)

    def _hypergradient(
        self, theta: TensorDict, outer: TensorDict, start: TensorDict | None, steps_taken: int
    ) -> tuple[TensorDict, dict[str, float]]:
        """``dF/dλ`` at ``theta``: implicit, or unrolled through the solve that produced
        ``theta`` (from ``start``, ``None`` meaning ``init_params()``, for ``steps_taken``
        steps) — see :class:`WorkerConfig`'s ``unroll_*`` options."""
        cfg, prob = self.config, self.problem

        def inner(p: TensorDict, h: TensorDict) -> torch.Tensor:
            return prob.inner_loss(p, h)

        def outer_fn(p: TensorDict, h: TensorDict) -> torch.Tensor:
            return prob.outer_loss(p, h)

        if cfg.hypergradient == "implicit":
            init = self._solution if cfg.warm_start else None
            grad, info = implicit_hypergradient(
                inner, outer_fn, theta, outer, method=cfg.method, max_iter=cfg.max_iter,
                tol=self._tol(theta), damping=cfg.damping, init=init, return_info=True,
            )
            self._solution = info.solution
            self._stats["linear_iterations"] += info.iterations
            return grad, {"outer_loss": info.outer_loss, "linear_iterations": info.iterations}
        lr: float | str
        if cfg.unroll_lr is None:  # replay the solve: same start, steps, step size, momentum
            init = prob.init_params() if start is None else start
            steps, lr, momentum = steps_taken, prob.inner_lr, self._unroll_momentum
        else:  # gradient descent unrolled from the solution
            init, lr, momentum = theta, cfg.unroll_lr, 0.0
            steps = 20 if cfg.unroll_steps is None else cfg.unroll_steps
        if steps < 1:  # the solve stopped at its start (already optimal): nothing to replay
            init, steps = theta, 1
        grad, uinfo = unrolled_hypergradient(
            inner, outer_fn, init, outer, steps=steps, lr=lr, truncate=cfg.truncate,
            momentum=momentum, return_info=True,
        )
        return grad, {"outer_loss": float(getattr(uinfo, "outer_loss", math.nan))}

    def _tol(self, theta: TensorDict) -> float:
        if self.config.tol is not None:
            return self.config.tol
        dtypes = [v.dtype for v in theta.values() if v.is_floating_point()]
        return default_tol(dtypes[0] if dtypes else torch.float64)

    # -- requests ----------------------------------------------------------------------------

    def _stop_why(self) -> str:
        net = self._net
        if net is not None and net.shutdown.is_set():
            return net.shutdown_reason
        return self.stop_reason or "stopped"

    def _check(self) -> WorkerLink:
        """The network, or raise: :class:`WorkerStopped` once stopped / shut down,
        :class:`ChronosError` if not connected or the network thread died."""
        net = self._net
        if net is None:
            raise ChronosError("the worker is not connected; call connect() first")
        if self._stop.is_set():
            raise WorkerStopped(self._stop_why())
        if net.error is not None:
            raise ChronosError(f"the worker's network thread failed: {net.error!r}")
        return net

    def _silence_limit(self, net: WorkerLink) -> float:
        return max(self.config.request_timeout, 3.0 * (net.heartbeat_interval or 0.0))

    def _call(
        self,
        make: Callable[[int], Message],
        *,
        checkout: bool = False,
        net: WorkerLink | None = None,
    ) -> Message:
        """Send ``make(request_id)`` and return its reply; re-register and re-send (with a
        message rebuilt by ``make``) when the coordinator went silent or forgot us. With ``net``
        given (already checked), the message is sent before any stop check."""
        net = net or self._check()
        while True:
            reply = self._exchange(net, make(net.next_id()), checkout)
            if isinstance(reply, _Outcome):
                self._reconnect(reply.why)
                continue
            if isinstance(reply, ShutdownNotice):
                raise WorkerStopped(self._stop_why())
            if isinstance(reply, ErrorReply) and reply.code == "unknown_worker":
                self._reconnect(f"{reply.code}: {reply.message}")
                continue
            if isinstance(reply, ErrorReply) and reply.code == "shutting_down":
                raise WorkerStopped(reply.message)
            return reply

    def _exchange(self, net: WorkerLink, msg: Message, checkout: bool) -> Message | _Outcome:
        """Send ``msg``, wait for its reply. Without one for ``request_timeout`` it is re-sent
        (same request id); a deferred checkout waits for its grant while the coordinator is
        alive. Returns an :class:`_Outcome` when the coordinator went silent or forgot us."""
        timeout = self.config.request_timeout
        with net.waiting(msg.request_id) as replies:
            net.send(msg)
            first = sent = time.monotonic()
            deferred = False
            while True:
                self._check()
                try:
                    reply = replies.get(timeout=_POLL_S)
                except queue.Empty:
                    reply = None
                if reply is not None:
                    if checkout and isinstance(reply, CheckoutReply) and \
                            reply.status == "deferred":
                        if not deferred:
                            self._stats["checkouts_deferred"] += 1
                            log.debug("%s: checkout deferred: %s", self.worker_id, reply.reason)
                        deferred = True
                        continue  # the grant follows with the same request id
                    return reply
                if net.registration_lost.is_set():
                    return _LOST
                now = time.monotonic()
                if now - max(net.last_heard, first) >= self._silence_limit(net):
                    return _SILENT
                if now - sent >= timeout:  # the coordinator is alive: the message got lost
                    net.send(msg)
                    sent = now
                    self._stats["resends"] += 1

    def _reconnect(self, why: str) -> None:
        net = self._check()
        self._stats["reconnects"] += 1
        log.warning("%s: %s; registering again", self.worker_id, why)
        self._outer = None  # a restarted coordinator may reuse version numbers for another λ
        net.beating = False
        net.reset_connection()  # drop stale queued messages; reclaim our routing identity
        self._register()

    def _register(self) -> None:
        """Register, re-sending with exponential backoff until ``connect_timeout``."""
        net = self._check()
        cfg = self.config
        net.beating = False
        deadline = time.monotonic() + cfg.connect_timeout
        wait = min(0.2, cfg.request_timeout)
        # the nonce tells this Worker's Registers apart from another's with the same id and
        # request id (the coordinator answers a re-sent copy of its own Register again)
        info: dict[str, Any] = {"pid": os.getpid(), "host": os.uname().nodename,
                                "nonce": self._nonce}
        takeovers = 0
        while True:
            msg = Register(request_id=net.next_id(), worker_id=self.worker_id, info=info)
            sends = 0
            reply: Message | None = None
            with net.waiting(msg.request_id) as replies:
                while reply is None:
                    net.send(msg)
                    sends += 1
                    reply = self._wait(replies, min(wait, deadline - time.monotonic()))
                    if reply is None:
                        if time.monotonic() >= deadline:
                            raise ChronosError(
                                f"no coordinator answered at {cfg.coordinator_addr} within "
                                f"connect_timeout={cfg.connect_timeout:g} s; is it running? "
                                "(start one with `chronos coordinator --port PORT`, or raise "
                                "WorkerConfig.connect_timeout)"
                            )
                        wait = min(wait * 2, cfg.request_timeout)
            if isinstance(reply, Registered):
                break
            if isinstance(reply, ShutdownNotice):
                raise WorkerStopped(self._stop_why())
            if isinstance(reply, ErrorReply) and reply.code == "shutting_down":
                raise WorkerStopped(reply.message)
            if isinstance(reply, ErrorReply) and reply.code == "duplicate_worker":
                if (sends > 1 or self._registered_once) and takeovers < 2:
                    # our own earlier Register got through (its reply was lost): take it over
                    takeovers += 1
                    net.send(Deregister(request_id=net.next_id(), worker_id=self.worker_id))
                    continue
                raise ChronosError(
                    f"worker id {self.worker_id!r} is already registered by another live "
                    "worker; give every worker a unique worker_id (chronos worker --worker-id)"
                )
            raise ChronosError(f"registration refused: {_describe(reply)}")
        self._registered_once = True
        self._stats["registrations"] += 1
        lease = net.lease_timeout
        interval = net.heartbeat_interval
        if lease is not None and interval is not None and interval * 2 > lease:
            log.warning("%s: heartbeat_interval %.3g s is more than half the coordinator's "
                        "lease_timeout %.3g s; the lease may expire between heartbeats",
                        self.worker_id, interval, lease)

    def _wait(self, replies: queue.Queue[Message], timeout: float) -> Message | None:
        """The next reply within ``timeout`` seconds, or ``None``; honours stop/shutdown."""
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            self._check()
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                return replies.get(timeout=min(left, _POLL_S))
            except queue.Empty:
                continue

    def _checkout(self) -> tuple[int, TensorDict]:
        for _ in range(2):
            have = self._version if self._outer is not None else -1
            reply = self._call(
                lambda rid: Checkout(request_id=rid, worker_id=self.worker_id,
                                     have_version=self._version if self._outer is not None
                                     else -1),
                checkout=True,
            )
            if not isinstance(reply, CheckoutReply):
                raise ChronosError(f"checkout refused: {_describe(reply)}")
            self._stats["checkouts"] += 1
            if reply.status == "not_modified":
                if self._outer is None or reply.version != have:
                    # only possible if our cache was dropped meanwhile: ask for a full copy
                    self._outer = None
                    continue
                self._stats["checkouts_not_modified"] += 1
            else:
                self._outer = {k: v.detach().clone() for k, v in reply.outer_params.items()}
            self._version = reply.version
            assert self._outer is not None
            if self._net is not None:
                self._watch_lease(self._net, reply.request_id)
            return reply.version, self._outer
        raise ChronosError("the coordinator answered 'not_modified' to a checkout without a "
                           "cached version; this is a coordinator bug")

    def _commit(self, version: int, grad: TensorDict,
                metrics: dict[str, float]) -> CommitReply | None:
        commit_id = f"{self.worker_id}-{self._nonce}-{next(self._commit_seq)}"
        payload = {k: v.detach().contiguous() for k, v in grad.items()}
        clean = {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}
        net = self._check()
        self._stats["commits_sent"] += 1
        if self._sent_sum is not None:
            self._sent_sum = td.add(self._sent_sum, payload)
        reply = self._call(lambda rid: Commit(
            request_id=rid, worker_id=self.worker_id, version=version, commit_id=commit_id,
            hypergradient=payload, metrics=clean,
        ), net=net)
        if isinstance(reply, CommitReply):
            self.commit_log.append(reply)
            key = {"accepted": "commits_accepted", "rejected": "commits_rejected",
                   "duplicate": "commits_duplicate"}[reply.status]
            self._stats[key] += 1
            if reply.status == "rejected":
                log.info("%s: commit on version %d rejected: %s", self.worker_id, version,
                         reply.reason)
            return reply
        if isinstance(reply, ErrorReply) and reply.code in _REFUSED_COMMIT_CODES:
            # e.g. computed on a version of a coordinator that has since restarted: drop it
            self._stats["commits_refused"] += 1
            log.warning("%s: commit on version %d refused and dropped: %s", self.worker_id,
                        version, _describe(reply))
            return None
        if isinstance(reply, ErrorReply) and reply.code == "bad_tensor":
            raise ChronosError(
                f"the coordinator refused this worker's hypergradient ({_describe(reply)}); "
                "does the worker's problem have the same outer parameters as the coordinator's?"
            )
        raise ChronosError(f"commit refused: {_describe(reply)}")


def _describe(reply: Message) -> str:
    if isinstance(reply, ErrorReply):
        return f"{reply.code}: {reply.message}"
    return f"unexpected {reply.op} reply"
