"""ZeroMQ transport: the coordinator's ROUTER and the workers' DEALER. The only zmq importer.

A :class:`ServerTransport` (ROUTER, the coordinator) binds; a :class:`ClientTransport`
(DEALER, a worker) connects. Both move *lists of frames* (see :mod:`.protocol` for what the
frames mean) and count what they move: ``bytes_sent`` / ``bytes_received`` are the sums of the
message frames' lengths (the ROUTER's routing-identity frame is local bookkeeping, never
counted), ``messages_sent`` / ``messages_received`` the number of messages. So a client's
``bytes_sent`` equals the server's ``bytes_received`` for the same traffic. The same figures
are kept per op name (read from the header with :func:`.protocol.peek_op`, O(1); a message
without a known op is counted as ``"invalid"``) in a
:class:`~chronos.communication.accounting.ByteCounter` for the channel ``"zmq"``:
:meth:`bytes_by_op` (``{op: {"sent", "received", "messages_sent", "messages_received"}}``),
whose sums are the totals. A client can be handed a counter that outlives it
(``ClientTransport(counter=...)``), so a worker's per-op figures survive reconnects.

``send_message`` / ``recv_message`` (methods, and module-level functions) wrap
:func:`.protocol.encode` / :func:`.protocol.decode`.

Rules the callers must know:

* **Threads.** A ZeroMQ socket belongs to one thread. The coordinator's loop thread owns the
  server transport (create it there, or create it and hand it over before first use, and close
  it there); a worker's transport belongs to the thread that runs its loop. Stop a loop by
  setting a flag it checks between ``recv`` calls with a short ``timeout_ms`` — never call a
  transport from two threads.
* **Identity.** The server receives ``(identity, frames)``; reply to the *identity the request
  came from*. A client without an explicit ``identity`` gets a random one from the ROUTER, and a
  new one after a reconnect, so map worker ids to identities per message, never once.
  ``ROUTER_HANDOVER`` is off: a second connection cannot take over a live identity (workers
  set none; the server binds worker ids to connections).
* **Unknown peers.** ``ROUTER_MANDATORY`` is on: ``ServerTransport.send`` returns ``False``
  (and counts ``messages_dropped``) instead of silently dropping a message to a peer that is not
  (or no longer) connected, or whose queue is full (high-water mark); it never blocks.
* **Zero-copy.** Frames of 64 KiB and more are sent without copying: do not modify the tensors
  behind them in place until the peer has them (send a snapshot); decoded tensors alias the
  received frames.
* **Security.** The server binds 127.0.0.1 by default and refuses a non-loopback address unless
  ``allow_remote=True``. With :class:`CurveServerConfig` / :class:`CurveClientConfig` traffic is
  CURVE-encrypted; with ``allowed_client_keys`` only listed client keys may connect (ZAP).
* **Size.** ``MAXMSGSIZE`` is set to ``limits.max_total_bytes``: a peer sending a larger single
  frame is disconnected by ZeroMQ (no reply); anything smaller is validated by ``decode``.
* **Reconnects** are ZeroMQ's: a client retries every ``reconnect_ivl_ms``, backing off to
  ``reconnect_ivl_max_ms``; messages sent while disconnected queue (up to the high-water mark).
* ``close()`` is idempotent, uses ``LINGER=0`` and terminates the transport's own context, so
  nothing hangs at interpreter exit (a finalizer closes forgotten transports too).

Example:
    >>> from chronos.distributed.messages import Heartbeat, HeartbeatAck
    >>> with ServerTransport() as server, ClientTransport(server.address) as client:
    ...     client.send_message(Heartbeat(request_id=1, worker_id="w0"))
    ...     identity, msg = server.recv_message(timeout_ms=5000)
    ...     server.send_message(identity, HeartbeatAck(request_id=msg.request_id, version=0))
    ...     client.recv_message(timeout_ms=5000)
    True
    True
    HeartbeatAck(request_id=1, version=0)
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import logging
import secrets
import struct
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, cast

import zmq
import zmq.auth.thread

from chronos.communication.accounting import ByteCounter
from chronos.core.errors import ChronosError, ConfigError
from chronos.distributed.messages import Message
from chronos.distributed.protocol import (
    DEFAULT_LIMITS,
    INVALID_OP,
    DecodeError,
    DecodeLimits,
    decode,
    encode,
    peek_op,
)

__all__ = [
    "ClientTransport",
    "CurveClientConfig",
    "CurveServerConfig",
    "ServerTransport",
    "TransportClosedError",
    "curve_keypair",
    "recv_message",
    "send_message",
]

_NOBLOCK_MORE = zmq.NOBLOCK | zmq.SNDMORE

log = logging.getLogger("chronos.transport")

_SERVER_COPY = -1
"""``first_copy`` of a server receive: the identity frame uncopied (its connection's fd and
CURVE key are read from it), the header copied, tensor frames zero-copy."""

Frames = list[Any]
"""A message's frames as received: ``bytes`` (header) and ``zmq.Frame`` (tensor frames)."""


