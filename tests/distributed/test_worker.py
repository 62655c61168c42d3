"""The worker against a real coordinator (or a scripted one) over real sockets on 127.0.0.1.

Covers: deferred / rejected / not-modified replies, heartbeats during a long inner solve,
re-sends with the same commit id, reconnecting to a restarted coordinator on the same port,
connect_timeout, duplicate worker ids, the significance filter with error feedback, prompt
stops (ShutdownNotice mid-request, stop() during a solve) and WorkerConfig validation.

``toy_problem`` is also the PROBLEM factory the CLI tests run in subprocesses
(``test_worker:toy_problem`` with this directory on ``PYTHONPATH``).
"""

from __future__ import annotations

import itertools
import math
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from chronos.core import InnerProblem
from chronos.core import tensordict as td
from chronos.core.errors import ChronosError, ConfigError
from chronos.distributed.coordinator import Coordinator
from chronos.distributed.messages import (
    Checkout,
    CheckoutReply,
    Commit,
    CommitReply,
    Deregister,
    ErrorReply,
    Heartbeat,
    HeartbeatAck,
    Message,
    Register,
    Registered,
    ShutdownNotice,
)
from chronos.distributed.transport import ClientTransport, ServerTransport
from chronos.distributed.worker import Worker, WorkerConfig

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


# -- a tiny bilevel problem with hooks -----------------------------------------------------------


class Toy(InnerProblem):
    """θ ∈ Rⁿ: f(θ, λ) = ½‖θ − a‖² + ½ Σᵢ e^{λᵢ} θᵢ², F(θ) = ½‖θ − b‖² with a = 1, b = ¼.

    θ*ᵢ = 1 / (1 + e^{λᵢ}) and dF/dλᵢ = (θ*ᵢ − ¼) · (−e^{λᵢ} / (1 + e^{λᵢ})²) (−1/16 at λ = 0).
    Hooks for the tests: ``entered`` (set when a solve starts), ``gate`` (a solve waits for it),
    ``busy_s`` (a solve keeps the CPU busy this long), ``endless`` (a solve that only a stop
    ends), ``seen`` (the λ of every solve).
    """

    num_steps = 5
    inner_lr = 1.0
    optimizer = "lbfgs"
    tol = 1e-10

    def __init__(self, n: int = 8, init: float = 0.0, dtype: torch.dtype = torch.float64) -> None:
        self.n, self.init, self.dtype = n, init, dtype
        self.a = torch.ones(n, dtype=dtype)
        self.b = torch.full((n,), 0.25, dtype=dtype)
        self.entered = threading.Event()
        self.gate: threading.Event | None = None
        self.busy_s = 0.0
        self.endless = False
        self.seen: list[dict[str, torch.Tensor]] = []

    def default_outer_params(self) -> dict[str, torch.Tensor]:
        return {"lam": torch.full((self.n,), self.init, dtype=self.dtype)}

    def init_params(self) -> dict[str, torch.Tensor]:
        return {"theta": torch.zeros(self.n, dtype=self.dtype)}

    def inner_loss(self, params, outer_params, batch=None):
        th = params["theta"]
        return 0.5 * ((th - self.a) ** 2).sum() + 0.5 * (outer_params["lam"].exp() * th**2).sum()

    def outer_loss(self, params, outer_params, batch=None):
        return 0.5 * ((params["theta"] - self.b) ** 2).sum()

    def closed_form_hypergradient(self, lam: torch.Tensor) -> torch.Tensor:
        e = lam.exp()
        return (self.a / (1 + e) - self.b) * (-self.a * e / (1 + e) ** 2)

    def solve(self, outer_params, init_params=None, num_steps=None, **kwargs):
        self.seen.append({k: v.clone() for k, v in outer_params.items()})
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(30), "the test never opened the gate"
        if self.busy_s:
            deadline = time.perf_counter() + self.busy_s
            x = 0
            while time.perf_counter() < deadline:  # pure Python: holds the GIL most of the time
                x += sum(range(200))
        if self.endless:
            return super().solve(outer_params, init_params, 10**9, optimizer="sgd", lr=1e-9,
                                 **{k: v for k, v in kwargs.items() if k not in ("optimizer",
                                                                                   "lr")})
        return super().solve(outer_params, init_params, num_steps, **kwargs)


