"""Per-op byte accounting: both transports count bytes and messages per op name; per-op
figures add up to the totals, and what a client sent per op is what the server received per
op. Real sockets on 127.0.0.1 (a transport pair, then a coordinator with a real worker)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch

from chronos.communication.accounting import ByteCounter, merge_by_op, totals
from chronos.core import InnerProblem
from chronos.distributed.coordinator import Coordinator
from chronos.distributed.launcher import RunResult, format_bytes_by_op
from chronos.distributed.messages import (
    Checkout,
    CheckoutReply,
    Commit,
    CommitReply,
    Heartbeat,
    HeartbeatAck,
)
from chronos.distributed.protocol import encode
from chronos.distributed.transport import ClientTransport, ServerTransport
from chronos.distributed.worker import Worker, WorkerConfig

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def pair() -> Iterator[tuple[ServerTransport, ClientTransport]]:
    server = ServerTransport()
    client = ClientTransport(server.address)
    try:
        yield server, client
    finally:
        client.close()
        server.close()


def _check_totals(t: ServerTransport | ClientTransport) -> None:
    s, by_op = t.stats(), t.bytes_by_op()
    tot = totals(by_op)
    assert tot["sent"] == s["bytes_sent"] and tot["received"] == s["bytes_received"]
    assert tot["messages_sent"] == s["messages_sent"]
    assert tot["messages_received"] == s["messages_received"]


def test_per_op_counters_match_totals_and_each_other(
    pair: tuple[ServerTransport, ClientTransport],
) -> None:
    server, client = pair
    big = {"x": torch.randn(50_000)}  # a zero-copy frame
    up = [Heartbeat(request_id=1, worker_id="w"), Checkout(request_id=2, worker_id="w"),
          Commit(request_id=3, worker_id="w", version=0, commit_id="c", hypergradient=big),
          Heartbeat(request_id=4, worker_id="w")]
    for m in up:
        assert client.send_message(m)
    client.send([b"not msgpack at all"])  # counted, as "invalid"
    identity = b""
    for _ in range(len(up) + 1):
        got = server.recv(timeout_ms=5000)
        assert got is not None
        identity = got[0]
    down = [HeartbeatAck(request_id=1, version=0),
            CheckoutReply(request_id=2, status="granted", version=0, outer_params=big),
            CommitReply(request_id=3, commit_id="c", status="accepted", staleness=0,
                        weight=1.0, version=1)]
    for m in down:
        assert server.send_message(identity, m)
    for _ in down:
        assert client.recv(timeout_ms=5000) is not None
    cs, ss = client.bytes_by_op(), server.bytes_by_op()
    assert cs["heartbeat"]["messages_sent"] == 2 and cs["commit"]["messages_sent"] == 1
    assert cs["invalid"]["messages_sent"] == 1
    assert cs["commit"]["sent"] > 200_000
    sizes = {m.op: sum(memoryview(f).nbytes for f in encode(m)) for m in down}
    for op in set(cs) | set(ss):  # client sent == server received, and back, per op
        c, s = cs.get(op, {}), ss.get(op, {})
        assert c.get("sent", 0) == s.get("received", 0), op
        assert c.get("received", 0) == s.get("sent", 0), op
        assert c.get("messages_sent", 0) == s.get("messages_received", 0), op
        assert c.get("messages_received", 0) == s.get("messages_sent", 0), op
    for op, n in sizes.items():
        assert ss[op]["sent"] == n and cs[op]["received"] == n
    _check_totals(client)
    _check_totals(server)


def test_a_shared_counter_outlives_a_socket() -> None:
    counter = ByteCounter("zmq")
    with ServerTransport() as server:
        for _ in range(2):
            with ClientTransport(server.address, counter=counter) as client:
                assert client.send_message(Heartbeat(request_id=1, worker_id="w"))
                assert server.recv(timeout_ms=5000) is not None
        assert counter.by_op()["heartbeat"]["messages_sent"] == 2
        server_side = server.bytes_by_op()["heartbeat"]
        assert counter.by_op()["heartbeat"]["sent"] == server_side["received"]
        assert server_side["messages_received"] == 2


def test_merge_and_totals() -> None:
    a = {"commit": {"sent": 10, "received": 0, "messages_sent": 1, "messages_received": 0}}
    b = {"commit": {"sent": 5, "received": 1, "messages_sent": 1, "messages_received": 1},
         "heartbeat": {"sent": 3, "received": 0, "messages_sent": 1, "messages_received": 0}}
    m = merge_by_op([a, b])
    assert m["commit"] == {"sent": 15, "received": 1, "messages_sent": 2, "messages_received": 1}
    assert totals(m) == {"sent": 18, "received": 1, "messages_sent": 3, "messages_received": 1}


def _problem() -> InnerProblem:
    target = torch.tensor([1.0, -2.0], dtype=torch.float64)

    def inner(p: dict[str, torch.Tensor], h: dict[str, torch.Tensor]) -> torch.Tensor:
        return 0.5 * ((p["t"] - target) ** 2).sum() + 0.5 * (h["lam"].exp() * p["t"] ** 2).sum()

    def outer(p: dict[str, torch.Tensor], h: dict[str, torch.Tensor]) -> torch.Tensor:
        return 0.5 * ((p["t"] - 0.5) ** 2).sum()

    return InnerProblem.from_functions(inner, outer, {"t": torch.zeros(2, dtype=torch.float64)},
                                       num_steps=20, inner_lr=0.3, optimizer="sgd")


def test_worker_and_coordinator_agree_per_op() -> None:
    lam = {"lam": torch.zeros(2, dtype=torch.float64)}
    coord = Coordinator(lam, port=0, optimizer="sgd", outer_lr=0.1, max_steps=None)
    coord.start()
    worker = Worker(_problem(), WorkerConfig(coordinator_addr=coord.address, worker_id="w0",
                                             connect_timeout=10.0, heartbeat_interval=0.05))
    try:
        worker.run(max_iterations=4)  # closes: the Deregister is the last message
        ws = worker.stats()
        sent = ws["bytes_by_op"]
        assert {"register", "checkout", "commit", "deregister"} <= set(sent)
        assert sent["commit"]["messages_sent"] == 4
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:  # the Deregister is on its way: poll for it
            if coord.stats()["bytes_by_op"].get("deregister", {}).get("messages_received"):
                break
            time.sleep(0.01)
        cs = coord.stats()
        received = cs["bytes_by_op"]
        for op, c in sent.items():
            assert c["sent"] == received[op]["received"], op
            assert c["messages_sent"] == received[op]["messages_received"], op
        for op in ("registered", "checkout_reply", "commit_reply"):
            assert received[op]["sent"] == sent[op]["received"], op
        assert totals(sent)["sent"] == ws["bytes_sent"]
        assert totals(received)["received"] == cs["bytes_received"]
        assert cs["bytes_by_channel"]["zmq"]["sent"] == cs["bytes_sent"]
    finally:
        worker.close()
        coord.stop()
    result = RunResult(outer_params=lam, version=4, wall_time=1.0, stats=cs, history=[],
                       worker_exitcodes=(0,), completed=True, worker_stats={"w0": ws})
    by_op = result.summary()["bytes_by_op"]
    assert by_op["workers"]["commit"] == sent["commit"]
    assert by_op["coordinator"]["commit"] == received["commit"]
    lines = format_bytes_by_op(result)
    assert len(lines) == 2 and "commit" in lines[0] and "coordinator" in lines[0]
