"""Durability of the coordinator's state: a state restored from a snapshot plus the journal
records written after it equals the state that wrote them, bit for bit (state machine), and a
coordinator killed with SIGKILL comes back from its state directory with the last acknowledged
version, λ and optimizer state (real processes, real sockets)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chronos.distributed.journal import Journal
from chronos.distributed.messages import (
    Checkout,
    CheckoutReply,
    Commit,
    CommitReply,
    Deregister,
    ErrorReply,
    Heartbeat,
    Register,
    Registered,
)
from chronos.distributed.state import CoordinatorConfig, CoordinatorState
from chronos.distributed.transport import ClientTransport

F64 = torch.float64
WORKERS = ("w0", "w1", "w2")

CONFIGS = {
    "sgd-latest": dict(optimizer="sgd", outer_lr=0.1),
    "adam-latest": dict(optimizer="adam", outer_lr=0.05),
    "adam-buffered": dict(optimizer="adam", outer_lr=0.05, aggregation="buffered",
                          min_commits=2),
    "momentum-sync": dict(optimizer="momentum", outer_lr=0.05, mode="sync", num_workers=2),
}


def lam0() -> dict[str, torch.Tensor]:
    return {"a": torch.tensor([1.0, -2.0, 0.5], dtype=F64), "b": torch.tensor(3.0, dtype=F64)}


def make(name: str) -> CoordinatorState:
    return CoordinatorState(lam0(), CoordinatorConfig(**CONFIGS[name]), durable=True)


# one event: (kind, worker index, a number used as gradient seed / time step)
events = st.lists(
    st.tuples(st.sampled_from(["register", "checkout", "commit", "commit", "commit",
                               "heartbeat", "deregister", "disconnect", "tick", "resend"]),
              st.integers(0, 2), st.integers(0, 10_000)),
    min_size=1, max_size=60,
)


class Run:
    """Feeds events to a state, keeping request / commit ids and each worker's lease."""

    def __init__(self, state: CoordinatorState) -> None:
        self.s = state
        self.rid = 0
        self.now = 0.0
        self.held: dict[str, int] = {}
        self.last_commit: dict[str, Commit] = {}

    def apply(self, kind: str, i: int, x: int) -> None:
        w = WORKERS[i]
        self.rid += 1
        self.now += 0.25
        s = self.s
        if kind == "register":
            s.handle(w, Register(request_id=self.rid, worker_id=w), self.now)
        elif kind == "checkout":
            for o in s.handle(w, Checkout(request_id=self.rid, worker_id=w), self.now):
                if isinstance(o.message, CheckoutReply) and o.message.status == "granted":
                    self.held[o.to] = o.message.version
        elif kind in ("commit", "resend"):
            msg = self.last_commit.get(w) if kind == "resend" else None
            if msg is None:
                g = torch.Generator().manual_seed(x)
                grad = {"a": torch.randn(3, generator=g, dtype=F64),
                        "b": torch.randn((), generator=g, dtype=F64)}
                msg = Commit(request_id=self.rid, worker_id=w,
                             version=self.held.get(w, s.version), commit_id=f"{w}-{self.rid}",
                             hypergradient=grad, metrics={"outer_loss": x / 1000})
                self.last_commit[w] = msg
            s.handle(w, msg, self.now)
        elif kind == "heartbeat":
            s.handle(w, Heartbeat(request_id=self.rid, worker_id=w), self.now)
        elif kind == "deregister":
            s.handle(w, Deregister(request_id=self.rid, worker_id=w), self.now)
        elif kind == "disconnect":
            s.disconnected(w, self.now)
        else:
            self.now += x / 1000
            s.tick(self.now)