def toy_problem(rank: int = 0, world_size: int = 1) -> Toy:
    """PROBLEM factory for the CLI tests."""
    return Toy()


# -- helpers -------------------------------------------------------------------------------------


def wait_until(cond: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll ``cond`` (a coordinator's counters, a worker's stats: nothing to wait on) until
    it is truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def net_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("chronos-net-") and t.is_alive()]


@pytest.fixture(autouse=True)
def _no_leaked_network_threads() -> Iterator[None]:
    before = set(net_threads())
    yield
    leaked = [t for t in net_threads() if t not in before]
    for t in leaked:
        t.join(5.0)
    assert not [t for t in leaked if t.is_alive()], "a worker's network thread outlived its test"


@pytest.fixture
def coordinator_factory() -> Iterator[Callable[..., Coordinator]]:
    started: list[Coordinator] = []

    def make(problem: Toy | None = None, **kwargs: Any) -> Coordinator:
        outer = (problem or Toy()).default_outer_params()
        kwargs.setdefault("heartbeat_interval", 0.1)
        c = Coordinator(outer, port=0, **kwargs).start()
        started.append(c)
        return c

    yield make
    for c in started:
        c.stop()


class RawClient:
    """A hand-driven worker: one DEALER socket, one request at a time."""

    def __init__(self, address: str, name: str) -> None:
        self.name = name
        self.t = ClientTransport(address, identity=name.encode())
        self.rid = 0

    def ask(self, make: Callable[[int], Message]) -> Message:
        self.rid += 1
        self.t.send_message(make(self.rid))
        while True:
            reply = self.t.recv_message(timeout_ms=5000)
            assert reply is not None, "no reply from the coordinator"
            if reply.request_id == self.rid:
                return reply

    def register(self) -> None:
        assert isinstance(self.ask(lambda r: Register(request_id=r, worker_id=self.name)),
                          Registered)

    def checkout(self) -> CheckoutReply:
        reply = self.ask(lambda r: Checkout(request_id=r, worker_id=self.name))
        assert isinstance(reply, CheckoutReply) and reply.status == "granted", reply
        return reply

    def commit(self, version: int, grad: dict[str, torch.Tensor]) -> CommitReply:
        reply = self.ask(lambda r: Commit(request_id=r, worker_id=self.name, version=version,
                                          commit_id=f"{self.name}-{r}", hypergradient=grad))
        assert isinstance(reply, CommitReply), reply
        return reply

    def close(self) -> None:
        self.t.close()


@pytest.fixture
def raw_clients() -> Iterator[Callable[[str, str], RawClient]]:
    made: list[RawClient] = []

    def make(address: str, name: str) -> RawClient:
        c = RawClient(address, name)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


class FakeCoordinator:
    """A scripted coordinator on a real ROUTER socket. It answers Register and Heartbeat
    itself; ``handler(msg)`` returns the replies to anything else; :meth:`send` pushes a
    message to the last peer from any thread."""

    def __init__(self, handler: Callable[[Message], list[Message]],
                 heartbeat_interval: float = 0.05) -> None:
        self.handler = handler
        self.heartbeat_interval = heartbeat_interval
        self.server = ServerTransport(port=0)  # handed to the thread before its first use
        self.address = self.server.address
        self.received: list[Message] = []
        self.outbox: queue.Queue[Message] = queue.Queue()
        self.peer: bytes | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-coordinator", daemon=True)
        self._thread.start()

    def ops(self) -> list[str]:
        return [m.op for m in list(self.received)]

    def send(self, msg: Message) -> None:
        self.outbox.put(msg)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                while self.peer is not None and not self.outbox.empty():
                    self.server.send_message(self.peer, self.outbox.get())
                got = self.server.recv_message(timeout_ms=5)
                if got is None:
                    continue
                identity, msg = got
                assert not isinstance(msg, Exception), msg
                self.peer = identity
                self.received.append(msg)
                if isinstance(msg, Heartbeat):
                    replies: list[Message] = [HeartbeatAck(request_id=msg.request_id, version=0)]
                elif isinstance(msg, Register):
                    replies = [Registered(
                        request_id=msg.request_id, worker_id=msg.worker_id, version=0,
                        config={"heartbeat_interval": self.heartbeat_interval,
                                "lease_timeout": 10.0})]
                elif isinstance(msg, Deregister):
                    replies = []
                else:
                    replies = self.handler(msg)
                for r in replies:
                    self.server.send_message(identity, r)
        finally:
            self.server.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)


