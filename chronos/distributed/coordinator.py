"""The coordinator: a ZeroMQ ROUTER poll loop around :class:`~.state.CoordinatorState`.

All decisions (versions, staleness weights, the version window, the sync barrier, leases,
idempotent commits) live in the pure state machine; this module only carries its instructions
out. One background thread owns the socket: it receives frames, decodes them
(:func:`~.protocol.decode` validates everything first), hands each message to
:meth:`CoordinatorState.handle` with the current monotonic time, and sends what comes back.
Between messages it calls :meth:`CoordinatorState.tick` so leases expire and deferred checkouts
are granted on time. It never blocks on one worker: deferred checkouts are answered later,
from whichever event frees the version window.

Unparseable or invalid frames get an :class:`~.messages.ErrorReply` (code and message from the
decoder), are counted in :meth:`Coordinator.stats` and logged; they change no state.

Hostile peers (see RELIABILITY.md): a peer is known by the routing id the ROUTER gave its
connection (hex in logs), never by what it claims; worker ids are bound to connections (and
CURVE keys) by the state machine. Error log lines are cut and rate-limited per error code
(:class:`~.guard.LogLimiter`: ``log_lines_suppressed``), error replies per peer
(:class:`~.guard.PeerBudget`: ``error_replies_throttled``), message sizes default to
:func:`~.protocol.limits_for` λ and each peer's backlog to 64 messages. A closed connection
(the transport's monitor, confirmed by a probe that fails) lets its worker go at once; ZeroMQ
heartbeats close connections silent for 1.5 heartbeat intervals.

Durability (``state_dir=``): the state machine journals every change that must survive
(:mod:`~.journal`); the loop writes the records of each batch of messages, flushes them (one
fsync per batch with ``journal_sync="batch"``, the default group commit; ``"always"``: one per
record; ``"none"``: none) and only then sends the replies, so an acknowledged commit is on disk.
Every ``snapshot_every`` versions, and at :meth:`Coordinator.stop`, a snapshot is written and
the log restarted. A coordinator created on an existing ``state_dir`` restores the newest
snapshot and replays the log (:attr:`Coordinator.restored`), before it binds.

Defaults (every one from :mod:`chronos.distributed.defaults`): window 3, staleness 4, decay
0.5 (``aggregation="buffered"`` only), ``aggregation="latest"`` (every async step averages each
live worker's latest hypergradient), ``min_commits="auto"`` (``ceil(live workers / 2)`` new
commits per step), Adam with step 0.05 on λ unless ``problem=`` names its own outer step (or
``optimizer`` / ``outer_lr`` are given).

Example (a worker normally does the talking; see :mod:`chronos.distributed.worker`):
    >>> c = Coordinator({"lr": 0.01}, port=0)
    >>> c.start().address.startswith("tcp://127.0.0.1:")
    True
    >>> c.version, round(float(c.outer_params["lr"]), 6), c.config.outer_optimizer()
    (0, 0.01, ('adam', 0.05))
    >>> c.stop()
    >>> try:                                  # a config and a keyword setting: which one wins?
    ...     Coordinator({"lr": 0.01}, config=CoordinatorConfig(), max_staleness=7)
    ... except ConfigError as e:
    ...     print(str(e)[:70])
    Coordinator(config=...) also got max_staleness=7; put it in the config
"""

from __future__ import annotations

import enum
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, Final, Literal

from torch import Tensor

from chronos.communication.accounting import totals
from chronos.continuum.timescale import MultiTimescaleConfig
from chronos.core.errors import ChronosError, ConfigError
from chronos.core.problem import OptimizerSpec
from chronos.core.tensordict import TensorDict
from chronos.distributed.defaults import resolve_outer_optimizer
from chronos.distributed.guard import LogLimiter, PeerBudget
from chronos.distributed.journal import Journal, SyncPolicy
from chronos.distributed.messages import ErrorReply, HeartbeatAck, ShutdownNotice
from chronos.distributed.protocol import (
    DEFAULT_LIMITS,
    DecodeError,
    DecodeLimits,
    decode,
    encode,
    error_reply,
    limits_for,
)
from chronos.distributed.state import (
    DEFAULT_MAX_DELTA_LAG,
    CoordinatorConfig,
    CoordinatorState,
    Outgoing,
)
from chronos.distributed.transport import CurveServerConfig, ServerTransport

