"""ZeroMQ transport on real sockets (127.0.0.1 only). No sleeps: every wait is a bounded poll."""

from __future__ import annotations

import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from chronos.core.errors import ConfigError
from chronos.distributed.messages import (
    Checkout,
    CheckoutReply,
    Commit,
    ErrorReply,
    Heartbeat,
    HeartbeatAck,
    Message,
)
from chronos.distributed.protocol import (
    DecodeError,
    DecodeLimits,
    decode,
    encode,
    encoded_size,
    error_reply,
)
from chronos.distributed.transport import (
    ClientTransport,
    CurveClientConfig,
    CurveServerConfig,
    ServerTransport,
    TransportClosedError,
    curve_keypair,
    recv_message,
    send_message,
)

WAIT_MS = 5000  # generous upper bound for anything that should arrive; never slept


@pytest.fixture
def server() -> Iterator[ServerTransport]:
    s = ServerTransport()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def client(server: ServerTransport) -> Iterator[ClientTransport]:
    c = ClientTransport(server.address)
    try:
        yield c
    finally:
        c.close()


def serve_one(server: ServerTransport) -> tuple[bytes, Message]:
    got = server.recv_message(timeout_ms=WAIT_MS)
    assert got is not None, "server got nothing"
    identity, msg = got
    assert not isinstance(msg, DecodeError), msg
    return identity, msg


@pytest.mark.timeout(30)
def test_round_trip_and_counters(server: ServerTransport, client: ClientTransport) -> None:
    assert server.address.startswith("tcp://127.0.0.1:") and server.port > 0
    hb = Heartbeat(request_id=1, worker_id="w0")
    assert client.send_message(hb)
    identity, msg = serve_one(server)
    assert msg == hb and isinstance(identity, bytes) and identity
    ack = HeartbeatAck(request_id=1, version=3)
    assert server.send_message(identity, ack)
    assert client.recv_message(timeout_ms=WAIT_MS) == ack
    n_up, n_down = encoded_size(encode(hb)), encoded_size(encode(ack))
    assert client.bytes_sent == server.bytes_received == n_up
    assert server.bytes_sent == client.bytes_received == n_down
    assert client.messages_sent == server.messages_received == 1
    assert server.messages_sent == client.messages_received == 1
    assert server.stats()["bytes_sent"] == n_down and server.stats()["messages_dropped"] == 0


@pytest.mark.timeout(30)
def test_large_tensor_round_trip_is_counted_exactly(
    server: ServerTransport, client: ClientTransport
) -> None:
    x = torch.randn(1 << 20)  # 4 MiB
    commit = Commit(request_id=2, worker_id="w0", version=0, commit_id="c", hypergradient={"x": x})
    client.send_message(commit)
    identity, msg = serve_one(server)
    assert isinstance(msg, Commit) and torch.equal(msg.hypergradient["x"], x)
    msg.hypergradient["x"].mul_(2)  # received tensors are writable
    reply = CheckoutReply(request_id=2, status="granted", version=1, outer_params=msg.hypergradient)
    server.send_message(identity, reply)
    back = client.recv_message(timeout_ms=WAIT_MS)
    assert isinstance(back, CheckoutReply) and torch.equal(back.outer_params["x"], x * 2)
    assert client.bytes_sent == server.bytes_received == encoded_size(encode(commit))
    assert server.bytes_sent == client.bytes_received == encoded_size(encode(reply))
    assert client.bytes_received > 4 * 2**20
    client.close()
    server.close()  # decoded tensors own their (zero-copy) frames: still valid after close
    assert torch.equal(back.outer_params["x"], x * 2)


@pytest.mark.timeout(30)
def test_recv_times_out_without_blocking(server: ServerTransport, client: ClientTransport) -> None:
    t = time.monotonic()
    assert server.recv(timeout_ms=0) is None
    assert server.recv(timeout_ms=50) is None
    assert server.poll(timeout_ms=50) == []
    assert client.recv(timeout_ms=50) is None
    assert client.recv_message(timeout_ms=0) is None
    assert time.monotonic() - t < 5.0
    with pytest.raises(ConfigError):
        server.recv(timeout_ms=-1)


@pytest.mark.timeout(30)
def test_poll_drains_every_queued_message(server: ServerTransport, client: ClientTransport) -> None:
    for i in range(5):
        client.send_message(Heartbeat(request_id=i, worker_id="w0"))
    got: list[int] = []
    deadline = time.monotonic() + 10
    while len(got) < 5 and time.monotonic() < deadline:
        for _, frames in server.poll(timeout_ms=WAIT_MS, max_messages=3):
            got.append(recv_id(frames))
    assert got == list(range(5)) and server.messages_received == 5