@pytest.fixture
def fake_coordinator() -> Iterator[Callable[..., FakeCoordinator]]:
    made: list[FakeCoordinator] = []

    def make(handler: Callable[[Message], list[Message]], **kwargs: Any) -> FakeCoordinator:
        f = FakeCoordinator(handler, **kwargs)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


def _grant(msg: Message, version: int = 0, n: int = 8) -> CheckoutReply:
    return CheckoutReply(request_id=msg.request_id, status="granted", version=version,
                         outer_params={"lam": torch.zeros(n, dtype=torch.float64)})


def _accept(msg: Commit) -> CommitReply:
    return CommitReply(request_id=msg.request_id, commit_id=msg.commit_id, status="accepted",
                       staleness=0, weight=1.0, version=msg.version + 1)


# -- replies: not modified, deferred, rejected ---------------------------------------------------


@pytest.mark.timeout(30)
def test_not_modified_reuses_cached_params_and_resends_no_tensors(coordinator_factory, workers):
    n = 4096  # λ is 32 KiB of float64
    prob = Toy(n=n)
    coord = coordinator_factory(prob, min_commits=2)  # the first commit does not step
    w = workers(prob, coord.address, worker_id="nm")
    w.connect()
    first = w.step()
    assert first is not None and first.status == "accepted" and coord.version == 0
    before = w.stats()
    second = w.step()
    after = w.stats()
    assert second is not None and second.status == "accepted" and coord.version == 1
    assert after["checkouts_not_modified"] == 1 and before["checkouts_not_modified"] == 0
    assert coord.stats()["checkouts_not_modified"] == 1
    # what came back during the second iteration: no λ (32 KiB), only small replies
    assert after["bytes_received"] - before["bytes_received"] < 2_000
    # what went out: the commit's hypergradient (32 KiB) but not much more
    assert 8 * n <= after["bytes_sent"] - before["bytes_sent"] < 8 * n + 2_000
    # the second solve ran on the cached λ of version 0
    assert len(prob.seen) == 2 and torch.equal(prob.seen[0]["lam"], prob.seen[1]["lam"])


@pytest.mark.timeout(30)
def test_deferred_checkout_waits_for_its_grant_without_reconnecting(
    coordinator_factory, workers, raw_clients
):
    coord = coordinator_factory(max_in_flight=1, max_staleness=5, lease_timeout=30.0)
    g = {"lam": torch.full((8,), 0.1, dtype=torch.float64)}
    holder, pusher = raw_clients(coord.address, "holder"), raw_clients(coord.address, "pusher")
    for c in (holder, pusher):
        c.register()
    holder.checkout()  # holds a lease on version 0
    pusher.commit(pusher.checkout().version, g)  # version 1: the window (1 version) is full
    assert coord.version == 1
    w = workers(Toy(), coord.address, worker_id="waiter", request_timeout=0.3)
    w.connect()
    box: dict[str, Any] = {}
    t = threading.Thread(target=lambda: box.setdefault("reply", w.step()))
    t.start()
    try:
        # deferred for longer than 3 request timeouts: neither re-sent (its grant comes with
        # the same request id; a re-send would only be deferred again) nor reconnected
        wait_until(lambda: coord.stats()["deferred_pending"] == 1, what="the deferral")
        time.sleep(1.0)  # an absence check: nothing may happen in 3 request timeouts
        assert w.stats()["resends"] == 0 and coord.stats()["checkouts_deferred"] == 1
        assert w.stats()["checkouts_deferred"] == 1 and w.stats()["iterations"] == 0
        holder.commit(0, g)  # frees the window: the grant follows
    finally:
        t.join(20)
    assert not t.is_alive()
    reply = box["reply"]
    assert reply.status == "accepted" and reply.staleness == 0
    s = w.stats()
    assert s["reconnects"] == 0 and s["registrations"] == 1 and s["iterations"] == 1
    assert coord.stats()["deferred_granted"] == 1


