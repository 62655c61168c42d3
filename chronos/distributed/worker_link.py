"""A worker's network thread: :class:`WorkerLink` owns the DEALER socket.

The compute thread never touches the socket (a ZeroMQ socket belongs to one thread). It queues
messages with :meth:`WorkerLink.send` and waits for replies on a per-request queue
(:meth:`WorkerLink.waiting`). The link thread sends what is queued, routes every reply to the
request id waiting for it, sends a heartbeat every ``heartbeat_interval`` seconds once
registered (so the lease lives through any inner solve), and records what the compute thread
needs to judge liveness: ``last_heard``, ``registration_lost`` (an ``unknown_worker`` answer
to a heartbeat sent after our latest registration), ``shutdown`` (a ShutdownNotice arrived; it
also sets the worker's stop event) and ``error`` (the thread crashed).
:meth:`WorkerLink.reset_connection` replaces the socket (ordered with the sends), dropping
whatever was queued for a dead peer. On the way out it sends a Deregister unless the
coordinator is shutting down.

Connecting. :meth:`WorkerLink.start` resolves the coordinator's host name first
(``socket.getaddrinfo``): a name that does not resolve is a :class:`ConfigError` at once, not a
minute of silence. A Register is written to a socket once: ZeroMQ queues it until the
connection is up and delivers it in order, so a copy re-sent on the same socket while the
coordinator is merely slow (or not up yet) would only reach it as a second Register of a live
id (``duplicate_worker``). The link therefore holds back a re-sent Register (same request id,
same socket); only after :data:`REGISTER_RESEND_S` seconds without a word from the coordinator
does it reopen the socket, which discards the copy still queued there, and send one copy on the
new socket (in case the coordinator restarted and lost the first). It logs, at INFO, how long
it has been waiting.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import queue
import socket
import threading
import time
from collections.abc import Iterator

from chronos.communication.accounting import ByteCounter
from chronos.core.errors import ChronosError, ConfigError
from chronos.distributed.messages import (
    Deregister,
    ErrorReply,
    Heartbeat,
    HeartbeatAck,
    Message,
    Register,
    Registered,
    ShutdownNotice,
)
from chronos.distributed.protocol import DecodeError
from chronos.distributed.transport import ClientTransport, CurveClientConfig
from chronos.distributed.worker_config import is_number

__all__ = ["REGISTER_RESEND_S", "WorkerLink", "resolve_address"]

log = logging.getLogger("chronos.worker")

_NET_POLL_MS = 5  # the thread's receive timeout: bounds the latency of a queued send
_LEAVE_LINGER_S = 0.1  # after a Deregister, keep the socket open this long so it is sent
REGISTER_RESEND_S = 5.0
"""Seconds of silence after which a re-sent Register goes out again, on a fresh socket."""
_WAIT_LOG_FIRST_S = 2.0  # first "still waiting for the coordinator" line after this long
_WAIT_LOG_EVERY_S = 5.0  # then one every this many seconds
_TRANSPORT_COUNTERS = ("bytes_sent", "bytes_received", "messages_sent", "messages_received",
                       "messages_dropped")


def resolve_address(address: str) -> None:
    """Check that the host of ``tcp://HOST:PORT`` resolves; :class:`ConfigError` (saying so)
    if it does not. ``*`` and IP literals pass without a lookup."""
    if not isinstance(address, str) or not address.startswith("tcp://"):
        return  # the transport reports a malformed address
    host, _, port = address[len("tcp://"):].rpartition(":")
    host = host.strip("[]")
    if not host or host == "*":
        return
    try:
        socket.getaddrinfo(host, port or None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(
            f"cannot resolve the coordinator host {host!r} in {address!r}: {reason}; check "
            "the name (or use an IP address)"
        ) from None


class WorkerLink:
    """The network thread: owns the DEALER socket, routes replies by request id, heartbeats.

    Shared with the compute thread (plain attributes, each written by one side only):
    ``ops`` (per-op byte counters over every socket, read with ``ops.by_op()``),
    ``last_heard`` (monotonic time of the last message from the coordinator), ``beating``,
    ``registration_lost`` (an ``unknown_worker`` reply to a heartbeat sent after our latest
    registration), ``shutdown`` / ``shutdown_reason``, ``error`` (the thread crashed).
    """

    def __init__(
        self,
        address: str,
        worker_id: str,
        curve: CurveClientConfig | None,
        stop_event: threading.Event,
        heartbeat_override: float | None,
    ) -> None:
        self.address = address
        self.worker_id = worker_id
        self.curve = curve
        self.stop_event = stop_event  # the worker's: set on a ShutdownNotice too
        self.heartbeat_override = heartbeat_override
        self.outbox: queue.Queue[Message | None] = queue.Queue()  # None: open a new socket
        self.waiters: dict[int, queue.Queue[Message]] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.shutdown = threading.Event()
        self.shutdown_reason = ""
        self.registration_lost = threading.Event()
        self.heartbeat_interval: float | None = None
        self.lease_timeout: float | None = None
        self.beating = False
        self.next_beat = 0.0
        self.registered_rid = 0  # request id of the Register that last succeeded (0: never)
        self.last_heard = -math.inf
        self.coordinator_version = -1
        self.deregister_on_exit = True
        self.counters: dict[str, int] = {
            "bytes_sent": 0, "bytes_received": 0, "messages_sent": 0, "messages_received": 0,
            "messages_dropped": 0, "heartbeats": 0, "decode_errors": 0, "stray_replies": 0,
            "sockets_opened": 0, "registers_held": 0,
        }
        # the Register on the current socket (request id, when written), the request id of the
        # registration attempt, when it began (monotonic s) and when we last logged that we wait
        self._register_rid = 0
        self._register_attempt = 0
        self._register_sent = -math.inf
        self._register_began = -math.inf
        self._register_logged = -math.inf
        self._closed_totals = {k: 0 for k in _TRANSPORT_COUNTERS}
        # per-op bytes / messages of every socket this link opened (each one adds to it)
        self.ops = ByteCounter("zmq")
        self._ids = itertools.count(1)
        self._ids_lock = threading.Lock()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"chronos-net-{worker_id}",
                                       daemon=True)

    # -- used by the compute thread -----------------------------------------------------------

    def next_id(self) -> int:
        with self._ids_lock:
            return next(self._ids)

    def start(self, timeout: float = 10.0) -> None:
        """Resolve the coordinator's host (a :class:`ConfigError` if it does not resolve),
        open the socket in the network thread and wait until it is ready."""
        resolve_address(self.address)
        self.thread.start()
        if not self.ready.wait(timeout):
            self.stop()
            raise ChronosError(f"the worker's network thread did not start within {timeout} s")
        if self.error is not None:
            self.thread.join(timeout)
            raise self.error

    def stop(self, timeout: float = 5.0) -> None:
        self.stopping.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout)
            if self.thread.is_alive():
                log.warning("%s: network thread did not stop within %.1f s", self.worker_id,
                            timeout)

    def send(self, msg: Message) -> None:
        self.outbox.put(msg)

    def reset_connection(self) -> None:
        """Close the socket and open a new one (in order with :meth:`send`): what was queued
        for a dead coordinator is dropped. The new connection must register again (a worker
        id belongs to the connection that registered it)."""
        self.outbox.put(None)

    @contextlib.contextmanager
    def waiting(self, request_id: int) -> Iterator[queue.Queue[Message]]:
        """Route replies with ``request_id`` to the yielded queue while inside the block."""
        q: queue.Queue[Message] = queue.Queue()
        with self.lock:
            self.waiters[request_id] = q
        try:
            yield q
        finally:
            with self.lock:
                self.waiters.pop(request_id, None)

    # -- the thread ---------------------------------------------------------------------------

    def _open(self) -> ClientTransport:
        # no routing identity of our own: the coordinator's ROUTER assigns one per connection
        # (unforgeable; the worker id is bound to this connection when it registers)
        transport = ClientTransport(self.address, curve=self.curve, counter=self.ops)
        self.counters["sockets_opened"] += 1
        return transport

    def _run(self) -> None:
        try:
            transport = self._open()
        except BaseException as e:  # reported by start()
            self.error = e
            self.ready.set()
            return
        self.ready.set()
        try:
            while not self.stopping.is_set():
                transport = self._drain(transport)
                interval = self.heartbeat_interval
                now = time.monotonic()
                if self.beating and interval is not None and now >= self.next_beat:
                    transport.send_message(Heartbeat(request_id=self.next_id(),
                                                     worker_id=self.worker_id))
                    self.counters["heartbeats"] += 1
                    self.next_beat = now + interval
                self._receive(transport, _NET_POLL_MS)
                self._sync_counters(transport)
            transport = self._leave(transport)
        except Exception as e:  # a bug or a broken socket: tell the compute thread, never hang
            self.error = e
            log.exception("%s: the network thread crashed", self.worker_id)
        finally:
            self._sync_counters(transport)
            transport.close()

    def _drain(self, transport: ClientTransport) -> ClientTransport:
        """Send what is queued; return the transport to use from now on."""
        while True:
            try:
                msg = self.outbox.get_nowait()
            except queue.Empty:
                return transport
            if msg is None:
                transport = self._reopen(transport)
            elif isinstance(msg, Register):
                action = self._register_action(msg)
                if action == "reopen":
                    transport = self._reopen(transport)
                    self._register_rid, self._register_sent = msg.request_id, time.monotonic()
                if action != "hold":
                    transport.send_message(msg)
            else:
                transport.send_message(msg)

    def _reopen(self, transport: ClientTransport) -> ClientTransport:
        """Close ``transport`` (what is queued on it is dropped) and open a new socket."""
        self._sync_counters(transport)
        for k in _TRANSPORT_COUNTERS:
            self._closed_totals[k] = self.counters[k]
        transport.close()
        self._register_rid = 0  # a new socket: its first Register goes out
        return self._open()

    def _register_action(self, msg: Register) -> str:
        """``"send"``, ``"hold"`` or ``"reopen"`` (then send) for this Register (see the module
        docstring); logs how long we have been waiting."""
        now = time.monotonic()
        if msg.request_id != self._register_rid:  # a new registration attempt, or a new socket
            if msg.request_id != self._register_attempt:
                self._register_attempt = msg.request_id
                self._register_began = self._register_logged = now
                log.debug("%s: registering with %s", self.worker_id, self.address)
            self._register_rid = msg.request_id
            self._register_sent = now
            return "send"
        waited = now - self._register_began
        if now - self._register_logged >= (
                _WAIT_LOG_FIRST_S if self._register_logged == self._register_began
                else _WAIT_LOG_EVERY_S):
            self._register_logged = now
            log.info("%s: no answer from %s yet after %.0f s; still trying", self.worker_id,
                     self.address, waited)
        if now - max(self._register_sent, self.last_heard) < REGISTER_RESEND_S:
            self.counters["registers_held"] += 1
            return "hold"
        return "reopen"

    def _receive(self, transport: ClientTransport, timeout_ms: int) -> None:
        try:
            reply = transport.recv_message(timeout_ms=timeout_ms)
        except DecodeError as e:
            self.counters["decode_errors"] += 1
            log.warning("%s: dropped an invalid message from the coordinator: %s",
                        self.worker_id, e)
            return
        if reply is not None:
            self.last_heard = time.monotonic()
            self._route(reply)

    def _leave(self, transport: ClientTransport) -> ClientTransport:
        """Send what is queued and, if still registered, a Deregister so that our lease does
        not hold the version window (or a sync barrier) until it expires."""
        transport = self._drain(transport)
        if not self.deregister_on_exit or self.registered_rid == 0 or self.shutdown.is_set():
            return transport
        transport.send_message(Deregister(request_id=self.next_id(), worker_id=self.worker_id))
        # the socket closes with LINGER 0: give ZeroMQ's I/O thread a moment to write it
        deadline = time.monotonic() + _LEAVE_LINGER_S
        while (left := deadline - time.monotonic()) > 0:
            transport.recv(timeout_ms=max(1, int(left * 1000)))
        return transport

    def _sync_counters(self, transport: ClientTransport) -> None:
        stats = transport.stats()
        for k in _TRANSPORT_COUNTERS:
            self.counters[k] = self._closed_totals[k] + stats.get(k, 0)

    def _route(self, msg: Message) -> None:
        if isinstance(msg, ShutdownNotice):
            if not self.shutdown.is_set():  # keep the first reason ("job done: ...")
                self.shutdown_reason = msg.reason or "the coordinator stopped"
            self.shutdown.set()
            self.stop_event.set()
            with self.lock:
                targets = list(self.waiters.values())
            for q in targets:
                q.put(msg)
            return
        if isinstance(msg, HeartbeatAck):
            self.coordinator_version = msg.version
        elif isinstance(msg, Registered):
            interval = self.heartbeat_override or msg.config.get("heartbeat_interval")
            self.heartbeat_interval = float(interval) if is_number(interval) else 1.0
            lease = msg.config.get("lease_timeout")
            self.lease_timeout = float(lease) if is_number(lease) else None
            self.coordinator_version = msg.version
            self.registered_rid = max(self.registered_rid, msg.request_id)
            self.registration_lost.clear()
            self.next_beat = time.monotonic() + self.heartbeat_interval
            self.beating = True
        with self.lock:
            waiter = self.waiters.get(msg.request_id)
        if waiter is not None:
            waiter.put(msg)
            return
        self.counters["stray_replies"] += 1  # heartbeat acks, late answers to re-sent requests
        if (isinstance(msg, ErrorReply) and msg.code == "unknown_worker" and self.beating
                and msg.request_id > self.registered_rid):
            # a heartbeat sent after our registration was refused: the coordinator restarted or
            # let our lease expire; the compute thread registers again
            if not self.registration_lost.is_set():
                log.warning("%s: the coordinator no longer knows this worker (%s)",
                            self.worker_id, msg.message)
            self.registration_lost.set()
