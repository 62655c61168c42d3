"""Who may speak for a worker id (state machine): the connection that registered it, the CURVE
key that first registered it (or the key named after it), and nobody else; leases and
per-worker commit ids."""

from __future__ import annotations

import torch

from chronos.distributed.messages import (
    Checkout,
    Commit,
    CommitReply,
    Deregister,
    ErrorReply,
    Heartbeat,
    Register,
    Registered,
)
from chronos.distributed.state import CoordinatorConfig, CoordinatorState

LAM = {"a": torch.tensor([1.0, 2.0], dtype=torch.float64)}


def state(**kw: object) -> CoordinatorState:
    return CoordinatorState(LAM, CoordinatorConfig(optimizer="sgd", outer_lr=0.1, min_commits=1),
                            **kw)  # type: ignore[arg-type]


def reply(out: list, conn: str) -> object:  # type: ignore[type-arg]
    (o,) = [o for o in out if o.to == conn]
    return o.message


def commit(wid: str, cid: str, version: int = 0) -> Commit:
    return Commit(request_id=9, worker_id=wid, version=version, commit_id=cid,
                  hypergradient={"a": torch.ones(2, dtype=torch.float64)})


def test_only_the_registering_connection_speaks_for_a_worker() -> None:
    s = state()
    assert isinstance(reply(s.handle("c1", Register(request_id=1, worker_id="w"), 0.0), "c1"),
                      Registered)
    for msg in (Heartbeat(request_id=2, worker_id="w"), Checkout(request_id=3, worker_id="w"),
                commit("w", "x"), Deregister(request_id=4, worker_id="w"),
                Register(request_id=5, worker_id="w")):
        out = s.handle("evil", msg, 1.0)
        err = reply(out, "evil")
        assert isinstance(err, ErrorReply) and err.code in ("not_owner", "duplicate_worker")
        assert all(o.to == "evil" for o in out)  # nothing reaches the real worker
    assert s.workers == ("w",) and s.connections == {"w": "c1"} and s.version == 0
    assert s.stats()["impersonations"] == 4


def test_a_closed_connection_lets_its_worker_go_and_frees_the_id() -> None:
    s = state()
    s.handle("c1", Register(request_id=1, worker_id="w"), 0.0)
    s.handle("c1", Checkout(request_id=2, worker_id="w"), 0.0)
    s.disconnected("c1", 0.5)
    assert s.workers == () and "w" not in s.leases
    assert s.stats()["workers_disconnected"] == 1
    assert isinstance(reply(s.handle("c2", Register(request_id=1, worker_id="w"), 0.6), "c2"),
                      Registered)
    s.disconnected("nobody", 0.7)  # unknown connections: nothing
    assert s.workers == ("w",)


def test_a_curve_key_is_bound_to_its_worker_id_and_a_restart_supersedes() -> None:
    s = state(key_names={"KEY-A": "a"})
    # a key named after a worker may register only that id
    err = reply(s.handle("c1", Register(request_id=1, worker_id="b"), 0.0, principal="KEY-A"),
                "c1")
    assert isinstance(err, ErrorReply) and err.code == "not_owner"
    s.handle("c1", Register(request_id=2, worker_id="a"), 0.0, principal="KEY-A")
    # an unnamed key binds the id it registers first; another key cannot take it
    s.handle("c2", Register(request_id=1, worker_id="z"), 0.0, principal="KEY-Z")
    s.handle("c2", Deregister(request_id=2, worker_id="z"), 0.0, principal="KEY-Z")
    err = reply(s.handle("c3", Register(request_id=1, worker_id="z"), 0.0, principal="KEY-Q"),
                "c3")
    assert isinstance(err, ErrorReply) and err.code == "not_owner"
    # the same key from a new connection: the old registration (and its lease) goes
    s.handle("c1", Checkout(request_id=3, worker_id="a"), 0.0, principal="KEY-A")
    assert "a" in s.leases
    out = s.handle("c9", Register(request_id=1, worker_id="a"), 1.0, principal="KEY-A")
    assert isinstance(reply(out, "c9"), Registered)
    assert s.connections["a"] == "c9" and "a" not in s.leases
    assert s.stats()["registrations_superseded"] == 1


def test_commits_need_a_lease_and_ids_are_per_worker() -> None:
    s = state()
    for c, w in (("c1", "w1"), ("c2", "w2")):
        s.handle(c, Register(request_id=1, worker_id=w), 0.0)
    err = reply(s.handle("c2", commit("w2", "x"), 0.0), "c2")
    assert isinstance(err, ErrorReply) and err.code == "no_lease" and s.version == 0
    # w2 takes w1's next commit id first: w1's commit is still its own, and applied
    s.handle("c2", Checkout(request_id=2, worker_id="w2"), 0.0)
    s.handle("c2", commit("w2", "w1-next"), 0.0)
    s.handle("c1", Checkout(request_id=2, worker_id="w1"), 0.0)
    ok = reply(s.handle("c1", commit("w1", "w1-next", version=1), 0.0), "c1")
    assert isinstance(ok, CommitReply) and ok.status == "accepted" and s.version == 2
    again = reply(s.handle("c1", commit("w1", "w1-next", version=1), 0.0), "c1")
    assert isinstance(again, CommitReply) and again.status == "duplicate" and s.version == 2
    assert s.stats()["commits_without_lease"] == 1