class LateToy(Toy):
    """A Toy whose hypergradient (its outer loss) waits for ``late_gate``: the worker is then
    past its last lease check, so a cancellation arriving now cannot stop the commit."""

    def __init__(self) -> None:
        super().__init__()
        self.in_hypergradient = threading.Event()
        self.late_gate = threading.Event()

    def outer_loss(self, params, outer_params, batch=None):
        self.in_hypergradient.set()
        assert self.late_gate.wait(30), "the test never opened the late gate"
        return super().outer_loss(params, outer_params, batch)


@pytest.mark.timeout(30)
@pytest.mark.filterwarnings("ignore::chronos.distributed.aggregation.WindowStalenessWarning")
def test_rejected_commit_is_counted_and_the_worker_goes_on(
    coordinator_factory, workers, raw_clients
):
    prob = LateToy()
    coord = coordinator_factory(prob, max_staleness=0, max_in_flight=10, min_commits=1)
    w = workers(prob, coord.address, worker_id="slow")
    w.connect()
    box: dict[str, Any] = {}
    t = threading.Thread(target=lambda: box.setdefault("reply", w.step()))
    t.start()
    try:
        assert prob.in_hypergradient.wait(10)  # holds version 0, past its last lease check
        pusher = raw_clients(coord.address, "pusher")
        pusher.register()
        pusher.commit(pusher.checkout().version, {"lam": torch.ones(8, dtype=torch.float64)})
        assert coord.stats()["leases_cancelled"] == 1  # too late for this worker to notice
    finally:
        prob.late_gate.set()
        t.join(20)
    reply = box["reply"]
    assert reply.status == "rejected" and reply.staleness == 1 and "max_staleness" in reply.reason
    assert w.stats()["commits_rejected"] == 1 and coord.version == 1
    again = w.step()  # a fresh checkout of version 1: accepted
    assert again is not None and again.status == "accepted" and again.staleness == 0
    assert w.stats()["commits_accepted"] == 1 and coord.version == 2


@pytest.mark.timeout(30)
@pytest.mark.filterwarnings("ignore::chronos.distributed.aggregation.WindowStalenessWarning")
def test_cancelled_lease_is_abandoned_mid_solve_and_the_worker_checks_out_again(
    coordinator_factory, workers, raw_clients
):
    """Real sockets: the coordinator cancels a lease that can no longer be accepted and the
    worker stops its inner solve (which would otherwise never end) without committing."""
    prob = Toy()
    prob.endless = True  # only a stop or a cancellation ends this solve
    coord = coordinator_factory(prob, max_staleness=0, max_in_flight=10, min_commits=1)
    w = workers(prob, coord.address, worker_id="slow")
    w.connect()
    box: dict[str, Any] = {}
    t = threading.Thread(target=lambda: box.setdefault("reply", w.step()))
    t.start()
    try:
        assert prob.entered.wait(10)  # the worker holds version 0 and is solving
        pusher = raw_clients(coord.address, "pusher")
        pusher.register()
        pusher.commit(pusher.checkout().version, {"lam": torch.ones(8, dtype=torch.float64)})
        t.join(20)  # the cancellation ends the endless solve
    finally:
        if t.is_alive():
            w.stop()
            t.join(10)
    assert box["reply"] is None
    s = w.stats()
    assert s["leases_cancelled"] == 1 and s["commits_sent"] == 0 and s["iterations"] == 0
    c = coord.stats()
    assert c["leases_cancelled"] == 1 and c["commits_rejected"] == 0 and c["leases"] == 0
    prob.endless = False
    again = w.step()  # a fresh checkout of version 1: accepted
    assert again is not None and again.status == "accepted" and again.staleness == 0
    assert coord.version == 2 and w.stats()["leases_cancelled"] == 1