__all__ = ["Coordinator"]

log = logging.getLogger("chronos.coordinator")

_BATCH = 256  # messages handled per wake-up before the loop looks at the clock again
_RECENT_FDS = 4096


class _Unset(enum.Enum):
    """Marks a keyword setting the caller did not pass (so ``config=`` can refuse one)."""

    UNSET = "<unset>"

    def __repr__(self) -> str:
        return "<unset>"


_UNSET: Final = _Unset.UNSET


class Coordinator:
    """Owns the versioned outer parameters and serves workers over ZeroMQ.

    Args:
        outer_params: λ as tensors or numbers, e.g. ``{"lr": 0.01}`` (default: ``problem``'s
            ``default_outer_params()``).
        port: TCP port (0: a free one; read :attr:`address` after :meth:`start`).
        host: interface to bind; 127.0.0.1 unless ``allow_remote=True``.
        max_in_flight, max_staleness, decay: bounded asynchrony (see
            :class:`~chronos.core.versioning.BoundedVersionQueue`); defaults 3, 4, 0.5.
        mode: ``"async"`` or ``"sync"`` (the barrier baseline; needs ``num_workers``).
        num_workers: workers per sync barrier.
        outer_lr, optimizer: the outer optimizer over λ. Left out (or ``None``): the
            ``problem``'s ``default_outer_lr`` / ``default_outer_optimizer`` when a problem is
            given, else Adam with step 0.05 (see
            :func:`~chronos.distributed.defaults.resolve_outer_optimizer`). A
            :class:`~chronos.continuum.MultiTimescaleConfig` updates each group of λ at its
            own frequency, with its own optimizer and step size (``outer_lr`` not used).
        min_commits: commits aggregated per async outer step: an int, or ``"auto"`` (default:
            ``ceil(live workers / 2)``, see :class:`~.state.CoordinatorConfig`).
        max_steps: after this many outer steps the job is done and workers are told to stop.
        lease_timeout, heartbeat_interval: liveness (seconds; defaults 20 and 2).
        stale_correction: correct stale commits to the current λ with each worker's history
            instead of only down-weighting them (see :mod:`~.correction`; default off).
        aggregation: ``"latest"`` (default: each async step averages every live worker's
            latest hypergradient, so a slow worker's shard counts as much as a fast one's; see
            :mod:`~.latest`) or ``"buffered"`` (the commits since the last step, weighted
            ``decay ** s``).
        problem: an :class:`~chronos.core.InnerProblem` (or anything with
            ``default_outer_params()`` / ``default_outer_lr``) whose defaults to use.
        allow_remote: permit binding a non-loopback ``host``.
        curve: CURVE keys / client allow-list (see :class:`~.transport.CurveServerConfig`).
        limits: decoder size limits.
        config: a ready :class:`~.state.CoordinatorConfig`. Then none of the settings above
            (``mode`` … ``aggregation``) may be passed as well: that raises
            :class:`~chronos.core.errors.ConfigError` instead of silently dropping one (put
            it in the config, or ``dataclasses.replace(config, ...)``). ``problem`` then only
            supplies ``outer_params``.
        codecs: codec specs workers may register with (``None``: every built-in; a worker
            naming another gets ``ErrorReply(code="unsupported_codec")``). Commits are decoded
            with the worker's codec; checkouts of workers with a lossy codec are coded deltas
            (see :mod:`~.state`, "Codecs" and "Delta checkouts").
        max_delta_lag: a worker more than this many versions behind gets a full λ, not a delta.
        state_dir: make the state durable in this directory (created if missing; one
            coordinator at a time): restored from it on construction, journaled while running.
        journal_sync: ``"batch"`` (default: one fsync per batch of messages), ``"always"`` (one
            per record) or ``"none"`` (leave it to the OS: survives a process crash, not a
            power loss).
        snapshot_every: versions between snapshots (each ends a log segment).
        key_names: CURVE public key (Z85 str) → the worker id it may register (see
            :class:`~chronos.distributed.keys.KeyRing`).
    """

    def __init__(
        self,
        outer_params: Mapping[str, Tensor | float] | None = None,
        port: int = 5555,
        host: str = "127.0.0.1",
        *,
        max_in_flight: int | _Unset = _UNSET,
        max_staleness: int | _Unset = _UNSET,
        decay: float | _Unset = _UNSET,
        mode: Literal["async", "sync"] | _Unset = _UNSET,
        num_workers: int | _Unset | None = _UNSET,
        outer_lr: float | _Unset | None = _UNSET,
        optimizer: OptimizerSpec | MultiTimescaleConfig | _Unset | None = _UNSET,
        min_commits: int | Literal["auto"] | _Unset = _UNSET,
        max_steps: int | _Unset | None = _UNSET,
        lease_timeout: float | _Unset = _UNSET,
        heartbeat_interval: float | _Unset = _UNSET,
        stale_correction: bool | _Unset = _UNSET,
        aggregation: Literal["latest", "buffered"] | _Unset = _UNSET,
        problem: Any = None,
        allow_remote: bool = False,
        curve: CurveServerConfig | None = None,
        limits: DecodeLimits = DEFAULT_LIMITS,
        config: CoordinatorConfig | None = None,
        codecs: Iterable[str] | None = None,
        max_delta_lag: int = DEFAULT_MAX_DELTA_LAG,
        state_dir: str | os.PathLike[str] | None = None,
        journal_sync: SyncPolicy = "batch",
        snapshot_every: int = 100,
        key_names: Mapping[str, str] | None = None,
    ) -> None:
        settings: dict[str, Any] = {
            "mode": mode,
            "num_workers": num_workers,
            "max_in_flight": max_in_flight,
            "max_staleness": max_staleness,
            "decay": decay,
            "lease_timeout": lease_timeout,
            "heartbeat_interval": heartbeat_interval,
            "outer_lr": outer_lr,
            "optimizer": optimizer,
            "min_commits": min_commits,
            "max_steps": max_steps,
            "stale_correction": stale_correction,
            "aggregation": aggregation,
        }
        given = {k: v for k, v in settings.items() if v is not _UNSET}
        if config is not None:
            if given:
                listed = ", ".join(f"{k}={v!r}" for k, v in given.items())
                raise ConfigError(
                    f"Coordinator(config=...) also got {listed}; put it in the config "
                    f"(dataclasses.replace(config, {', '.join(f'{k}=...' for k in given)})) or "
                    "pass keyword settings without config= — not both, so that none is "
                    "silently ignored"
                )
        else:
            given["optimizer"], given["outer_lr"] = resolve_outer_optimizer(
                given.get("optimizer"), given.get("outer_lr"), problem
            )
            config = CoordinatorConfig(**given)
        if outer_params is None:
            if problem is None or not callable(getattr(problem, "default_outer_params", None)):
                raise ConfigError(
                    "Coordinator needs outer_params (e.g. {'lr': 0.01}) or a problem= with "
                    "default_outer_params()"
                )
            outer_params = problem.default_outer_params()
        if type(snapshot_every) is not int or snapshot_every < 1:
            raise ConfigError(f"snapshot_every must be an int >= 1, got {snapshot_every!r}")
        if journal_sync not in ("always", "batch", "none"):
            raise ConfigError(f"journal_sync must be 'always', 'batch' or 'none', got "
                              f"{journal_sync!r}")
        self._state = CoordinatorState(
            outer_params, config, codecs=codecs, max_delta_lag=max_delta_lag,
            durable=state_dir is not None, key_names=key_names,
        )
        self.config = config
        if limits is DEFAULT_LIMITS:
            limits = limits_for(self._state.outer_params)
        self.limits = limits
        """The decoder's bounds (default: :func:`limits_for` λ)."""
        self._journal: Journal | None = None
        self._snapshot_every = snapshot_every
        self.restored: dict[str, Any] | None = None
        """With ``state_dir``: what was restored (``version``, ``snapshot``, ``records``)."""
        if state_dir is not None:
            self._journal = Journal(state_dir, sync=journal_sync)
            try:
                tree, records = self._journal.restore()
                n = self._state.restore(tree, records)
            except BaseException:
                self._journal.close()
                raise
            self.restored = {"version": self._state.version,
                             "snapshot": None if tree is None else int(tree["meta"]["version"]),
                             "records": n}
            if tree is not None or n:
                log.info("restored version %d from %s (snapshot %s + %d log records)",
                         self._state.version, self._journal.path, self.restored["snapshot"], n)
        self._last_snapshot = self._state.version
        self._bind = (host, port, allow_remote, curve, limits)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._transport: ServerTransport | None = None
        self._startup_error: BaseException | None = None
        self._address: str | None = None
        self._fds: dict[str, int] = {}  # registered workers' connections -> socket fd
        # the fds of the last connections heard from (registered or not): a close of one of
        # those that is no worker's needs no probe
        self._recent_fds: OrderedDict[int, str] = OrderedDict()
        self._suspects: dict[str, list[float]] = {}  # connection -> times to probe it again
        self._outbox: list[Outgoing] = []  # durable: sent once their records are flushed
        self._logs = LogLimiter()
        self._budget = PeerBudget()
        self._next_prune = 0.0
        self._net: dict[str, int] = {
            "bytes_received": 0,
            "bytes_sent": 0,
            "messages_received": 0,
            "messages_sent": 0,
            "messages_dropped": 0,
            "decode_errors": 0,
        }  # the transport's live counters replace the zeros once it exists
        self._started_at: float | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> Coordinator:
        """Bind and start serving in a background thread; return once bound (``self``)."""
        if self._thread is not None:
            raise ChronosError("Coordinator.start() was already called; create a new one")
        self._thread = threading.Thread(target=self._run, name="chronos-coordinator", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self._stop.set()
            raise ChronosError(f"coordinator did not bind within {timeout} s")
        if self._startup_error is not None:
            self._thread.join(timeout)
            raise self._startup_error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Tell workers to stop, close the socket and join the thread (idempotent)."""
        self._stop.set()
        thread = self._thread
        if thread is None and self._journal is not None:  # never started: release state_dir
            self._journal.close()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.warning("coordinator thread did not stop within %.1f s", timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job is done (``max_steps`` reached) or the coordinator stopped."""
        return self._done.wait(timeout)

    def wait_for_version(self, version: int, timeout: float | None = None) -> bool:
        """Block until the outer state reaches ``version``; return whether it did."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.version < version:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            if self._stop.is_set():
                return self.version >= version
            time.sleep(0.01)
        return True

    def __enter__(self) -> Coordinator:
        return self.start() if self._thread is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- views -------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """``tcp://host:port`` the coordinator is bound to (after :meth:`start`)."""
        if self._address is None:
            raise ChronosError("the coordinator is not bound yet; call start() first")
        return self._address

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    @property
    def version(self) -> int:
        with self._lock:
            return self._state.version

    @property
    def outer_params(self) -> TensorDict:
        """A copy of the current λ."""
        with self._lock:
            return self._state.outer_params

    @property
    def history(self) -> list[dict[str, Any]]:
        """Per-version records (step metrics) of the outer state."""
        with self._lock:
            return self._state.history

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict[str, Any]:
        """Counters: state machine decisions plus bytes/messages on the wire: totals
        (``bytes_sent`` …), ``bytes_by_op`` (op → ``sent`` / ``received`` /
        ``messages_sent`` / ``messages_received``) and ``bytes_by_channel`` (``{"zmq": the
        same four, summed}``)."""
        with self._lock:
            out = dict(self._state.stats())
        out.update(self._net)
        if self._transport is not None:  # plain int attributes: safe to read from any thread
            out.update(self._transport.stats())
            by_op = self._transport.bytes_by_op()
        else:
            by_op = {}
        out["bytes_by_op"] = by_op  # op -> sent / received / messages_sent / messages_received
        out["log_lines_suppressed"] = self._logs.suppressed
        out["error_replies_throttled"] = self._budget.refused
        if self._journal is not None:
            out["journal"] = dict(self._journal.stats)
            out["restored"] = self.restored
        out["bytes_by_channel"] = {"zmq": totals(by_op)}
        out["uptime_s"] = 0.0 if self._started_at is None else time.monotonic() - self._started_at
        return out

    def state_dict(self) -> dict[str, Any]:
        """A checkpoint of the outer state (λ, version, optimizer state, history)."""
        with self._lock:
            return self._state.state_dict()

    # -- the loop (runs in the coordinator thread, which owns the socket) --------------------

    def _run(self) -> None:
        host, port, allow_remote, curve, limits = self._bind
        hb = self.config.heartbeat_interval
        try:
            self._transport = ServerTransport(
                host=host, port=port, curve=curve, allow_remote=allow_remote, limits=limits,
                peer_timeout_ms=max(2, int(1500 * hb)),
            )
            self._address = self._transport.address
        except BaseException as e:  # reported to start()'s caller
            self._startup_error = e
            self._ready.set()
            if self._journal is not None:
                self._journal.close()
            return
        self._started_at = time.monotonic()
        self._ready.set()
        transport = self._transport
        poll_s = min(0.05, hb / 4)
        poll_ms = max(1, int(poll_s * 1000))
        next_tick = 0.0
        try:
            while not self._stop.is_set():
                # everything already queued (at most _BATCH), each answered as soon as handled
                # (durable: once the batch's records are on disk, one flush for all)
                for identity, frames in transport.poll(timeout_ms=poll_ms, max_messages=_BATCH):
                    self._on_frames(identity, frames)
                now = time.monotonic()
                gone = transport.disconnected()
                if gone or self._suspects:
                    self._probe(gone, now)
                if now >= next_tick:  # handle() already does what tick() would at its time
                    with self._lock:
                        out = self._state.tick(now)
                    self._send_all(out)
                    next_tick = now + poll_s
                    if now >= self._next_prune:
                        self._budget.prune(now)
                        self._next_prune = now + 5.0
                self._flush()
            self._shutdown_workers()
        except Exception:  # a bug, not a peer's doing: never die silently
            log.exception("coordinator loop crashed")
        finally:
            try:
                self._close_journal()
            finally:
                transport.close()
                self._done.set()

    def _on_frames(self, identity: bytes, frames: Any) -> None:
        assert self._transport is not None
        transport = self._transport
        conn = identity.hex()  # never the peer's own words: hex cannot be spoofed into another
        fd = transport.last_fds.pop(identity, None)
        principal = transport.last_users.pop(identity, None)
        try:
            # tensor values are checked by the state machine (check_hypergradient refuses
            # NaN/Inf in a commit, the only inbound message with tensors; it refuses the others
            # unread): one finiteness pass over a big hypergradient instead of two
            msg = decode(frames, transport.limits, check_finite=False)
        except DecodeError as e:
            self._net["decode_errors"] += 1
            now = time.monotonic()
            line = self._logs.admit(e.code, f"refused a message from connection {conn}: "
                                    f"{e.code} ({e})", now)
            if line is not None:
                log.warning("%s", line)
            if self._budget.spend(conn, now):
                transport.send(identity, encode(error_reply(e)))
            return
        try:
            with self._lock:  # owned: the decoded tensors are ours alone (reused, not copied)
                out = self._state.handle(conn, msg, time.monotonic(), owned=True,
                                         principal=principal)
                bound = self._state.worker_of(conn) is not None
        except Exception:  # a bug in the state machine: report it, keep serving the others
            self._net["internal_errors"] = self._net.get("internal_errors", 0) + 1
            line = self._logs.admit("internal", f"internal error handling {msg.op} from "
                                    f"connection {conn}", time.monotonic())
            if line is not None:
                log.exception("%s", line)
            return
        if fd is not None:
            self._recent_fds[fd] = conn
            self._recent_fds.move_to_end(fd)
            if len(self._recent_fds) > _RECENT_FDS:
                self._recent_fds.popitem(last=False)
        if bound and fd is not None:
            self._fds[conn] = fd
        elif not bound:
            self._fds.pop(conn, None)
        self._send_all(out)

    def _probe(self, fds: list[int], now: float) -> None:
        """Connections closed (``fds``) or still suspected: find the registered workers whose
        connection is gone (a probe to them fails at once) and let them go. A closed fd names
        its worker; a probe that still gets through is repeated 50 ms and 0.5 s later (the
        socket may not have processed the close yet)."""
        assert self._transport is not None
        for fd in fds:
            named = [c for c, f in self._fds.items() if f == fd]
            if not named and fd not in self._recent_fds:
                named = list(self._fds)  # a connection we cannot place: check every worker
            self._recent_fds.pop(fd, None)
            for conn in named:
                self._suspects.setdefault(conn, [now, now + 0.05, now + 0.5])
        due = [c for c, times in self._suspects.items() if times[0] <= now]
        if not due:
            return
        with self._lock:
            probe = encode(HeartbeatAck(request_id=-1, version=self._state.version))
        for conn in due:
            times = self._suspects[conn]
            times.pop(0)
            if self._transport.reachable(bytes.fromhex(conn), probe):
                if not times:
                    del self._suspects[conn]
                continue
            del self._suspects[conn]
            self._fds.pop(conn, None)
            with self._lock:
                out = self._state.disconnected(conn, time.monotonic())
            log.info("connection %s closed: its worker left at once", conn)
            self._send_all(out)

    def _send_all(self, out: list[Outgoing]) -> None:
        """Send (durable: queue until :meth:`_flush` wrote the events' records)."""
        if self._journal is not None:
            self._outbox.extend(out)
        else:
            self._deliver(out)
        if self._state.done and not self._done.is_set() and self._journal is None:
            self._done.set()

    def _flush(self) -> None:
        """Durable: write the journal records of everything handled since the last flush
        (one fsync with ``journal_sync="batch"``), then send the replies they acknowledge;
        snapshot every ``snapshot_every`` versions."""
        journal = self._journal
        if journal is None:
            return
        with self._lock:
            records = self._state.drain_records()
            version = self._state.version
        for r in records:
            journal.append(r)
        if records:
            journal.flush()
        out, self._outbox = self._outbox, []
        self._deliver(out)
        if version - self._last_snapshot >= self._snapshot_every:
            self._snapshot()
        if self._state.done and not self._done.is_set():
            self._done.set()

    def _snapshot(self) -> None:
        assert self._journal is not None
        with self._lock:
            tree = self._state.durable_state()
            version = self._state.version
        self._journal.snapshot(tree, version)
        self._last_snapshot = version

    def _close_journal(self) -> None:
        if self._journal is None:
            return
        try:
            self._flush()
            if self._state.version != self._last_snapshot:
                self._snapshot()  # a clean stop leaves (almost) nothing to replay
        finally:
            self._journal.close()

    def _deliver(self, out: list[Outgoing]) -> None:
        assert self._transport is not None
        now = time.monotonic()
        for o in out:
            if isinstance(o.message, ErrorReply):
                if not self._budget.spend(o.to, now):
                    continue
                line = self._logs.admit(o.message.code, f"error reply to connection {o.to}: "
                                        f"{o.message.code}: {o.message.message}", now)
                if line is not None:
                    log.warning("%s", line)
            self._transport.send(bytes.fromhex(o.to), encode(o.message))

    def _shutdown_workers(self) -> None:
        assert self._transport is not None
        self._flush()
        with self._lock:
            conns = list(self._state.connections.values())
        for conn in conns:
            self._transport.send(bytes.fromhex(conn), encode(
                ShutdownNotice(request_id=-1, reason="coordinator stopped")))
