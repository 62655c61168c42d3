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
3. Optional significance filter (``significance_threshold > 0``, see "Local outer steps"
   below): a hypergradient whose accumulated update is not significant is held back in the
   error-feedback residual ``r`` and the worker takes a local outer step instead of pausing.
4. ``Commit(version, hypergradient, commit_id)``. The commit id is unique per commit (worker id,
   a random per-instance nonce, a counter), so a re-send is applied once.

Local outer steps (the significance filter; DESIGN.md "A skip is a local step, not a pause"):

* **Gradient space.** A commit carries a *sum of hypergradients* ``Σ g`` (the residual ``r``);
  the coordinator applies its own optimizer to it, with the usual weight ``decay**s``. So,
  exactly, Σ (payloads the coordinator accepted) + Σ (residuals left on workers) =
  Σ (all hypergradients computed).
* **Local point.** The worker keeps ``λ_local``. At a checkout that brings a new version it is
  re-based on the coordinator's λ: ``λ_local = λ_v − η·r`` (the coordinator's state plus this
  worker's own steps not sent yet; ``λ_v`` itself when ``r = 0``). After every hypergradient it
  steps ``λ_local ← λ_local − η·g`` (plain SGD), sent or not, so the next solve (warm-started)
  runs at a new point: nothing is recomputed at the same λ, even when the version did not move.
* **Step size η.** ``WorkerConfig.local_lr`` if given; else the coordinator's ``outer_lr`` if it
  announces ``optimizer="sgd"`` at registration (then a local step is the step the coordinator
  would take); else measured: ``η = mean(‖λ_{v'} − λ_v‖ / (v' − v)) / mean(‖g‖)`` over the last
  8 version changes seen at checkouts and the last 8 hypergradients. A local step then moves
  λ_local about as far as one coordinator step, whatever the optimizer (Adam moves λ by ~lr
  per coordinate whatever ‖g‖, so no fixed ratio of λ-step to ‖g‖ exists) and whatever the
  hypergradients' scale; means over a window keep one odd step or tiny gradient from blowing η
  up, and the direction of a step stays that of ``g``. Until a step has been measured η is
  unknown: every hypergradient is then sent (bootstrap; the first accepted commit moves λ).
* **When to send.** Significance in parameter space:
  ``‖η·r‖ / (‖λ_local‖ + scale) > threshold`` with ``scale`` the mean per-version step above
  (``η·mean ‖g‖`` before one was measured), so λ = 0 is not special: near λ = 0 the yardstick
  is the coordinator's own step. At the latest after ``max_skip`` consecutive held-back rounds
  the residual is sent whatever its significance (default 8), so no threshold can stall a
  worker. ``target_rate`` adapts the threshold.
* **Staleness of an accumulated commit.** The commit carries the version of the *latest*
  checkout (the lease this round holds), so its staleness is measured from the latest
  checkout and ``decay**s`` weighs the whole sum. The coordinator only accepts commits against
  a lease the worker holds, and cancels leases that fell more than ``max_staleness`` behind; a
  commit on the oldest contribution's version would be refused or rejected after a few
  held-back rounds, losing up to ``max_skip`` rounds of work. The latest version is also the
  honest one here: every re-base moves λ_local onto the coordinator's current λ (plus this
  worker's unsent steps), so the held-back hypergradients were computed along a trajectory
  that tracks the latest checkout, not the version it started from.
* **Error feedback survives rejection.** The payload leaves the residual only when the
  coordinator acknowledges it (``accepted``, or ``duplicate`` of an accepted commit). A
  rejected, refused (error reply) or unacknowledged (stopped, failed) commit goes back into
  the residual and is sent later. :meth:`Worker.error_feedback` counts as ``sent`` the accepted
  payloads only, so ``sent + residual == computed`` holds at every point.

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
  ``commits_refused``, not fatal (with the significance filter on, its payload goes back into
  the error-feedback residual and is sent again later).
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
from typing import TYPE_CHECKING, Any

import torch