# -- liveness ------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_heartbeats_keep_the_lease_through_a_solve_longer_than_lease_timeout(
    coordinator_factory, workers
):
    prob = Toy()
    prob.busy_s = 1.5  # 3 lease timeouts of pure-Python work on the compute thread
    coord = coordinator_factory(prob, lease_timeout=0.5, heartbeat_interval=0.1)
    w = workers(prob, coord.address, worker_id="busy")
    w.connect()
    reply = w.step()
    assert reply is not None and reply.status == "accepted" and reply.staleness == 0
    s, cs = w.stats(), coord.stats()
    assert s["heartbeats"] >= 5 and s["reconnects"] == 0 and s["registrations"] == 1
    assert cs["workers_expired"] == 0 and cs["leases_expired"] == 0 and cs["errors"] == 0


@pytest.mark.timeout(20)
def test_connect_timeout_raises_a_clear_error_when_no_coordinator_appears(workers):
    port = free_port()
    w = workers(Toy(), f"tcp://127.0.0.1:{port}", connect_timeout=0.5, request_timeout=0.2)
    t0 = time.monotonic()
    with pytest.raises(ChronosError, match=rf"no coordinator answered at tcp://127\.0\.0\.1:"
                                           rf"{port} within connect_timeout=0\.5 s"):
        w.run()
    assert time.monotonic() - t0 < 5.0
    assert not net_threads()


def _start_coordinator_process(port: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "chronos.cli", "coordinator", "--problem", "test_worker:toy_problem",
         "--port", str(port), "--report-every", "60", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # bounded by the test's timeout
    m = re.search(r"listening on (tcp://127\.0\.0\.1:\d+)", line)
    if m is None:
        proc.kill()
        proc.wait()
        raise AssertionError(f"coordinator did not start: {line!r}")
    return proc, m.group(1)


@pytest.mark.timeout(60)
def test_reconnects_to_a_restarted_coordinator_on_the_same_port_and_goes_on(workers):
    opts = ["--steps", "0", "--heartbeat-interval", "0.1", "--lease-timeout", "5",
            "--max-staleness", "1000", "--max-in-flight", "1000", "--outer-lr", "0.01"]
    first, address = _start_coordinator_process(0, opts)
    second = None
    w = workers(Toy(), address, worker_id="phoenix", request_timeout=0.5, connect_timeout=30.0)
    runner = threading.Thread(target=w.run)
    try:
        runner.start()
        wait_until(lambda: w.stats()["commits_accepted"] >= 2, what="commits to the first one")
        first.kill()  # it goes away without telling anyone
        first.wait(10)
        accepted_before = w.stats()["commits_accepted"]
        second, address2 = _start_coordinator_process(int(address.rsplit(":", 1)[1]), opts)
        assert address2 == address
        wait_until(lambda: w.stats()["commits_accepted"] >= accepted_before + 3, timeout=30,
                   what="commits accepted by the new coordinator")
        s = w.stats()
        assert s["reconnects"] >= 1 and s["registrations"] >= 2
        second.send_signal(signal.SIGTERM)  # a clean stop: tells the worker to leave
        out, _ = second.communicate(timeout=20)
        runner.join(20)
        assert not runner.is_alive()
        m = re.search(r"stopped at version (\d+)", out)
        assert m is not None and int(m.group(1)) >= 3, out  # the new coordinator advanced
        assert second.returncode == 0
        assert "stopped" in w.stop_reason
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
        w.stop()
        runner.join(10)


# -- re-sends, duplicates, idempotence -------------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_lost_commit_reply_is_resent_with_the_same_request_and_commit_id(
    fake_coordinator, workers
):
    commits: list[Commit] = []

    def handler(msg: Message) -> list[Message]:
        if isinstance(msg, Checkout):
            return [_grant(msg)]
        assert isinstance(msg, Commit)
        commits.append(msg)
        return [] if len(commits) == 1 else [_accept(msg)]  # the first reply is "lost"

    fake = fake_coordinator(handler)
    w = workers(Toy(), fake.address, worker_id="resend", request_timeout=0.3)
    w.connect()
    reply = w.step()
    assert reply is not None and reply.status == "accepted"
    assert len(commits) == 2
    assert commits[0].commit_id == commits[1].commit_id
    assert commits[0].request_id == commits[1].request_id == reply.request_id
    assert torch.equal(commits[0].hypergradient["lam"], commits[1].hypergradient["lam"])
    assert w.stats()["resends"] == 1 and w.stats()["reconnects"] == 0