class TransportClosedError(ChronosError, RuntimeError):
    """A transport was used after :meth:`close`."""


# -- CURVE ----------------------------------------------------------------------------------------


def _check_key(key: object, what: str) -> bytes:
    if isinstance(key, str):
        key = key.encode("ascii")
    if not isinstance(key, bytes) or len(key) != 40:
        raise ConfigError(
            f"{what} must be a 40-character Z85 CURVE key (bytes or str), got {key!r:.60}; "
            "make a pair with chronos.distributed.transport.curve_keypair()"
        )
    try:
        zmq.utils.z85.decode(key)
    except Exception:
        raise ConfigError(f"{what} is not valid Z85: {key!r}") from None
    return key


def curve_keypair() -> tuple[bytes, bytes]:
    """A new CURVE key pair ``(public_key, secret_key)``, both 40-byte Z85.

    >>> public, secret = curve_keypair()
    >>> len(public), len(secret)
    (40, 40)
    """
    if not zmq.has("curve"):
        raise ConfigError("this libzmq has no CURVE support; install pyzmq with libsodium")
    public, secret = zmq.curve_keypair()
    return public, secret


@dataclass(frozen=True)
class CurveServerConfig:
    """CURVE for the coordinator: its key pair and, optionally, the client keys it admits.

    Args:
        public_key: the server's public key (give it to workers).
        secret_key: the server's secret key (keep it on the server).
        allowed_client_keys: client public keys allowed to connect; ``None`` admits any client
            that knows the server's public key (encryption without client authentication).
    """

    public_key: bytes
    secret_key: bytes
    allowed_client_keys: frozenset[bytes] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "public_key", _check_key(self.public_key, "public_key"))
        object.__setattr__(self, "secret_key", _check_key(self.secret_key, "secret_key"))
        if self.allowed_client_keys is not None:
            keys = frozenset(
                _check_key(k, "allowed_client_keys entry") for k in self.allowed_client_keys
            )
            if not keys:
                raise ConfigError(
                    "allowed_client_keys is empty: no worker could connect; "
                    "list client public keys, or pass None to admit any key"
                )
            object.__setattr__(self, "allowed_client_keys", keys)


@dataclass(frozen=True)
class CurveClientConfig:
    """CURVE for a worker: the server's public key and the worker's own key pair."""

    server_public_key: bytes
    public_key: bytes
    secret_key: bytes

    def __post_init__(self) -> None:
        for name in ("server_public_key", "public_key", "secret_key"):
            object.__setattr__(self, name, _check_key(getattr(self, name), name))


class _AllowList:
    """ZAP credentials provider: admit exactly the listed client keys."""

    def __init__(self, keys: frozenset[bytes]) -> None:
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.keys


# -- common ---------------------------------------------------------------------------------------


def _cleanup(
    sock: zmq.Socket[Any], ctx: zmq.Context[Any], auth: zmq.auth.thread.ThreadAuthenticator | None,
    monitor: zmq.Socket[Any] | None = None,
) -> None:
    try:
        if monitor is not None:
            with contextlib.suppress(zmq.ZMQError):
                sock.disable_monitor()
            monitor.close(linger=0)
        sock.close(linger=0)
    finally:
        if auth is not None:
            auth.stop()
        ctx.term()