def recv_id(frames: list[object]) -> int:
    return decode(frames).request_id


@pytest.mark.timeout(30)
def test_close_is_idempotent_and_use_after_close_fails() -> None:
    s = ServerTransport()
    c = ClientTransport(s.address)
    for t in (c, s):
        t.close()
        t.close()
        assert t.closed
    with pytest.raises(TransportClosedError):
        s.recv(0)
    with pytest.raises(TransportClosedError):
        c.send([b"x"])
    with ServerTransport() as s2:
        pass
    assert s2.closed


@pytest.mark.timeout(30)
def test_send_to_unknown_peer_is_dropped_not_blocking(server: ServerTransport) -> None:
    assert server.send(b"nobody", encode(HeartbeatAck(request_id=1, version=0))) is False
    assert server.messages_dropped == 1 and server.bytes_sent == 0


@pytest.mark.timeout(30)
def test_bad_frames_yield_decode_error_with_identity(
    server: ServerTransport, client: ClientTransport
) -> None:
    client.send([pickle.dumps(object())])
    got = server.recv_message(timeout_ms=WAIT_MS)
    assert got is not None
    identity, err = got
    assert isinstance(err, DecodeError) and err.code == "malformed"
    server.send_message(identity, error_reply(err))
    reply = client.recv_message(timeout_ms=WAIT_MS)
    assert isinstance(reply, ErrorReply) and reply.code == "malformed" and reply.request_id == -1
    # the client side raises instead
    server.send(identity, [b"\xc1"])
    with pytest.raises(DecodeError):
        client.recv_message(timeout_ms=WAIT_MS)


@pytest.mark.timeout(30)
def test_oversize_single_frame_is_refused_by_zmq() -> None:
    """MAXMSGSIZE: a frame above max_total_bytes never reaches decode (peer disconnected)."""
    with ServerTransport(limits=DecodeLimits(max_total_bytes=1000)) as s:
        with ClientTransport(s.address) as c:
            c.send([b"x" * 2000])
            assert s.recv(timeout_ms=300) is None
            assert s.bytes_received == 0


@pytest.mark.timeout(30)
def test_explicit_identity_and_module_helpers(server: ServerTransport) -> None:
    with ClientTransport(server.address, identity=b"worker-7") as c:
        assert send_message(c, Heartbeat(request_id=3, worker_id="w7"))
        got = recv_message(server, timeout_ms=WAIT_MS)
        assert isinstance(got, tuple) and got[0] == b"worker-7"
        assert send_message(server, HeartbeatAck(request_id=3, version=0), identity=b"worker-7")
        assert recv_message(c, timeout_ms=WAIT_MS) == HeartbeatAck(request_id=3, version=0)
        with pytest.raises(ConfigError):
            send_message(server, HeartbeatAck(request_id=3, version=0))
        with pytest.raises(ConfigError):
            send_message(c, Heartbeat(request_id=3, worker_id="w7"), identity=b"x")


@pytest.mark.timeout(30)
def test_eight_concurrent_clients_each_get_their_replies(server: ServerTransport) -> None:
    n_clients, n_requests = 8, 10
    errors: list[str] = []
    stop = threading.Event()

    # the server transport is used by this thread only between start() and join(): a socket may
    # change threads across such a full memory barrier, never be used by two at once
    def serve() -> None:
        while not stop.is_set():
            for identity, frames in server.poll(timeout_ms=20):
                m = decode(frames)
                assert isinstance(m, Checkout)
                reply = CheckoutReply(
                    request_id=m.request_id,
                    status="granted",
                    version=int(m.worker_id[1:]),
                    outer_params={"w": torch.full((3,), float(m.request_id))},
                )
                server.send_message(identity, reply)

    def work(k: int) -> None:
        try:
            with ClientTransport(server.address) as c:
                for r in range(n_requests):
                    c.send_message(Checkout(request_id=r, worker_id=f"w{k}"))
                    rep = c.recv_message(timeout_ms=WAIT_MS)
                    if not (
                        isinstance(rep, CheckoutReply)
                        and rep.request_id == r
                        and rep.version == k
                        and rep.outer_params["w"].tolist() == [float(r)] * 3
                    ):
                        errors.append(f"client {k} request {r}: got {rep!r}")
                        return
        except Exception as e:  # reported below
            errors.append(f"client {k}: {e!r}")

    srv = threading.Thread(target=serve)
    workers = [threading.Thread(target=work, args=(k,)) for k in range(n_clients)]
    srv.start()
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=25)
    finally:
        stop.set()
        srv.join(timeout=5)
    assert not any(w.is_alive() for w in workers) and not srv.is_alive()
    assert errors == []
    assert server.messages_received == server.messages_sent == n_clients * n_requests