@pytest.mark.timeout(30)
def test_resent_commit_is_applied_once_by_the_real_coordinator(coordinator_factory, workers):
    coord = coordinator_factory()
    w = workers(Toy(), coord.address, worker_id="twice")
    w.connect()
    w.step()
    assert coord.version == 1 and coord.stats()["commits_accepted"] == 1
    # replay the commit exactly as the worker sent it (same worker id and commit id), from a
    # new connection once the worker left: applied once
    sent = w.commit_log[-1]
    w.close()
    raw = ClientTransport(coord.address)

    def call(msg: Any) -> Any:  # the reply to msg (liveness probes, request id -1, skipped)
        raw.send_message(msg)
        while True:
            reply = raw.recv_message(timeout_ms=5000)
            if reply is None or reply.request_id == msg.request_id:
                return reply

    try:
        # the worker's Deregister is on its way: the id may still be taken for a moment
        wait_until(lambda: isinstance(call(Register(request_id=1, worker_id="twice")),
                                      Registered), what="the id to be free again")
        dup = call(Commit(request_id=2, worker_id="twice", version=0, commit_id=sent.commit_id,
                          hypergradient={"lam": torch.ones(8, dtype=torch.float64)}))
    finally:
        raw.close()
    assert isinstance(dup, CommitReply) and dup.status == "duplicate"
    assert coord.version == 1 and coord.stats()["commits_accepted"] == 1


@pytest.mark.timeout(30)
def test_duplicate_worker_id_is_refused_with_a_clear_error(coordinator_factory, workers):
    coord = coordinator_factory()
    a = workers(Toy(), coord.address, worker_id="same-id", request_timeout=0.3)
    a.connect()
    b = workers(Toy(), coord.address, worker_id="same-id")
    with pytest.raises(ChronosError, match="already registered by another live worker"):
        b.connect()
    # b's connection cannot take a's worker id (it belongs to a's connection): a goes on.
    reply = a.step()
    assert reply is not None and reply.status == "accepted"
    assert a.stats()["registrations"] >= 1 and coord.stats()["workers_alive"] == 1


@pytest.mark.timeout(30)
def test_a_restarted_worker_with_the_same_id_is_not_mistaken_for_a_duplicate(
    coordinator_factory, workers
):
    coord = coordinator_factory()
    a = workers(Toy(), coord.address, worker_id="reborn")
    a.run(max_iterations=1)  # closes and deregisters on the way out
    wait_until(lambda: coord.stats()["deregistrations"] == 1, what="the deregistration")
    assert coord.stats()["workers_alive"] == 0
    b = workers(Toy(), coord.address, worker_id="reborn")
    b.run(max_iterations=1)
    assert [r.status for r in (*a.commit_log, *b.commit_log)] == ["accepted", "accepted"]
    assert a.commit_log[0].commit_id != b.commit_log[0].commit_id
    assert coord.version == 2


@pytest.mark.timeout(30)
def test_a_commit_the_coordinator_cannot_place_is_dropped_not_fatal(fake_coordinator, workers):
    def handler(msg: Message) -> list[Message]:
        if isinstance(msg, Checkout):
            return [_grant(msg)]
        return [ErrorReply(request_id=msg.request_id, code="bad_version",
                           message="version 0 was never issued here")]

    fake = fake_coordinator(handler)
    w = workers(Toy(), fake.address, worker_id="orphan")
    w.connect()
    assert w.step() is None
    assert w.stats()["commits_refused"] == 1
    assert w.step() is None and w.stats()["iterations"] == 2  # still working