class _Transport:
    def __init__(
        self, socket_type: int, limits: DecodeLimits, counter: ByteCounter | None = None
    ) -> None:
        if not isinstance(limits, DecodeLimits):
            raise ConfigError(f"limits must be a DecodeLimits, got {type(limits).__name__}")
        if counter is not None and not isinstance(counter, ByteCounter):
            raise ConfigError(f"counter must be a ByteCounter, got {type(counter).__name__}")
        self.limits = limits
        self.ops: ByteCounter = ByteCounter("zmq") if counter is None else counter
        """Per-op counters (channel ``"zmq"``); see :meth:`bytes_by_op`."""
        self.bytes_sent = 0
        self.bytes_received = 0
        self.messages_sent = 0
        self.messages_received = 0
        self.messages_dropped = 0
        self._ctx: zmq.Context[Any] = zmq.Context(io_threads=1)
        self._auth: zmq.auth.thread.ThreadAuthenticator | None = None
        self._sock: zmq.Socket[Any] = self._ctx.socket(socket_type)
        try:
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.setsockopt(zmq.MAXMSGSIZE, min(limits.max_total_bytes, 2**62))
        except BaseException:
            _cleanup(self._sock, self._ctx, None)
            raise
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._closed = False
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._monitor: zmq.Socket[Any] | None = None

    def _arm_finalizer(self) -> None:
        self._finalizer = weakref.finalize(
            self, _cleanup, self._sock, self._ctx, self._auth, self._monitor)

    def _check_open(self) -> None:
        if self._closed:
            raise TransportClosedError(
                f"{type(self).__name__} is closed; create a new one to reconnect"
            )

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the socket (LINGER 0: unsent messages are dropped) and the context. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._finalizer is not None:
            self._finalizer()  # runs _cleanup once
        else:
            _cleanup(self._sock, self._ctx, self._auth, self._monitor)

    def stats(self) -> dict[str, int]:
        """The counters as a dict."""
        return {
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "messages_sent": self.messages_sent,
            "messages_received": self.messages_received,
            "messages_dropped": self.messages_dropped,
        }

    def bytes_by_op(self) -> dict[str, dict[str, int]]:
        """Bytes and messages sent / received per op name (a snapshot; safe from any thread):
        ``{op: {"sent", "received", "messages_sent", "messages_received"}}``. Summed over ops
        they equal :meth:`stats`' totals (for a client given a shared ``counter``: the totals
        of every transport that used it)."""
        return self.ops.by_op()

    def _try_recv(self, first_copy: int) -> Frames | None:
        """One multipart message if one is queued, else ``None`` (never blocks). The first
        ``first_copy`` parts (routing identity, header) come as ``bytes``; the rest as
        zero-copy ``zmq.Frame`` (:data:`_SERVER_COPY`: only the second part copied)."""
        sock = self._sock
        server = first_copy == _SERVER_COPY
        try:
            parts: Frames = [sock.recv(zmq.NOBLOCK, copy=first_copy > 0)]
        except zmq.Again:
            return None
        # the remaining parts of a multipart message are already here (atomic delivery)
        while sock.getsockopt(zmq.RCVMORE):
            n = len(parts)
            parts.append(sock.recv(zmq.NOBLOCK, copy=n == 1 if server else n < first_copy))
        return parts

    def _recv_within(self, timeout_ms: int | None, first_copy: int) -> Frames | None:
        """Wait up to ``timeout_ms`` (``None``: forever) for a message and take it. When one is
        already queued (a busy server) this costs one ``getsockopt``, no poll call."""
        _check_timeout(timeout_ms)
        if not cast(int, self._sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            if timeout_ms == 0 or not self._poller.poll(timeout_ms):
                return None
        return self._try_recv(first_copy)

    def __enter__(self) -> _Transport:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _nbytes(frames: Sequence[Any]) -> int:
    return sum(memoryview(f).nbytes for f in frames)


def _received_nbytes(frames: Frames) -> int:
    # received parts are bytes or zmq.Frame, whose len() is their size in bytes (cheaper than
    # a memoryview each; a sent memoryview's len() counts items, hence _nbytes for those)
    return sum(map(len, frames))


def _check_timeout(timeout_ms: int | None) -> int | None:
    if timeout_ms is not None and (type(timeout_ms) is not int or timeout_ms < 0):
        raise ConfigError(
            f"timeout_ms must be an int >= 0 or None (wait forever), got {timeout_ms!r}"
        )
    return timeout_ms


# -- server ---------------------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname, an interface name or "*"


def _seed_routing_ids() -> None:
    """Seed the C library's ``rand()`` from the OS before a ROUTER is created.

    libzmq numbers the connections of peers that set no routing id ``0x00`` + a 32-bit counter
    that starts at ``rand()``, never seeded by default (so always ``0x6b8b4567`` on glibc); a
    peer that claims the next number as its own routing id makes the next anonymous
    connection collide, which aborts the whole process (an assertion in libzmq 4.3). An
    unpredictable start leaves a peer guessing a 32-bit number. (A CURVE allow-list shuts
    unadmitted peers out before they can claim any id.)
    """
    with contextlib.suppress(Exception):  # no C library to seed: nothing to protect either
        ctypes.CDLL(None).srand(ctypes.c_uint(secrets.randbits(32)))


class ServerTransport(_Transport):
    """The coordinator's ROUTER socket, bound to ``tcp://host:port``.

    Args:
        host: address to bind; loopback by default. Anything else (``"0.0.0.0"``, ``"*"``, a
            LAN address or hostname) requires ``allow_remote=True``.
        port: TCP port; 0 picks a free one (read it back from :attr:`port`).
        curve: enable CURVE encryption (and a client allow-list) — see :class:`CurveServerConfig`.
        allow_remote: permit binding a non-loopback address (without ``curve`` a loud
            warning is logged: anyone who can reach the port can then act as a new worker).
        limits: size bounds for decoding (also sets ``MAXMSGSIZE``).
        peer_timeout_ms: with a value, ZeroMQ pings every peer every ``peer_timeout_ms / 2`` ms
            and drops a connection silent for ``peer_timeout_ms`` (a hung or partitioned peer),
            which :meth:`disconnected` then reports.
        backlog: messages queued per peer before ZeroMQ stops reading that peer's connection
            (``RCVHWM``): what one connection can pin is at most ``backlog`` messages of at
            most ``limits.max_total_bytes`` each.

    Peers' routing identities are not trusted for anything (a client may choose its own;
    ``ROUTER_HANDOVER`` is off, so a second connection cannot take over a live identity).
    After each :meth:`recv` / :meth:`poll` message, :attr:`last_fds` and :attr:`last_users`
    map identities to the file descriptor of their connection and, with CURVE, to the
    authenticated client public key (Z85 str).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        curve: CurveServerConfig | None = None,
        allow_remote: bool = False,
        limits: DecodeLimits = DEFAULT_LIMITS,
        peer_timeout_ms: int | None = None,
        backlog: int = 64,
    ) -> None:
        if not isinstance(host, str) or not host:
            raise ConfigError(f"host must be a non-empty str, got {host!r}")
        if type(port) is not int or not 0 <= port <= 65535:
            raise ConfigError(f"port must be an int in [0, 65535] (0: any free port), got {port!r}")
        if not allow_remote and not _is_loopback(host):
            raise ConfigError(
                f"refusing to bind {host!r}: the coordinator binds loopback (127.0.0.1) by default "
                "so nobody else can reach it; pass allow_remote=True (CLI: --allow-remote) to "
                "listen on other interfaces, ideally with CURVE keys configured"
            )
        if curve is not None and not isinstance(curve, CurveServerConfig):
            raise ConfigError(f"curve must be a CurveServerConfig, got {type(curve).__name__}")
        if peer_timeout_ms is not None and (type(peer_timeout_ms) is not int
                                            or peer_timeout_ms < 2):
            raise ConfigError(f"peer_timeout_ms must be an int >= 2 or None, got "
                              f"{peer_timeout_ms!r}")
        if type(backlog) is not int or backlog < 1:
            raise ConfigError(f"backlog must be an int >= 1, got {backlog!r}")
        _seed_routing_ids()
        super().__init__(zmq.ROUTER, limits)
        self.last_fds: dict[bytes, int] = {}
        self.last_users: dict[bytes, str] = {}
        try:
            sock = self._sock
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.setsockopt(zmq.ROUTER_HANDOVER, 0)
            sock.setsockopt(zmq.RCVHWM, backlog)
            if peer_timeout_ms is not None:
                sock.setsockopt(zmq.HEARTBEAT_IVL, max(1, peer_timeout_ms // 2))
                sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, peer_timeout_ms)
            self._monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            self._monitor.setsockopt(zmq.LINGER, 0)
            if curve is not None:
                # a ZAP handler always: it admits the listed keys (or any key) and makes
                # each message carry its sender's public key as "User-Id"
                self._auth = zmq.auth.thread.ThreadAuthenticator(self._ctx)
                self._auth.start()
                if curve.allowed_client_keys is not None:
                    self._auth.configure_curve_callback(
                        domain="*", credentials_provider=_AllowList(curve.allowed_client_keys)
                    )
                else:
                    self._auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
                sock.curve_secretkey = curve.secret_key
                sock.curve_publickey = curve.public_key
                sock.curve_server = True
            bind_host = "127.0.0.1" if host == "localhost" else host
            if ":" in bind_host:  # IPv6 literal
                sock.setsockopt(zmq.IPV6, 1)
                bind_host = f"[{bind_host}]"
            sock.bind(f"tcp://{bind_host}:{port if port else '*'}")
            endpoint = sock.getsockopt(zmq.LAST_ENDPOINT)
        except zmq.ZMQError as e:
            _cleanup(self._sock, self._ctx, self._auth, self._monitor)
            self._closed = True
            raise ConfigError(f"cannot bind tcp://{host}:{port}: {e}") from None
        except BaseException:
            _cleanup(self._sock, self._ctx, self._auth, self._monitor)
            self._closed = True
            raise
        self.address: str = endpoint.decode() if isinstance(endpoint, bytes) else str(endpoint)
        """The bound endpoint, e.g. ``tcp://127.0.0.1:54321``: what clients connect to."""
        self.port: int = int(self.address.rsplit(":", 1)[1])
        self.curve = curve
        self._arm_finalizer()
        if not _is_loopback(host) and curve is None:
            log.warning(
                "SECURITY: serving %s in plaintext without CURVE: anyone who can reach this "
                "port can register workers, commit hypergradients and read λ. Generate keys "
                "with `chronos keys generate DIR` and pass --curve-keys DIR (coordinator and "
                "workers)", self.address)

    def disconnected(self) -> list[int]:
        """File descriptors of connections closed since the last call (peer gone, or silent
        past ``peer_timeout_ms``); compare with :attr:`last_fds`. Never blocks."""
        mon = self._monitor
        out: list[int] = []
        if mon is None:
            return out
        while True:
            try:
                parts = mon.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return out
            if len(parts) == 2 and len(parts[0]) == 6:  # uint16 event, uint32 value (the fd)
                event, value = struct.unpack("=HI", parts[0])
                if event == zmq.EVENT_DISCONNECTED:
                    out.append(value)

    def reachable(self, identity: bytes, frames: Sequence[Any]) -> bool:
        """Send ``frames`` to ``identity`` (a probe) and say whether the peer is still
        connected (``ROUTER_MANDATORY``: a gone peer fails at once, not silently)."""
        return self.send(identity, frames)

    def recv(self, timeout_ms: int | None = 0) -> tuple[bytes, Frames] | None:
        """One message as ``(identity, frames)``, or ``None`` if none arrives within
        ``timeout_ms`` (0: do not wait; ``None``: wait forever)."""
        self._check_open()
        parts = self._recv_within(timeout_ms, first_copy=_SERVER_COPY)
        return None if parts is None else self._count(parts)

    def poll(
        self, timeout_ms: int | None = 0, max_messages: int = 256
    ) -> list[tuple[bytes, Frames]]:
        """Wait up to ``timeout_ms`` for a message, then return every message already queued
        (at most ``max_messages``); an empty list on timeout."""
        self._check_open()
        parts = self._recv_within(timeout_ms, first_copy=_SERVER_COPY)
        out: list[tuple[bytes, Frames]] = []
        while parts is not None:
            out.append(self._count(parts))
            if len(out) >= max_messages:
                break
            parts = self._try_recv(first_copy=_SERVER_COPY)
        return out

    def _count(self, parts: Frames) -> tuple[bytes, Frames]:
        first = parts[0]
        if isinstance(first, zmq.Frame):  # received uncopied: read who sent it, then bytes
            identity = first.bytes
            with contextlib.suppress(zmq.ZMQError):
                self.last_fds[identity] = first.get(zmq.SRCFD)
            if self.curve is not None:
                with contextlib.suppress(zmq.ZMQError, KeyError, UnicodeDecodeError):
                    user = first.get("User-Id")
                    if user:
                        self.last_users[identity] = str(user)
            parts[0] = identity
        frames = parts[1:]
        n = _received_nbytes(frames)
        self.messages_received += 1
        self.bytes_received += n
        self.ops.received(peek_op(frames[0]) if frames else INVALID_OP, n)
        return parts[0], frames

    def send(self, identity: bytes, frames: Sequence[Any]) -> bool:
        """Send ``frames`` to the peer ``identity`` without blocking. ``True`` if queued;
        ``False`` (counted in ``messages_dropped``) if that peer is not connected or its queue
        is full."""
        self._check_open()
        sock = self._sock
        try:  # ROUTER_MANDATORY: an unknown peer or a full queue fails here, on the first part
            sock.send(identity, _NOBLOCK_MORE if frames else zmq.NOBLOCK)
        except zmq.ZMQError as e:
            if e.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                self.messages_dropped += 1
                return False
            raise
        # part by part: send_multipart's per-call checks cost more than the sends of a small
        # message; copy=False is zero-copy for frames of 64 KiB and more
        last = len(frames) - 1
        for i, f in enumerate(frames):
            sock.send(f, _NOBLOCK_MORE if i < last else zmq.NOBLOCK, copy=False)
        n = _nbytes(frames)
        self.messages_sent += 1
        self.bytes_sent += n
        self.ops.sent(peek_op(frames[0]) if frames else INVALID_OP, n)
        return True

    def send_message(self, identity: bytes, msg: Message) -> bool:
        """Encode ``msg`` and :meth:`send` it to ``identity``."""
        return self.send(identity, encode(msg))

    def recv_message(
        self, timeout_ms: int | None = 0
    ) -> tuple[bytes, Message | DecodeError] | None:
        """One decoded message as ``(identity, message)``; a message that fails validation
        comes back as ``(identity, DecodeError)`` — answer it with
        ``send_message(identity, protocol.error_reply(err))``. ``None`` on timeout."""
        got = self.recv(timeout_ms)
        if got is None:
            return None
        identity, frames = got
        try:
            return identity, decode(frames, self.limits)
        except DecodeError as e:
            return identity, e

    def __enter__(self) -> ServerTransport:
        return self


# -- client ---------------------------------------------------------------------------------------


class ClientTransport(_Transport):
    """A worker's DEALER socket connected to ``address`` (e.g. ``tcp://127.0.0.1:5555``).

    Args:
        address: the server's ``tcp://host:port``.
        identity: routing identity (1–255 bytes, not starting with a zero byte); ``None`` lets
            the server pick a random one (a new one after each reconnect).
        curve: CURVE keys, required if the server uses CURVE.
        reconnect_ivl_ms: first reconnect delay; doubles up to ``reconnect_ivl_max_ms``.
        limits: size bounds for decoding (also sets ``MAXMSGSIZE``).
        counter: the per-op :class:`~chronos.communication.accounting.ByteCounter` to add to
            (default: a new one); pass the same one to a replacement socket to keep counting.

    Connecting does not wait for the server: messages sent before it is up are queued.
    """

    def __init__(
        self,
        address: str,
        identity: bytes | None = None,
        curve: CurveClientConfig | None = None,
        reconnect_ivl_ms: int = 100,
        reconnect_ivl_max_ms: int = 5000,
        limits: DecodeLimits = DEFAULT_LIMITS,
        counter: ByteCounter | None = None,
    ) -> None:
        if not isinstance(address, str) or not address.startswith("tcp://"):
            raise ConfigError(f"address must look like 'tcp://host:port', got {address!r}")
        if identity is not None and (
            not isinstance(identity, bytes) or not 1 <= len(identity) <= 255 or identity[0] == 0
        ):
            raise ConfigError(
                f"identity must be 1-255 bytes not starting with a zero byte, or None, "
                f"got {identity!r:.60}"
            )
        if not (type(reconnect_ivl_ms) is int and type(reconnect_ivl_max_ms) is int) or not (
            0 < reconnect_ivl_ms <= reconnect_ivl_max_ms
        ):
            raise ConfigError(
                "need ints 0 < reconnect_ivl_ms <= reconnect_ivl_max_ms, "
                f"got {reconnect_ivl_ms!r}, {reconnect_ivl_max_ms!r}"
            )
        if curve is not None and not isinstance(curve, CurveClientConfig):
            raise ConfigError(f"curve must be a CurveClientConfig, got {type(curve).__name__}")
        super().__init__(zmq.DEALER, limits, counter)
        try:
            sock = self._sock
            sock.setsockopt(zmq.RECONNECT_IVL, reconnect_ivl_ms)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, reconnect_ivl_max_ms)
            if identity is not None:
                sock.setsockopt(zmq.ROUTING_ID, identity)
            if curve is not None:
                sock.curve_serverkey = curve.server_public_key
                sock.curve_publickey = curve.public_key
                sock.curve_secretkey = curve.secret_key
            if address.startswith("tcp://[") or address.count(":") > 2:
                sock.setsockopt(zmq.IPV6, 1)
            sock.connect(address)
        except zmq.ZMQError as e:
            _cleanup(self._sock, self._ctx, None)
            self._closed = True
            raise ConfigError(f"cannot connect to {address!r}: {e}") from None
        except BaseException:
            _cleanup(self._sock, self._ctx, None)
            self._closed = True
            raise
        self.address = address
        self.identity = identity
        self._arm_finalizer()

    def send(self, frames: Sequence[Any]) -> bool:
        """Queue ``frames`` for the server without blocking; ``False`` (counted in
        ``messages_dropped``) if the outgoing queue is full (high-water mark)."""
        self._check_open()
        try:
            self._sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.messages_dropped += 1
            return False
        n = _nbytes(frames)
        self.messages_sent += 1
        self.bytes_sent += n
        self.ops.sent(peek_op(frames[0]) if frames else INVALID_OP, n)
        return True

    def recv(self, timeout_ms: int | None = 0) -> Frames | None:
        """One message's frames, or ``None`` if none arrives within ``timeout_ms``
        (0: do not wait; ``None``: wait forever)."""
        self._check_open()
        frames = self._recv_within(timeout_ms, first_copy=1)
        if frames is None:
            return None
        n = _received_nbytes(frames)
        self.messages_received += 1
        self.bytes_received += n
        self.ops.received(peek_op(frames[0]) if frames else INVALID_OP, n)
        return frames

    def send_message(self, msg: Message) -> bool:
        """Encode ``msg`` and :meth:`send` it."""
        return self.send(encode(msg))

    def recv_message(self, timeout_ms: int | None = 0) -> Message | None:
        """One decoded message or ``None`` on timeout.

        Raises:
            DecodeError: the message failed validation (it is consumed).
        """
        frames = self.recv(timeout_ms)
        return None if frames is None else decode(frames, self.limits)

    def __enter__(self) -> ClientTransport:
        return self


# -- module-level helpers -------------------------------------------------------------------------


def send_message(
    transport: ServerTransport | ClientTransport, msg: Message, identity: bytes | None = None
) -> bool:
    """Encode and send ``msg``; ``identity`` is required for (and only for) a server."""
    if isinstance(transport, ServerTransport):
        if identity is None:
            raise ConfigError("a ServerTransport needs the identity of the peer to send to")
        return transport.send_message(identity, msg)
    if identity is not None:
        raise ConfigError("a ClientTransport sends to its server only; do not pass identity")
    return transport.send_message(msg)


def recv_message(
    transport: ServerTransport | ClientTransport, timeout_ms: int | None = 0
) -> Message | tuple[bytes, Message | DecodeError] | None:
    """``transport.recv_message(timeout_ms)``: see the two classes for what each returns."""
    return transport.recv_message(timeout_ms)