from chronos.communication.codecs import Codec, parse_codec
from chronos.communication.feedback import compress, decode_dict
from chronos.communication.significance import SignificanceConfig, SignificanceFilter
from chronos.continuum.amortized import AmortizationConfig, AmortizedHypergradient
from chronos.core import tensordict as td
from chronos.core.errors import ChronosError, ConfigError, NonFiniteError
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
from chronos.distributed.protocol import apply_delta, checksum
from chronos.distributed.worker_config import WorkerConfig, default_tol, is_int, is_number
from chronos.distributed.worker_link import WorkerLink
from chronos.solver import implicit_hypergradient, unrolled_hypergradient

if TYPE_CHECKING:
    from chronos.distributed.group_worker import GroupMember

__all__ = ["Worker", "WorkerConfig", "WorkerStopped", "unroll_momentum"]

log = logging.getLogger("chronos.worker")

_POLL_S = 0.05  # how often a waiting compute thread re-checks stop / liveness
MAX_NONFINITE_ROUNDS = 5
"""Consecutive rounds whose solve or hypergradient went non-finite before a worker gives up."""
_REFUSED_COMMIT_CODES = ("bad_version", "non_finite", "no_lease")  # drop the commit, keep working
_WINDOW = 8  # measurements behind the measured local step size (see the module docstring)


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
        group: this worker leads a worker group (a
            :class:`~chronos.distributed.group_worker.GroupMember` of rank 0): the group
            solves the inner problem over all its shards and computes the hypergradient
            together; the worker checks out and commits as usual.

    A worker is single-use: after :meth:`close` (which :meth:`run` calls on its way out) create
    a new one to join again.
    """

    def __init__(self, inner_problem: InnerProblem, config: WorkerConfig | None = None,
                 *, group: GroupMember | None = None) -> None:
        if not isinstance(inner_problem, InnerProblem):
            raise ConfigError(
                f"inner_problem must be an InnerProblem, got {type(inner_problem).__name__}; "
                "build one with InnerProblem.from_functions(...) or subclass it"
            )
        if config is not None and not isinstance(config, WorkerConfig):
            raise ConfigError(f"config must be a WorkerConfig, got {type(config).__name__}")
        self.problem = inner_problem
        self.config = config or WorkerConfig()
        self._group = group  # the leader of a worker group: the group solves (group_worker)
        self.worker_id = self.config.worker_id or _default_worker_id()
        self._nonce = uuid.uuid4().hex[:8]  # commit ids stay unique across restarts of an id
        self._net: WorkerLink | None = None
        self._stop = threading.Event()
        self._closed = False
        self._registered_once = False
        self._outer: TensorDict | None = None  # cached λ (None: ask for a full copy)
        self._version = -1
        # commits and delta checkouts are coded with this (announced in Register)
        self._wire_codec: Codec = parse_codec(getattr(self.config, "codec", "identity"))
        self._theta: TensorDict | None = None
        self._solution: TensorDict | None = None
        self._nonfinite_run = 0  # consecutive rounds that went non-finite
        cfg = self.config
        self._filter = (
            SignificanceFilter(SignificanceConfig(
                threshold=cfg.significance_threshold, target_rate=cfg.target_rate,
                max_skip=cfg.max_skip,
            ))
            # a lossy codec needs the residual too (threshold 0: every round is sent)
            if cfg.significance_threshold > 0 or not self._wire_codec.lossless else None
        )
        self._computed_sum: TensorDict | None = None  # error-feedback bookkeeping (filter on)
        self._sent_sum: TensorDict | None = None  # Σ payloads the coordinator accepted
        # local outer steps (filter on): λ_local, the checkout it was re-based on, and the
        # measurements behind the measured step size (see the module docstring)
        self._local: TensorDict | None = None
        self._base: TensorDict | None = None
        self._base_key: tuple[int, int] | None = None  # (registration, version) of _base
        self._step_norms: deque[float] = deque(maxlen=_WINDOW)  # coordinator ‖Δλ‖ per version
        self._grad_norms: deque[float] = deque(maxlen=_WINDOW)  # ‖g‖ of our hypergradients
        self._announced: dict[str, Any] = {}  # Registered.config of the latest registration
        self._in_flight: TensorDict | None = None  # a commit's payload awaiting its answer
        self._commit_seq = itertools.count(1)
        # a group's solve cannot stop half-way (the followers are in the same collectives)
        self._solve_callback = group is None and self._accepts_callback(inner_problem)
        self._unroll_momentum = unroll_momentum(inner_problem, self.config)
        self._amortized = self._build_amortized() if cfg.amortized else None
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
        self._stats["checkouts_delta"] = 0  # granted as a coded delta of the cached λ
        self._stats["checkout_resyncs"] = 0  # a delta that did not check out: full copy asked

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

    def stats(self) -> dict[str, Any]:
        """Counters of this worker: iterations; commits sent / accepted / rejected /
        duplicate (a re-send answered for an earlier accept) / refused (an error reply, dropped)
        / skipped (held back by the significance filter); checkouts (deferred, not modified);
        registrations, reconnects, resends; bytes and messages on the wire, heartbeats;
        timings; ``version`` (of the cached λ) and ``residual_norm``; with the filter on also
        ``commits_forced`` (sent because of ``max_skip`` or before a step size was known),
        ``commits_restored`` (payloads put back into the residual: rejected, refused,
        unacknowledged) and ``local_lr`` (the current local step size; nan: not known yet)."""
        out: dict[str, Any] = dict(self._stats)
        if self._net is not None:
            out.update(self._net.counters)
            out["coordinator_version"] = self._net.coordinator_version
            out["bytes_by_op"] = self._net.ops.by_op()  # op -> sent/received/messages_*
        out["codec"] = self._wire_codec.spec
        if self._group is not None:
            out["group"] = self._group.stats()
        out["version"] = self._version
        out["residual_norm"] = 0.0 if self._filter is None else float(self._filter.residual_norm)
        if self._filter is not None:
            fs = self._filter.stats()
            out["commits_forced"], out["commits_restored"] = fs["forced"], fs["restored"]
            lr = self._local_lr()
            out["local_lr"] = math.nan if lr is None else lr
        return out

    def error_feedback(self) -> dict[str, TensorDict]:
        """With the significance filter on: ``computed`` (Σ of every hypergradient computed),
        ``sent`` (Σ of the payloads the coordinator *accepted*: a rejected, refused or
        unacknowledged commit went back into the residual) and ``residual`` (not delivered
        yet). Always ``sent + residual == computed`` (up to float rounding). Empty dicts before
        the first hypergradient or with the filter off."""
        if self._filter is None or self._computed_sum is None or self._sent_sum is None:
            return {"computed": {}, "sent": {}, "residual": {}}
        residual = self._filter.residual
        in_flight = self._in_flight  # not acknowledged yet: still ours
        if in_flight is not None:
            residual = td.add(residual, in_flight)
        return {"computed": td.clone(self._computed_sum), "sent": td.clone(self._sent_sum),
                "residual": residual}

    def run(self, max_iterations: int | None = None) -> dict[str, Any]:
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
            self.flush()
        except WorkerStopped as e:
            self.stop_reason = str(e)
            log.info("%s: stopping: %s", self.worker_id, e)
        finally:
            self.close()  # deregisters first: the coordinator learns at once
            if self._group is not None:
                self._group.stop()
        return self.stats()

    def flush(self) -> CommitReply | None:
        """Commit what the error-feedback residual still holds (a checkout for a lease, then
        one commit), e.g. before leaving; ``None`` when there is nothing to send. :meth:`run`
        calls it after ``max_iterations`` rounds. A commit that does not get through goes
        back into the residual, as always."""
        if self._filter is None or float(self._filter.residual_norm) == 0.0:
            return None
        count = self._filter.held
        version, _ = self._checkout()
        try:
            due = self._filter.flush()
            if due is None:
                return None
            self._stats["commits_flushed"] = self._stats.get("commits_flushed", 0) + 1
            return self._commit(version, due, {}, updates=max(1, count))
        finally:
            self._unwatch_lease()

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
        try:
            reply = self._round()
        except NonFiniteError as e:
            # this round's numbers blew up (an extreme λ, a bad batch): skip it, start the
            # next one cold; only a run of such rounds is fatal (the problem, not the round).
            # A group's ranks fail together: that stays fatal.
            if self._group is not None:
                raise
            self._stats["hypergradients_nonfinite"] += 1
            self._nonfinite_run += 1
            self._theta, self._solution = None, None
            if self._nonfinite_run >= MAX_NONFINITE_ROUNDS:
                raise NonFiniteError(
                    f"{MAX_NONFINITE_ROUNDS} rounds in a row went non-finite; the last: {e}"
                ) from e
            log.warning("%s: %s; round skipped (%d in a row), not committed", self.worker_id,
                        e, self._nonfinite_run)
            return None
        self._nonfinite_run = 0
        return reply

    def _round(self) -> CommitReply | None:
        version, outer = self._checkout()
        if self._filter is not None:
            outer = self._local_point(version, outer)  # λ_local: where this round solves
        cfg = self.config
        t0 = time.perf_counter()
        init = self._theta if (cfg.warm_start and self._theta is not None) else None
        kwargs: dict[str, Any] = {}
        if self._solve_callback:
            kwargs["callback"] = self._interrupt_solve
        if self._group is not None:
            theta, traj = self._group.solve(outer, version, self.worker_id)
        elif self._amortized is not None:
            theta, traj = self._amortized.solve(outer, version=version,
                                                worker_id=self.worker_id, **kwargs)
        else:
            theta, traj = self.problem.solve(outer, init_params=init, num_steps=cfg.inner_steps,
                                             version=version, worker_id=self.worker_id, **kwargs)
        try:
            if cfg.straggler_delay > 0:
                self._stop.wait(cfg.straggler_delay)  # injected slowness, interruptible
                self._check()
            self._check_lease()  # before the linear solve: is this work still wanted?
        except BaseException:
            if self._group is not None:
                self._group.skip()
            raise
        t1 = time.perf_counter()
        grad, metrics = (self._group.hypergradient(theta, outer) if self._group is not None
                         else self._hypergradient(theta, outer, init, traj.num_steps))
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
            raise NonFiniteError(f"non-finite hypergradient on version {version}")
        if self._filter is not None:
            return self._filtered_commit(version, outer, grad, metrics)
        return self._commit(version, grad, metrics)

    # -- local outer steps (significance filter on) ------------------------------------------

    def _local_lr(self) -> float | None:
        """η of the local outer steps: ``local_lr``, else the coordinator's announced SGD step,
        else measured (mean per-version step / mean ‖g‖); ``None`` while unknown."""
        if self.config.local_lr is not None:
            return float(self.config.local_lr)
        ann = self._announced
        lr = ann.get("outer_lr")
        if ann.get("optimizer") == "sgd" and is_number(lr) and lr > 0:
            return float(lr)
        if not self._step_norms or not self._grad_norms:
            return None
        gbar = sum(self._grad_norms) / len(self._grad_norms)
        step = sum(self._step_norms) / len(self._step_norms)
        eta = step / gbar if gbar > 0 else 0.0
        return eta if eta > 0 and math.isfinite(eta) else None

    def _scale(self, lr: float | None) -> float:
        """The yardstick added to ‖λ‖: the mean per-version coordinator step, else one local
        step of mean length (0 while neither is known)."""
        if self._step_norms:
            return sum(self._step_norms) / len(self._step_norms)
        if lr is None or not self._grad_norms:
            return 0.0
        return lr * sum(self._grad_norms) / len(self._grad_norms)

    def _local_point(self, version: int, outer: TensorDict) -> TensorDict:
        """λ_local for this round. A checkout that brings a new version (or a new
        registration) re-bases it: ``λ_v − η·r``; the coordinator's step per version since the
        previous base (same registration) is measured on the way."""
        key = (int(self._stats["registrations"]), version)
        if key != self._base_key or self._local is None:
            base = td.clone(outer)
            old, old_key = self._base, self._base_key
            if old is not None and old_key is not None and old_key[0] == key[0] \
                    and version > old_key[1]:
                step = float(td.norm(td.sub(base, old))) / (version - old_key[1])
                if math.isfinite(step):
                    self._step_norms.append(step)
            self._base, self._base_key = base, key
            lr = self._local_lr()
            residual = self._filter.residual if self._filter is not None else {}
            if lr is None or not residual:
                self._local = base
            else:
                self._local = td.sub(base, td.scale(residual, lr))
        return self._local

    def _filtered_commit(self, version: int, point: TensorDict, grad: TensorDict,
                         metrics: dict[str, float]) -> CommitReply | None:
        """Error feedback, the local step, and the send decision for one hypergradient ``grad``
        computed at ``point`` (= λ_local); commits the residual if it is due."""
        assert self._filter is not None
        grad = td.detach(grad)
        if self._computed_sum is None or self._sent_sum is None:
            self._computed_sum, self._sent_sum = td.zeros_like(grad), td.zeros_like(grad)
        self._computed_sum = td.add(self._computed_sum, grad)
        self._grad_norms.append(float(td.norm(grad)))
        lr = self._local_lr()
        count = self._filter.held + 1  # hypergradients in the sum if it is sent now
        # no step size yet: no yardstick either (significance 0), so the send is forced
        due = self._filter.update(grad, point, step_size=0.0 if lr is None else lr,
                                  scale=self._scale(lr), force=lr is None)
        if lr is not None:  # the local outer step, sent or not: the next solve is elsewhere
            self._local = td.sub(point, td.scale(grad, lr))
        if due is None:
            self._stats["commits_skipped"] += 1
            return None
        return self._commit(version, due, metrics, updates=count)

    def _finalize_payload(self, update: TensorDict) -> tuple[TensorDict, TensorDict]:
        """The ONE place where the dense accumulated update (a sum of hypergradients) becomes
        the commit: ``(parts to send, payload)``. The payload is what the coordinator applies
        if it accepts: the update itself with a lossless codec, else the codec's decoded
        reconstruction, whose error ``update − payload`` goes straight back into the residual
        (the codec's error feedback). The payload itself leaves the residual only when the
        coordinator acknowledges it (see :meth:`_settle`)."""
        codec = self._wire_codec
        if codec.lossless:
            payload = {k: v.detach().contiguous() for k, v in update.items()}
            return payload, payload
        packed = compress(codec, update)
        if self._filter is not None:
            self._filter.restore(packed.residual)
        return packed.parts, packed.decoded

    def _settle(self, payload: TensorDict, delivered: bool) -> None:
        """Book a finished commit attempt: an accepted payload counts as sent; any other
        outcome (rejected, refused, unacknowledged) puts it back into the residual."""
        self._in_flight = None
        if self._filter is None or self._sent_sum is None:
            return
        if delivered:
            self._sent_sum = td.add(self._sent_sum, payload)
        else:
            self._filter.restore(payload)

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

        if self._amortized is not None:
            grad, step = self._amortized.hypergradient(theta, outer)
            self._stats["linear_iterations"] += step.linear_iterations
            return grad, {"outer_loss": step.outer_loss,
                          "linear_iterations": step.linear_iterations}
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

    def _build_amortized(self) -> AmortizedHypergradient:
        """The amortized solver (``amortized=True``): the worker's tolerances as exact floors."""
        cfg = self.config
        amortization = AmortizationConfig(  # linear_tol None: by θ's dtype, as _tol does
            linear_tol=None if cfg.tol is None else max(cfg.tol, 1e-300),
            max_iter=cfg.max_iter, max_inner_steps=cfg.inner_steps,
        )
        return AmortizedHypergradient(self.problem, amortization, method=cfg.method,
                                      damping=cfg.damping)

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
            if isinstance(reply, ErrorReply) and reply.code in ("unknown_worker", "not_owner"):
                # forgotten, or registered from our previous connection: register again
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
                try:  # a reply already here wins over a stop (e.g. an accept before a shutdown)
                    reply = replies.get_nowait()
                except queue.Empty:
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
                if now - sent >= timeout and not deferred:
                    # the coordinator is alive: the message got lost (a deferred checkout is
                    # not: its grant comes with the same request id; re-sending it would only
                    # queue it again)
                    net.send(msg)
                    sent = now
                    self._stats["resends"] += 1

    def _reconnect(self, why: str) -> None:
        net = self._check()
        self._stats["reconnects"] += 1
        log.warning("%s: %s; registering again", self.worker_id, why)
        self._outer = None  # a restarted coordinator may reuse version numbers for another λ
        net.beating = False
        net.reset_connection()  # drop stale queued messages; a new connection
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
            msg = Register(request_id=net.next_id(), worker_id=self.worker_id, info=info,
                           codec=self._wire_codec.spec)
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
                self._announced = dict(reply.config)  # e.g. outer_lr/optimizer: local steps
                break
            if isinstance(reply, ShutdownNotice):
                raise WorkerStopped(self._stop_why())
            if isinstance(reply, ErrorReply) and reply.code == "shutting_down":
                raise WorkerStopped(reply.message)
            if isinstance(reply, ErrorReply) and reply.code == "duplicate_worker":
                if (sends > 1 or self._registered_once) and time.monotonic() < deadline:
                    # our own earlier registration: on this connection (a lost reply) the
                    # Deregister ends it; on our previous one the coordinator lets it go as
                    # soon as it sees that connection closed, so ask again shortly
                    takeovers += 1
                    net.send(Deregister(request_id=net.next_id(), worker_id=self.worker_id))
                    if takeovers > 1:
                        self._wait(queue.Queue(), min(0.05 * 2 ** takeovers, 1.0))
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
        """Check out λ: ``(version, λ)``. A ``delta`` reply is decoded with this worker's codec
        and added to the cached copy (:func:`~.protocol.apply_delta`, exactly what the
        coordinator did to its record of our copy); unless the result's checksum equals the
        reply's, the copy is dropped (a warning, ``checkout_resyncs``) and a full copy is asked
        for with ``Checkout(have_version=-1, resync=True)``: a wrong λ is never used."""
        resync = False

        def make(rid: int) -> Checkout:  # rebuilt after a re-registration (the cache is gone)
            cached = self._outer is not None
            return Checkout(request_id=rid, worker_id=self.worker_id,
                            have_version=self._version if cached else -1,
                            resync=resync and not cached)

        for _ in range(4):
            have = self._version if self._outer is not None else -1
            reply = self._call(make, checkout=True)
            if not isinstance(reply, CheckoutReply):
                raise ChronosError(f"checkout refused: {_describe(reply)}")
            self._stats["checkouts"] += 1
            if reply.status == "not_modified":
                if self._outer is None or reply.version != have:
                    # only possible if our cache was dropped meanwhile: ask for a full copy
                    self._outer = None
                    continue
                self._stats["checkouts_not_modified"] += 1
            elif reply.kind == "delta":
                held = self._apply_delta(reply)
                if held is None:
                    self._outer, resync = None, True
                    self._stats["checkout_resyncs"] += 1
                    continue
                self._outer = held
                self._stats["checkouts_delta"] += 1
            else:
                self._outer = {k: v.detach().clone() for k, v in reply.outer_params.items()}
            self._version = reply.version
            assert self._outer is not None
            if self._net is not None:
                self._watch_lease(self._net, reply.request_id)
            return reply.version, self._outer
        raise ChronosError("the coordinator kept answering checkouts with versions this worker "
                           "cannot use ('not_modified' without a cached copy, or deltas that "
                           "do not match their checksum); this is a coordinator bug")

    def _apply_delta(self, reply: CheckoutReply) -> TensorDict | None:
        """Our cached λ plus the reply's decoded delta, or ``None`` (logged) if the delta is not
        for our copy, does not decode, or does not reproduce the coordinator's checksum."""
        base = self._outer
        if base is None or reply.base_version != self._version:
            why = (f"it is based on version {reply.base_version}, this worker holds "
                   f"{self._version if base is not None else 'none'}")
        else:
            try:
                held = apply_delta(base, decode_dict(self._wire_codec, reply.outer_params, base))
            except ChronosError as e:
                why = f"it does not decode with codec {self._wire_codec.spec!r}: {e}"
            else:
                got = checksum(held)
                if got == reply.checksum:
                    return held
                why = f"checksum {got} != the coordinator's {reply.checksum}"
        log.warning("%s: delta checkout of version %d not applied (%s); asking for a full copy",
                    self.worker_id, reply.version, why)
        return None

    def _commit(self, version: int, grad: TensorDict, metrics: dict[str, float],
                updates: int = 1) -> CommitReply | None:
        """Commit ``grad`` (a sum of ``updates`` hypergradients) on ``version``, coded with
        this worker's codec (:meth:`_finalize_payload`)."""
        commit_id = f"{self.worker_id}-{self._nonce}-{next(self._commit_seq)}"
        parts, payload = self._finalize_payload(grad)
        codec = self._wire_codec.spec
        clean = {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}
        net = self._check()
        self._stats["commits_sent"] += 1
        delivered = False
        self._in_flight = payload if self._filter is not None else None
        try:
            reply = self._call(lambda rid: Commit(
                request_id=rid, worker_id=self.worker_id, version=version, commit_id=commit_id,
                hypergradient=parts, metrics=clean, codec=codec, updates=max(1, updates),
            ), net=net)
            # duplicate: this commit id was applied earlier (an earlier copy's reply was lost)
            delivered = isinstance(reply, CommitReply) and reply.status in ("accepted",
                                                                            "duplicate")
        finally:
            self._settle(payload, delivered)  # error feedback: undelivered goes back
        if isinstance(reply, CommitReply):
            self.commit_log.append(reply)
            if self.config.ack_log is not None:
                self._log_ack(reply)
            key = {"accepted": "commits_accepted", "rejected": "commits_rejected",
                   "duplicate": "commits_duplicate"}[reply.status]
            self._stats[key] += 1
            if reply.status == "rejected":
                log.info("%s: commit on version %d rejected: %s", self.worker_id, version,
                         reply.reason)
            return reply
        if isinstance(reply, ErrorReply) and reply.code in _REFUSED_COMMIT_CODES:
            # e.g. computed on a version of a coordinator that has since restarted: drop it
            # (with the filter on, _settle put its payload back into the residual)
            self._stats["commits_refused"] += 1
            fate = "kept in the residual" if self._filter is not None else "dropped"
            log.warning("%s: commit on version %d refused (%s): %s", self.worker_id, version,
                        fate, _describe(reply))
            return None
        if isinstance(reply, ErrorReply) and reply.code == "bad_tensor":
            raise ChronosError(
                f"the coordinator refused this worker's hypergradient ({_describe(reply)}); "
                "does the worker's problem have the same outer parameters as the coordinator's?"
            )
        raise ChronosError(f"commit refused: {_describe(reply)}")

    def _log_ack(self, reply: CommitReply) -> None:
        """Append ``WORKER_ID COMMIT_ID STATUS VERSION`` to ``config.ack_log`` (one write with
        O_APPEND: lines of several workers never interleave)."""
        assert self.config.ack_log is not None
        line = f"{self.worker_id} {reply.commit_id} {reply.status} {reply.version}\n"
        fd = os.open(self.config.ack_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(fd)


def _describe(reply: Message) -> str:
    if isinstance(reply, ErrorReply):
        return f"{reply.code}: {reply.message}"
    return f"unexpected {reply.op} reply"