# -- stopping ------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_shutdown_notice_during_a_deferred_checkout_ends_run_promptly(fake_coordinator, workers):
    asked = threading.Event()

    def handler(msg: Message) -> list[Message]:
        asked.set()
        return [CheckoutReply(request_id=msg.request_id, status="deferred", version=0)]

    fake = fake_coordinator(handler)
    w = workers(Toy(), fake.address, worker_id="leaver")
    runner = threading.Thread(target=w.run)
    runner.start()
    try:
        assert asked.wait(10)
        fake.send(ShutdownNotice(request_id=-1, reason="job done"))
    finally:
        runner.join(10)
    assert not runner.is_alive()
    assert w.stop_reason == "job done" and w.stats()["iterations"] == 0
    assert "deregister" not in fake.ops()  # the coordinator is going away: no goodbye needed


@pytest.mark.timeout(30)
def test_stop_interrupts_a_long_inner_solve(coordinator_factory, workers):
    prob = Toy()
    prob.endless = True
    coord = coordinator_factory(prob)
    w = workers(prob, coord.address, worker_id="endless")
    runner = threading.Thread(target=w.run)
    runner.start()
    try:
        assert prob.entered.wait(10)
        t0 = time.monotonic()
        w.stop()
        runner.join(10)
        assert time.monotonic() - t0 < 2.0
    finally:
        w.stop()
        runner.join(10)
    assert not runner.is_alive() and w.stats()["iterations"] == 0
    wait_until(lambda: coord.stats()["deregistrations"] == 1, what="the deregistration")


# -- significance filter with error feedback -----------------------------------------------------


@pytest.mark.timeout(30)
def test_significance_filter_holds_back_small_hypergradients_and_sends_them_later(
    coordinator_factory, workers
):
    """A held-back round is a local step (λ_local ← λ_local − η·g), not a pause: the next
    solve runs elsewhere, and the residual is sent once ‖η·r‖/(‖λ‖ + scale) is significant."""
    n = 1024
    prob = Toy(n=n, init=1.0)
    lam = prob.default_outer_params()["lam"]
    g = prob.closed_form_hypergradient(lam)
    eta = 0.1
    ratio = eta * float(g.norm()) / (float(lam.norm()) + eta * float(g.norm()))  # one round
    coord = coordinator_factory(prob, min_commits=10**6)  # λ stays put on the coordinator
    filtered = workers(prob, coord.address, worker_id="sparse",
                       significance_threshold=1.5 * ratio, local_lr=eta)
    dense = workers(Toy(n=n, init=1.0), coord.address, worker_id="dense")
    filtered.connect()
    outcomes = []
    for _ in range(6):
        reply = filtered.step()
        outcomes.append(None if reply is None else reply.status)
        fb = filtered.error_feedback()
        total = td.add(fb["sent"], fb["residual"])
        assert torch.allclose(total["lam"], fb["computed"]["lam"], rtol=1e-12, atol=1e-15)
    # one held back, then sent together with the next one (≈ 2·g: about 2·ratio > 1.5·ratio)
    assert outcomes == [None, "accepted"] * 3
    seen = [s["lam"] for s in prob.seen]
    for before, after in itertools.pairwise(seen):  # a local step every round
        step = prob.closed_form_hypergradient(before) * eta
        assert torch.allclose(after, before - step, rtol=0, atol=1e-9)
    fb = filtered.error_feedback()
    expected = sum(prob.closed_form_hypergradient(lam_i) for lam_i in seen)  # at 6 points
    assert torch.allclose(fb["computed"]["lam"], expected, rtol=1e-6)
    assert torch.allclose(fb["sent"]["lam"], fb["computed"]["lam"], rtol=1e-12, atol=0)
    assert float(td.norm(fb["residual"])) == 0.0
    s = filtered.stats()
    assert s["commits_skipped"] == 3 and s["commits_sent"] == 3 and s["iterations"] == 6
    dense.connect()
    for _ in range(6):
        dense.step()
    assert dense.stats()["commits_sent"] == 6
    # half the commits: about half the bytes (each commit carries 8 KiB of hypergradient)
    assert s["bytes_sent"] < dense.stats()["bytes_sent"] - 2 * 8 * n