def same_tensors(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and \
            bool(torch.equal(a.view(-1).view(torch.uint8) if a.numel() else a,
                             b.view(-1).view(torch.uint8) if b.numel() else b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(
            same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(
            same_tensors(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def durable_view(s: CoordinatorState) -> dict[str, Any]:
    """What must survive a restart (connections, liveness and leases are runtime)."""
    d = s.durable_state()
    stats = s.stats()
    return {
        "version": s.version,
        "lam": d["meta"]["outer_params"],
        "opt": d["meta"]["optimizer_state"],
        "history": d["meta"]["history"],
        "seen": d["seen_commits"],
        "latest": d["latest"],
        "aggregate": d["aggregate"],
        "sync": sorted(d["sync_committed"]),
        "accepted": stats["commits_accepted"],
        "steps": stats["steps"],
        "ledger": {w: (r["accepted"], r["contribution"], r["steps"])  # registrations are
                   for w, r in stats["workers"].items() if r["accepted"] or r["steps"]},  # not
    }


@pytest.mark.parametrize("name", sorted(CONFIGS))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(before=events, after=events)
def test_snapshot_plus_replayed_records_equals_the_state_that_wrote_them(
    name: str, before: list[tuple[str, int, int]], after: list[tuple[str, int, int]]
) -> None:
    run = Run(make(name))
    for e in before:
        run.apply(*e)
    tree = run.s.durable_state()  # a snapshot here ...
    run.s.drain_records()
    for e in after:
        run.apply(*e)
    records = run.s.drain_records()  # ... and the log after it
    back = make(name)
    back.restore(tree, records)
    assert same_tensors(durable_view(back), durable_view(run.s))
    # the optimizer state is exact: one more identical step gives bit-identical λ
    g = {"a": torch.full((3,), 0.3, dtype=F64), "b": torch.tensor(-0.2, dtype=F64)}
    assert back._apply_step({k: v.clone() for k, v in g.items()}, {}, {}) == \
        run.s._apply_step({k: v.clone() for k, v in g.items()}, {}, {})
    assert same_tensors(back.outer_params, run.s.outer_params)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@settings(max_examples=25, deadline=None)
@given(trace=events)
def test_replaying_every_record_from_the_start_equals_the_live_state(
    name: str, trace: list[tuple[str, int, int]]
) -> None:
    run = Run(make(name))
    for e in trace:
        run.apply(*e)
    back = make(name)
    back.restore(None, run.s.drain_records())
    assert same_tensors(durable_view(back), durable_view(run.s))


def test_a_restored_lease_lets_the_in_flight_commit_count_and_ids_stay_remembered() -> None:
    run = Run(make("sgd-latest"))
    for e in [("register", 0, 0), ("checkout", 0, 0), ("commit", 0, 1), ("checkout", 0, 0)]:
        run.apply(*e)
    in_flight = run.held["w0"]
    done = run.last_commit["w0"]
    back = make("sgd-latest")
    back.restore(None, run.s.drain_records())
    assert back.workers == ()  # workers register again ...
    back.handle("c9", Register(request_id=1, worker_id="w0"), 10.0)
    assert back.leases["w0"].version == in_flight  # ... and get their lease back
    out = back.handle("c9", Commit(request_id=2, worker_id="w0", version=in_flight,
                                   commit_id="late", hypergradient=lam0()), 10.0)
    assert out[0].message.status == "accepted"
    again = back.handle("c9", done, 10.0)[0].message  # acknowledged before: not twice
    assert isinstance(again, CommitReply) and again.status == "duplicate"


def test_a_step_that_would_make_lambda_infinite_is_refused_and_journaled() -> None:
    s = CoordinatorState({"a": torch.zeros(2)}, CoordinatorConfig(optimizer="sgd", outer_lr=1.0,
                                                                  min_commits=1), durable=True)
    s.handle("x", Register(request_id=1, worker_id="x"), 0.0)
    huge = torch.full((2,), torch.finfo(torch.float32).max)
    for i in range(3):
        s.handle("x", Checkout(request_id=10 + i, worker_id="x"), 0.0)
        out = s.handle("x", Commit(request_id=20 + i, worker_id="x", version=s.version,
                                   commit_id=f"c{i}", hypergradient={"a": huge.clone()}), 0.0)
        assert torch.isfinite(s.outer_params["a"]).all()
    err = out[0].message
    assert isinstance(err, ErrorReply) and err.code == "non_finite" and "refused" in err.message
    assert s.stats()["steps_refused"] >= 1
    back = CoordinatorState({"a": torch.zeros(2)}, s.config, durable=True)
    back.restore(None, s.drain_records())
    assert back.version == s.version and torch.equal(back.outer_params["a"], s.outer_params["a"])


# -- a real coordinator process killed with SIGKILL -------------------------------------------

_SERVER = textwrap.dedent("""
    import sys, threading, torch
    from chronos.distributed.coordinator import Coordinator
    name, n = sys.argv[3], int(sys.argv[4])
    c = Coordinator({name: torch.zeros(n, dtype=torch.float64)}, port=int(sys.argv[2]),
                    state_dir=sys.argv[1], optimizer="adam", outer_lr=0.1, min_commits=1,
                    snapshot_every=5, aggregation="buffered", heartbeat_interval=0.5)
    c.start()
    print(c.version, flush=True)
    threading.Event().wait()
""")


def _serve(state_dir: str, port: int, name: str = "w",
           n: int = 4) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, "-c", _SERVER, state_dir, str(port), name, str(n)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # printed once bound and restored
    assert line, "the coordinator process did not start"
    return proc, int(line)


def _call(t: ClientTransport, msg: Any) -> Any:
    t.send_message(msg)
    while True:  # skip liveness probes (request id -1): the coordinator checks connections
        reply = t.recv_message(timeout_ms=10_000)
        assert reply is not None, f"no reply to {msg.op}"
        if reply.request_id == msg.request_id:
            return reply


def _grad(i: int) -> dict[str, torch.Tensor]:
    return {"w": torch.randn(4, generator=torch.Generator().manual_seed(i), dtype=F64)}


@pytest.mark.timeout(120)
def test_sigkilled_coordinator_restarts_with_the_last_acknowledged_state_exactly(
    tmp_path: Any,
) -> None:
    from chronos.distributed.group import free_port

    state_dir, port = str(tmp_path / "state"), free_port()
    # the reference: the same commits through an undisturbed state machine
    ref = CoordinatorState({"w": torch.zeros(4, dtype=F64)}, CoordinatorConfig(
        optimizer="adam", outer_lr=0.1, min_commits=1, aggregation="buffered"))
    ref.handle("r", Register(request_id=0, worker_id="w"), 0.0)
    proc, version = _serve(state_dir, port)
    acked: list[str] = []
    try:
        assert version == 0
        for round_ in range(3):  # kill it twice, at different points
            t = ClientTransport(f"tcp://127.0.0.1:{port}")
            try:
                assert isinstance(_call(t, Register(request_id=1, worker_id="w")), Registered)
                for _ in range(7 + 4 * round_):
                    n = len(acked)
                    grant = _call(t, Checkout(request_id=10 + n, worker_id="w"))
                    assert grant.version == ref.version
                    reply = _call(t, Commit(request_id=1000 + n, worker_id="w",
                                            version=grant.version, commit_id=f"c{n}",
                                            hypergradient=_grad(n)))
                    assert isinstance(reply, CommitReply) and reply.status == "accepted"
                    acked.append(f"c{n}")
                    ref.handle("r", Checkout(request_id=n, worker_id="w"), 0.0)
                    ref.handle("r", Commit(request_id=n, worker_id="w", version=ref.version,
                                           commit_id=f"c{n}", hypergradient=_grad(n)), 0.0)
                    assert reply.version == ref.version
            finally:
                t.close()
            os.kill(proc.pid, signal.SIGKILL)  # no clean stop, no final snapshot
            proc.wait(timeout=10)
            proc, version = _serve(state_dir, port)
            assert version == ref.version  # restored, before any worker spoke
            t = ClientTransport(f"tcp://127.0.0.1:{port}")
            try:
                _call(t, Register(request_id=1, worker_id="w"))
                grant = _call(t, Checkout(request_id=2, worker_id="w"))
                assert grant.version == ref.version
                assert torch.equal(grant.outer_params["w"], ref.outer_params["w"])  # bit for bit
                # every acknowledged commit is remembered exactly once
                dup = _call(t, Commit(request_id=3, worker_id="w", version=grant.version,
                                      commit_id=acked[-1], hypergradient=_grad(0)))
                assert dup.status == "duplicate"
                _call(t, Deregister(request_id=4, worker_id="w"))
            finally:
                t.close()
    finally:
        proc.kill()
        proc.wait(timeout=10)
    # the optimizer state survived exactly: λ equal after further steps (checked above, each
    # round continues from the restored Adam moments); the log holds each commit once
    with Journal(state_dir) as j:
        tree, records = j.restore()
    assert tree is not None
    ids = [e[1] for e in tree["seen_commits"]] + [r.meta["c"] for r in records
                                                 if r.kind == "commit"]
    assert ids == acked  # every acknowledged commit, once, in order: none lost, none twice


@pytest.mark.timeout(120)
def test_workers_resume_by_themselves_after_the_coordinator_is_killed_and_restarted(
    tmp_path: Any, workers: Any,
) -> None:
    import threading

    from test_worker import Toy  # the worker tests' toy problem (θ*, dF/dλ in closed form)

    from chronos.distributed.group import free_port

    state_dir, port = str(tmp_path / "state"), free_port()
    address = f"tcp://127.0.0.1:{port}"
    proc, _ = _serve(state_dir, port, "lam", 8)
    ws = [workers(Toy(), address, worker_id=f"w{i}", request_timeout=1.0,
                  connect_timeout=30.0) for i in range(2)]
    errors: list[BaseException] = []

    def run(w: Any) -> None:
        try:
            w.run(max_iterations=40)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(w,), daemon=True) for w in ws]
    try:
        for w in ws:
            w.connect()
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while sum(w.stats()["commits_accepted"] for w in ws) < 10:
            assert time.monotonic() < deadline, "no progress before the kill"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        before = sum(w.stats()["commits_accepted"] for w in ws)
        proc, version = _serve(state_dir, port, "lam", 8)
        assert version >= 5  # restored (min_commits=1: one version per accepted commit)
        for t in threads:
            t.join(timeout=90)
        assert not errors, errors
        assert all(not t.is_alive() for t in threads)
        after = sum(w.stats()["commits_accepted"] for w in ws)
        assert after > before  # they went on against the restarted coordinator ...
        assert all(w.stats()["reconnects"] >= 1 for w in ws)  # ... after registering again
    finally:
        for w in ws:
            w.stop()
        proc.kill()
        proc.wait(timeout=10)