@pytest.mark.timeout(30)
def test_client_reconnects_to_a_restarted_server() -> None:
    s1 = ServerTransport()
    port = s1.port
    c = ClientTransport(s1.address, reconnect_ivl_ms=20, reconnect_ivl_max_ms=200)
    s2: ServerTransport | None = None
    try:
        c.send_message(Heartbeat(request_id=1, worker_id="w0"))
        serve_one(s1)
        s1.close()
        s2 = ServerTransport(port=port)
        c.send_message(Heartbeat(request_id=2, worker_id="w0"))  # queued until reconnected
        _, msg = serve_one(s2)
        assert msg.request_id == 2
    finally:
        c.close()
        s1.close()
        if s2 is not None:
            s2.close()


@pytest.mark.parametrize("host", ["0.0.0.0", "*", "192.168.1.10", "example.com", "::"])
def test_non_loopback_bind_is_refused_without_opt_in(host: str) -> None:
    with pytest.raises(ConfigError, match="allow_remote=True"):
        ServerTransport(host=host)


@pytest.mark.timeout(30)
def test_loopback_spellings_bind() -> None:
    with ServerTransport(host="localhost") as s:
        assert s.address.startswith("tcp://127.0.0.1:")
    with ServerTransport(host="127.0.0.1", allow_remote=True) as s:
        assert s.port > 0


def test_bad_arguments_are_config_errors() -> None:
    for kw in ({"port": -1}, {"port": 70000}, {"host": ""}, {"curve": "keys"}):
        with pytest.raises(ConfigError):
            ServerTransport(**kw)  # type: ignore[arg-type]
    for addr, ident in (("127.0.0.1:5", None), ("tcp://127.0.0.1:5", b"\x00x"), ("tcp://h:1", b"")):
        with pytest.raises(ConfigError):
            ClientTransport(addr, identity=ident)
    with pytest.raises(ConfigError):
        ClientTransport("tcp://127.0.0.1:5", reconnect_ivl_ms=10, reconnect_ivl_max_ms=5)


@pytest.mark.timeout(30)
def test_port_in_use_is_a_config_error(server: ServerTransport) -> None:
    with pytest.raises(ConfigError, match="cannot bind"):
        ServerTransport(port=server.port)


@pytest.mark.timeout(60)
def test_no_hang_at_interpreter_exit_with_open_transports() -> None:
    code = (
        "from chronos.distributed.transport import ServerTransport, ClientTransport\n"
        "s = ServerTransport(); c = ClientTransport(s.address)\n"
        "c.send([b'x' * 100000]); c.send([b'y'])\n"  # unread, never closed
        "c2 = ClientTransport('tcp://127.0.0.1:9'); c2.send([b'z'])\n"  # nobody listens
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


# -- CURVE ----------------------------------------------------------------------------------------


def test_curve_config_validation() -> None:
    pub, sec = curve_keypair()
    with pytest.raises(ConfigError, match="Z85"):
        CurveServerConfig(public_key=b"short", secret_key=sec)
    with pytest.raises(ConfigError, match="empty"):
        CurveServerConfig(public_key=pub, secret_key=sec, allowed_client_keys=frozenset())
    cfg = CurveServerConfig(pub.decode(), sec.decode())  # type: ignore[arg-type]
    assert cfg.public_key == pub


@pytest.mark.timeout(30)
def test_curve_allow_list() -> None:
    spub, ssec = curve_keypair()
    apub, asec = curve_keypair()
    bpub, bsec = curve_keypair()
    cfg = CurveServerConfig(spub, ssec, allowed_client_keys=frozenset({apub}))
    with ServerTransport(curve=cfg) as s:
        with (
            ClientTransport(s.address, curve=CurveClientConfig(spub, apub, asec)) as good,
            ClientTransport(s.address, curve=CurveClientConfig(spub, bpub, bsec)) as bad,
            ClientTransport(s.address) as plain,
        ):
            bad.send_message(Heartbeat(request_id=1, worker_id="bad"))
            plain.send_message(Heartbeat(request_id=2, worker_id="plain"))
            good.send_message(Heartbeat(request_id=3, worker_id="good"))
            identity, msg = serve_one(s)
            assert msg.request_id == 3
            s.send_message(identity, HeartbeatAck(request_id=3, version=0))
            assert good.recv_message(timeout_ms=WAIT_MS) == HeartbeatAck(request_id=3, version=0)
            assert s.recv(timeout_ms=300) is None  # nothing from the unlisted / plain clients