@pytest.mark.timeout(30)
def test_residual_is_never_lost_under_random_hypergradients(coordinator_factory, workers):
    prob = Toy(n=16, init=0.5)
    coord = coordinator_factory(prob, min_commits=10**6, outer_lr=0.5)
    w = workers(prob, coord.address, worker_id="ef", significance_threshold=0.05, local_lr=0.5)
    w.connect()
    for _ in range(8):
        w.step()
    fb = w.error_feedback()
    assert torch.allclose(td.add(fb["sent"], fb["residual"])["lam"], fb["computed"]["lam"],
                          rtol=1e-12, atol=1e-15)
    s = w.stats()
    assert s["commits_sent"] + s["commits_skipped"] == 8
    assert s["commits_sent"] >= 1 and s["commits_skipped"] >= 1
    assert s["residual_norm"] == pytest.approx(float(td.norm(fb["residual"])))


# -- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"coordinator_addr": "127.0.0.1:5555"}, "coordinator_addr"),
        ({"coordinator_addr": "tcp://127.0.0.1"}, "coordinator_addr"),
        ({"coordinator_addr": "tcp://127.0.0.1:99999"}, "port 1-65535"),
        ({"worker_id": ""}, "worker_id"),
        ({"worker_id": "x" * 201}, "worker_id"),
        ({"hypergradient": "magic"}, "hypergradient"),
        ({"method": "gauss"}, "method must be one of"),
        ({"inner_steps": 0}, "inner_steps"),
        ({"inner_steps": 2.5}, "inner_steps"),
        ({"max_iter": True}, "max_iter"),
        ({"tol": -1.0}, "tol"),
        ({"significance_threshold": math.nan}, "significance_threshold"),
        ({"significance_threshold": "0.1"}, "significance_threshold"),
        ({"significance_threshold": -0.1}, "significance_threshold"),
        ({"max_skip": 0}, "max_skip"),
        ({"max_skip": 2.0}, "max_skip"),
        ({"target_rate": 0.0}, "target_rate"),
        ({"target_rate": 1.5}, "target_rate"),
        ({"local_lr": 0.0}, "local_lr"),
        ({"local_lr": math.inf}, "local_lr"),
        ({"codec": "zip"}, "codec"),
        ({"codec": ""}, "codec"),
        ({"request_timeout": 0}, "request_timeout"),
        ({"connect_timeout": math.inf}, "connect_timeout"),
        ({"heartbeat_interval": -1.0}, "heartbeat_interval"),
        ({"straggler_delay": math.nan}, "straggler_delay"),
        ({"num_threads": 0}, "num_threads"),
        ({"unroll_lr": 0.0}, "unroll_lr"),
        ({"warm_start": "yes"}, "warm_start"),
    ],
)
def test_worker_config_rejects_bad_values_with_a_message_naming_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        WorkerConfig(**kwargs)


def test_worker_config_accepts_the_readme_shapes():
    WorkerConfig(coordinator_addr="tcp://localhost:5555", significance_threshold=0.01)
    WorkerConfig(coordinator_addr="tcp://[::1]:5555", unroll_lr="lr", heartbeat_interval=0.5)
    with pytest.raises(ConfigError, match="InnerProblem"):
        Worker(object())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="WorkerConfig"):
        Worker(Toy(), {"coordinator_addr": "tcp://127.0.0.1:5555"})  # type: ignore[arg-type]


def test_a_closed_worker_cannot_be_reused():
    w = Worker(Toy(), WorkerConfig(coordinator_addr=f"tcp://127.0.0.1:{free_port()}"))
    w.close()
    with pytest.raises(ChronosError, match="closed"):
        w.connect()
