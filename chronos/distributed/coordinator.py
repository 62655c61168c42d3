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
decoder), are counted in :meth:`Coordinator.stats` and logged once each; they change no state.

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
import threading
import time
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
from chronos.distributed.messages import ErrorReply, ShutdownNotice
from chronos.distributed.protocol import (
    DEFAULT_LIMITS,
    DecodeError,
    DecodeLimits,
    decode,
    encode,
    error_reply,
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


class _Unset(enum.Enum):
    """Marks a keyword setting the caller did not pass (so ``config=`` can refuse one)."""

    UNSET = "<unset>"

    def __repr__(self) -> str:
        return "<unset>"


_UNSET: Final = _Unset.UNSET


def _identity_name(identity: bytes) -> str:
    try:
        return identity.decode("utf-8")
    except UnicodeDecodeError:
        return "0x" + identity.hex()


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
        self._state = CoordinatorState(
            outer_params, config, codecs=codecs, max_delta_lag=max_delta_lag
        )
        self.config = config
        self._bind = (host, port, allow_remote, curve, limits)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._transport: ServerTransport | None = None
        self._startup_error: BaseException | None = None
        self._address: str | None = None
        self._identities: dict[str, bytes] = {}
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
        try:
            self._transport = ServerTransport(
                host=host, port=port, curve=curve, allow_remote=allow_remote, limits=limits
            )
            self._address = self._transport.address
        except BaseException as e:  # reported to start()'s caller
            self._startup_error = e
            self._ready.set()
            return
        self._started_at = time.monotonic()
        self._ready.set()
        transport = self._transport
        poll_s = min(0.05, self.config.heartbeat_interval / 4)
        poll_ms = max(1, int(poll_s * 1000))
        next_tick = 0.0
        try:
            while not self._stop.is_set():
                # everything already queued (at most _BATCH), each answered as soon as handled
                for identity, frames in transport.poll(timeout_ms=poll_ms, max_messages=_BATCH):
                    self._on_frames(identity, frames)
                now = time.monotonic()
                if now >= next_tick:  # handle() already does what tick() would at its time
                    with self._lock:
                        out = self._state.tick(now)
                    self._send_all(out)
                    next_tick = now + poll_s
            self._shutdown_workers()
        except Exception:  # a bug, not a peer's doing: never die silently
            log.exception("coordinator loop crashed")
        finally:
            transport.close()
            self._done.set()

    def _on_frames(self, identity: bytes, frames: Any) -> None:
        assert self._transport is not None
        name = _identity_name(identity)
        try:
            # tensor values are checked by the state machine (check_hypergradient refuses
            # NaN/Inf in a commit, the only inbound message with tensors; it refuses the others
            # unread): one finiteness pass over a big hypergradient instead of two
            msg = decode(frames, self._transport.limits, check_finite=False)
        except DecodeError as e:
            self._net["decode_errors"] += 1
            log.warning("refused a message from %s: %s (%s)", name, e.code, e)
            self._transport.send(identity, encode(error_reply(e)))
            return
        self._identities[name] = identity
        with self._lock:  # owned: the decoded tensors are ours alone (reused, not copied)
            out = self._state.handle(name, msg, time.monotonic(), owned=True)
        self._send_all(out)

    def _send_all(self, out: list[Outgoing]) -> None:
        assert self._transport is not None
        for o in out:
            if isinstance(o.message, ErrorReply):
                log.warning("error reply to %s: %s: %s", o.to, o.message.code, o.message.message)
            identity = self._identities.get(o.to, o.to.encode("utf-8"))
            self._transport.send(identity, encode(o.message))
        if self._state.done and not self._done.is_set():
            self._done.set()

    def _shutdown_workers(self) -> None:
        assert self._transport is not None
        with self._lock:
            workers = self._state.workers
        for w in workers:
            identity = self._identities.get(w, w.encode("utf-8"))
            self._transport.send(identity, encode(ShutdownNotice(request_id=-1,
                                                                 reason="coordinator stopped")))
