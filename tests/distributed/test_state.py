"""Coordinator state machine: every rule of chronos.distributed.state, without sockets."""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings, target
from hypothesis import strategies as st

from chronos.core.errors import ChronosTypeError, ConfigError
from chronos.distributed.aggregation import CoordinatorConfig, sync_barrier_ready
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
from chronos.distributed.state import CoordinatorState, Outgoing

# many tests use a window wider than max_staleness on purpose (to get rejections)
pytestmark = pytest.mark.filterwarnings("ignore::chronos.distributed.aggregation."
                                        "WindowStalenessWarning")

F64 = torch.float64
T = 5.0  # lease_timeout used throughout


def lam0() -> dict[str, torch.Tensor]:
    return {"a": torch.tensor([1.0, 2.0], dtype=F64), "b": torch.tensor(0.5, dtype=F64)}


def grad(x: float = 1.0) -> dict[str, torch.Tensor]:
    return {"a": torch.tensor([x, 2 * x], dtype=F64), "b": torch.tensor(-x, dtype=F64)}


def config(**kw: Any) -> CoordinatorConfig:
    # the tests below check SGD arithmetic, per-commit stepping and the buffered rule's
    # decay ** s weights exactly: pin them (the defaults, Adam, min_commits="auto" and
    # aggregation="latest", have tests of their own: test_latest.py)
    base: dict[str, Any] = {"outer_lr": 0.5, "optimizer": "sgd", "min_commits": 1,
                            "aggregation": "buffered", "lease_timeout": T,
                            "heartbeat_interval": 1.0}  # fmt: skip
    return CoordinatorConfig(**(base | kw))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Driver:
    """Sends messages with fresh request / commit ids and keeps every output."""

    def __init__(self, state: CoordinatorState) -> None:
        self.s = state
        self.rids = itertools.count(100)
        self.log: list[Outgoing] = []
        self.inputs: list[tuple[str, Message | None, float]] = []  # (identity | "", msg, now)

    def send(
        self, wid: str, msg: Message, now: float, identity: str | None = None
    ) -> list[Outgoing]:
        identity = wid if identity is None else identity
        self.inputs.append((identity, msg, now))
        out = self.s.handle(identity, msg, now)
        self.log.extend(out)
        return out

    def register(self, wid: str, now: float = 0.0) -> list[Outgoing]:
        return self.send(wid, Register(request_id=next(self.rids), worker_id=wid), now)

    def checkout(
        self, wid: str, now: float = 0.0, have: int = -1, rid: int | None = None
    ) -> list[Outgoing]:
        rid = next(self.rids) if rid is None else rid
        return self.send(wid, Checkout(request_id=rid, worker_id=wid, have_version=have), now)

    def commit(
        self,
        wid: str,
        version: int,
        g: Any = None,
        now: float = 0.0,
        cid: str | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> list[Outgoing]:
        rid = next(self.rids)
        msg = Commit(
            request_id=rid,
            worker_id=wid,
            version=version,
            commit_id=f"{wid}-{rid}" if cid is None else cid,
            hypergradient=grad() if g is None else g,
            metrics=metrics or {},
        )
        return self.send(wid, msg, now)

    def heartbeat(self, wid: str, now: float) -> list[Outgoing]:
        return self.send(wid, Heartbeat(request_id=next(self.rids), worker_id=wid), now)

    def deregister(self, wid: str, now: float) -> list[Outgoing]:
        """The other messages a Deregister causes; its own acknowledgement (a HeartbeatAck
        with its request id) is checked and left out."""
        rid = next(self.rids)
        out = self.send(wid, Deregister(request_id=rid, worker_id=wid), now)
        acks = [o for o in out if isinstance(o.message, HeartbeatAck)
                and o.message.request_id == rid]
        if acks:
            assert acks[0].to == wid
            out.remove(acks[0])
        return out

    def tick(self, now: float, optional: bool = False) -> list[Outgoing]:
        self.inputs.append(("" if optional else "tick", None, now))
        out = self.s.tick(now)
        self.log.extend(out)
        return out

    def join(self, *wids: str, now: float = 0.0) -> None:
        for w in wids:
            self.register(w, now)
            assert only(self.checkout(w, now), CheckoutReply).status == "granted"


def only(out: Sequence[Outgoing], cls: type[Message]) -> Any:
    assert len(out) == 1 and isinstance(out[0].message, cls), out
    return out[0].message


def pick(out: Iterable[Outgoing], cls: type[Message], to: str | None = None) -> list[Any]:
    return [o.message for o in out if isinstance(o.message, cls) and (to is None or o.to == to)]


def driver(**kw: Any) -> Driver:
    return Driver(CoordinatorState(lam0(), config(**kw)))


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"mode": "lockstep"}, "'async' or 'sync'"),
        ({"mode": "sync"}, "needs num_workers"),
        ({"num_workers": 0}, "num_workers must be an int >= 1"),
        ({"max_in_flight": 0}, "max_in_flight must be >= 1"),
        ({"max_staleness": -1}, "max_staleness must be >= 0"),
        ({"decay": 0.0}, "decay must be in (0, 1]"),
        ({"lease_timeout": -1.0}, "lease_timeout must be a positive"),
        ({"heartbeat_interval": 5.0}, "must be < lease_timeout"),
        ({"outer_lr": 0.0}, "outer_lr must be a positive"),
        ({"optimizer": "lbfgs"}, "optimizer must be one of"),
        ({"min_commits": 0}, "min_commits must be an int >= 1"),
        ({"max_steps": 0}, "max_steps must be an int >= 1 or None"),
        ({"dedupe_window": 0}, "dedupe_window must be an int >= 1"),
    ],
)
def test_config_rejects_bad_values_and_says_what_is_accepted(
    kw: dict[str, Any], needle: str
) -> None:
    with pytest.raises(ConfigError) as info:
        config(**kw)
    assert needle in str(info.value)


def test_state_rejects_integer_outer_params_and_foreign_optimizer_factories() -> None:
    with pytest.raises(ConfigError, match="not floating point"):
        CoordinatorState({"n": torch.tensor([1, 2])}, config())
    other = [torch.zeros(1, requires_grad=True)]
    with pytest.raises(ConfigError, match="exactly the list of tensors"):
        CoordinatorState(lam0(), config(optimizer=lambda ps: torch.optim.SGD(other, lr=0.1)))
    with pytest.raises(ConfigError, match=r"must return a torch\.optim\.Optimizer"):
        CoordinatorState(lam0(), config(optimizer=lambda ps: None))
    with pytest.raises(ChronosTypeError):
        CoordinatorState(lam0(), {"mode": "async"})  # type: ignore[arg-type]


def test_floats_are_accepted_as_outer_params() -> None:
    s = CoordinatorState({"lr": 0.01}, config())
    assert s.outer_params["lr"].dtype == torch.get_default_dtype()


# -- registration, heartbeats, deregistration ---------------------------------------------------


def test_register_replies_with_version_and_worker_config() -> None:
    d = driver()
    reply = only(d.register("w0"), Registered)
    assert (reply.worker_id, reply.version) == ("w0", 0)
    assert reply.config == {"heartbeat_interval": 1.0, "lease_timeout": T, "mode": "async",
                            "optimizer": "sgd", "outer_lr": d.s.config.outer_optimizer()[1]}
    assert d.s.workers == ("w0",) and d.s.stats()["workers_alive"] == 1


def test_duplicate_registration_is_refused_but_reregistration_after_leaving_is_fine() -> None:
    d = driver()
    d.register("w0")
    assert only(d.register("w0", 1.0), ErrorReply).code == "duplicate_worker"
    d.deregister("w0", 1.0)
    assert only(d.register("w0", 1.0), Registered).worker_id == "w0"
    # silent for lease_timeout: expired, may register again
    assert only(d.register("w0", 1.0 + T), Registered).worker_id == "w0"
    st_ = d.s.stats()
    assert st_["workers_expired"] == 1 and st_["errors_by_code"] == {"duplicate_worker": 1}


def test_a_resent_copy_of_the_registering_register_is_answered_again() -> None:
    d = driver()
    first = Register(request_id=7, worker_id="w0", info={"nonce": "a1"})
    assert only(d.send("w0", first, 0.0), Registered).request_id == 7
    again = only(d.send("w0", first, 2.0), Registered)  # the same request, re-sent
    assert again.request_id == 7 and d.s.stats()["registrations"] == 1
    assert d.s.stats()["errors_by_code"] == {}
    # another Register for a live id is still a duplicate: another request id, or the same
    # request id from another worker (another nonce)
    for other in (Register(request_id=8, worker_id="w0", info={"nonce": "a1"}),
                  Register(request_id=7, worker_id="w0", info={"nonce": "b2"})):
        assert only(d.send("w0", other, 2.0), ErrorReply).code == "duplicate_worker"


def test_heartbeat_acks_with_version_and_renews_the_lease() -> None:
    d = driver()
    d.join("w0")
    assert d.s.leases["w0"].expires_at == T
    ack = only(d.heartbeat("w0", 3.0), HeartbeatAck)
    assert ack.version == 0
    assert d.s.leases["w0"].expires_at == 3.0 + T
    assert d.tick(3.0 + T - 0.1) == [] and d.s.workers == ("w0",)  # still alive thanks to it


def test_deregister_releases_lease_and_needs_no_lease() -> None:
    d = driver(max_in_flight=1)
    d.join("w0", "w1")
    d.commit("w0", 0)
    deferred = only(d.checkout("w0", rid=7), CheckoutReply)
    assert deferred.status == "deferred"
    out = d.deregister("w1", 1.0)  # w1's lease held the window
    assert [(o.to, o.message.request_id) for o in out] == [("w0", 7)]
    d.register("w2")
    assert d.deregister("w2", 1.0) == []  # no lease, no error
    assert only(d.deregister("w2", 1.0), ErrorReply).code == "unknown_worker"


# -- checkouts ---------------------------------------------------------------------------------


def test_checkout_grants_a_copy_of_lambda_or_not_modified() -> None:
    d = driver()
    d.register("w0")
    reply = only(d.checkout("w0"), CheckoutReply)
    assert reply.status == "granted" and reply.version == 0 and same(reply.outer_params, lam0())
    mine = d.s.outer_params
    mine["a"].add_(100.0)  # the property is a copy
    assert same(d.s.outer_params, lam0())
    d.commit("w0", 0)  # the step updates λ; the reply still holds version 0's λ
    assert d.s.version == 1 and not same(d.s.outer_params, lam0())
    assert same(reply.outer_params, lam0())
    d.checkout("w0")
    again = only(d.checkout("w0", have=1), CheckoutReply)
    assert again.status == "not_modified" and again.outer_params == {}
    st_ = d.s.stats()
    assert (st_["checkouts"], st_["checkouts_granted"], st_["checkouts_not_modified"]) == (3, 3, 1)


def test_deferred_checkout_is_granted_later_with_the_same_request_id() -> None:
    d = driver(max_in_flight=1)
    d.join("w0", "w1")
    d.commit("w0", 0, now=1.0)  # version 1; w1 still holds version 0
    deferred = only(d.checkout("w0", now=1.0, rid=42), CheckoutReply)
    assert (deferred.status, deferred.version) == ("deferred", 1) and "window" in deferred.reason
    assert d.s.pending_checkouts == {"w0": 42}
    # deferral blocks nobody else: w1 is served normally
    assert only(d.heartbeat("w1", 1.5), HeartbeatAck).version == 1
    out = d.commit("w1", 0, now=2.0)
    commit_reply, grant = pick(out, CommitReply, "w1"), pick(out, CheckoutReply, "w0")
    assert commit_reply[0].status == "accepted" and commit_reply[0].weight == 0.5
    assert len(grant) == 1 and grant[0].request_id == 42 and grant[0].status == "granted"
    assert grant[0].version == 2 and same(grant[0].outer_params, d.s.outer_params)
    assert d.s.pending_checkouts == {} and d.s.stats()["deferred_granted"] == 1


def test_deferred_checkout_is_answered_not_modified_when_lambda_did_not_change() -> None:
    d = driver(max_in_flight=1)
    d.join("w0", "w1")
    d.commit("w0", 0)
    assert only(d.checkout("w0", have=1, rid=9), CheckoutReply).status == "deferred"
    out = d.deregister("w1", 0.5)
    reply = only(out, CheckoutReply)
    assert (reply.request_id, reply.status, reply.version) == (9, "not_modified", 1)


def test_a_new_checkout_supersedes_a_deferred_one() -> None:
    d = driver(max_in_flight=1)
    d.join("w0", "w1")
    d.commit("w0", 0)
    d.checkout("w0", rid=1)
    d.checkout("w0", rid=2)
    assert d.s.pending_checkouts == {"w0": 2}
    assert [o.message.request_id for o in d.deregister("w1", 0.1)] == [2]
    assert d.s.stats()["checkouts_superseded"] == 1


def test_lease_expiry_frees_the_window() -> None:
    d = driver(max_in_flight=1)
    d.join("w0", "w1")  # both hold version 0 until T
    d.commit("w0", 0, now=1.0)
    only(d.checkout("w0", now=1.0, rid=5), CheckoutReply)
    assert d.tick(T - 0.01) == []  # w1's lease still live
    d.heartbeat("w0", T - 0.01)  # w0 stays alive while it waits
    out = d.tick(T)  # w1 silent for lease_timeout: it and its lease expire
    grant = only(out, CheckoutReply)
    assert (out[0].to, grant.request_id, grant.status) == ("w0", 5, "granted")
    assert "w1" not in d.s.leases and d.s.workers == ("w0",)
    st_ = d.s.stats()
    assert st_["leases_expired"] == 1 and st_["workers_expired"] == 1
    # the expired worker must register again
    assert only(d.commit("w1", 0, now=T), ErrorReply).code == "unknown_worker"


def test_handle_expires_first_so_ticks_are_optional() -> None:
    d = driver(max_in_flight=1)
    d.join("w0", "w1")
    d.commit("w0", 0, now=1.0)
    d.checkout("w0", now=1.0, rid=5)
    d.heartbeat("w0", 4.0)
    out = d.heartbeat("w0", T + 1.0)  # no tick in between: the grant comes before the ack
    assert [type(o.message) for o in out] == [CheckoutReply, HeartbeatAck]


def test_time_never_runs_backwards_and_must_be_finite() -> None:
    d = driver()
    d.join("w0", now=10.0)
    d.tick(10.0 + T)  # w0 expires
    assert only(d.heartbeat("w0", 0.0), ErrorReply).code == "unknown_worker"  # clamped, no revival
    with pytest.raises(ChronosTypeError):
        d.s.tick(float("nan"))


# -- commits: weights, rejection, duplicates ---------------------------------------------------


@pytest.mark.parametrize("decay", [0.5, 0.3])
def test_staleness_weight_is_really_applied(decay: float) -> None:
    """Under SGD a commit of staleness s moves λ exactly decay**s times as far as a fresh one."""
    d = driver(max_in_flight=5, max_staleness=3, decay=decay)
    d.join("w0", "w1", "w2", "w3")  # all on version 0
    g = grad(1.0)
    deltas = []
    for s, w in enumerate(["w0", "w1", "w2", "w3"]):
        before = d.s.outer_params
        reply = only(d.commit(w, 0, g), CommitReply)
        assert (reply.status, reply.staleness, reply.weight) == ("accepted", s, decay**s)
        assert reply.version == s + 1
        after = d.s.outer_params
        expected = {k: before[k] + (-0.5) * (decay**s * g[k]) for k in g}
        for k in g:
            torch.testing.assert_close(after[k], expected[k], rtol=0, atol=1e-15)
        deltas.append({k: after[k] - before[k] for k in g})
    for s in range(1, 4):
        for k in g:
            torch.testing.assert_close(deltas[s][k], decay**s * deltas[0][k], rtol=1e-12, atol=0)
    assert d.s.stats()["accepted_by_staleness"] == {0: 1, 1: 1, 2: 1, 3: 1}


def test_exact_numbers_with_power_of_two_decay() -> None:
    d = driver(max_in_flight=3, max_staleness=2)
    d.join("w0", "w1")
    d.commit("w0", 0, grad(1.0))  # λ_a = [1, 2] − 0.5·[1, 2] = [0.5, 1]
    d.commit("w1", 0, grad(1.0))  # − 0.5·0.5·[1, 2] = [0.25, 0.5]
    assert d.s.outer_params["a"].tolist() == [0.25, 0.5]
    assert d.s.outer_params["b"].item() == 0.5 + 0.5 + 0.25


def test_min_commits_aggregates_sum_of_weighted_grads_over_n_and_records_metrics() -> None:
    d = driver(max_in_flight=5, max_staleness=2, min_commits=2)
    d.join("w0", "w1", "w2", "w3")
    r = d.commit("w0", 0, grad(1.0), metrics={"inner_loss": 1.0, "outer_loss": 4.0})
    assert only(r, CommitReply).version == 0 and d.s.stats()["buffered_commits"] == 1
    d.commit("w1", 0, grad(3.0), metrics={"inner_loss": 3.0, "self": 1.0, "new_params": 2.0})
    assert d.s.version == 1  # g = (1 + 3)/2 = 2: λ_a = [1, 2] − 0.5·[2, 4]
    assert d.s.outer_params["a"].tolist() == [0.0, 0.0]
    # now one stale (s=1, w=0.5) and one fresh commit: g = (0.5·4 + 1·2)/2 = 2 (per unit)
    d.commit("w2", 0, grad(4.0), metrics={"inner_loss": float("nan")})
    d.join("w4")
    d.commit("w4", 1, grad(2.0))
    assert d.s.version == 2 and d.s.outer_params["a"].tolist() == [-1.0, -2.0]
    h = d.s.history
    assert h[0]["inner_loss"] == 2.0 and h[0]["outer_loss"] == 4.0 and h[0]["commits"] == 2
    assert "self" not in h[0] and "new_params" not in h[0]
    assert "inner_loss" not in h[1] and h[1]["weight_sum"] == 1.5 and h[1]["mean_staleness"] == 0.5


def test_commit_beyond_max_staleness_is_rejected_and_changes_nothing() -> None:
    d = driver(max_in_flight=5, max_staleness=1)
    d.join("w0", "w1", "w2")
    d.commit("w0", 0)
    d.commit("w1", 0)
    before, version = d.s.outer_params, d.s.version
    reply = only(d.commit("w2", 0, grad(7.0)), CommitReply)
    assert (reply.status, reply.staleness, reply.weight) == ("rejected", 2, 0.0)
    assert "staleness 2 > max_staleness 1" in reply.reason
    assert same(d.s.outer_params, before) and d.s.version == version == 2
    assert "w2" not in d.s.leases  # the lease ended with the commit
    st_ = d.s.stats()
    assert (st_["commits_accepted"], st_["commits_rejected"], st_["steps"]) == (2, 1, 2)


def test_duplicate_commit_is_applied_once() -> None:
    d = driver(max_staleness=2)
    d.join("w0")
    first = only(d.commit("w0", 0, cid="c1"), CommitReply)
    after = d.s.outer_params
    d.checkout("w0")
    dup = only(d.commit("w0", 0, cid="c1"), CommitReply)
    assert first.status == "accepted" and dup.status == "duplicate"
    assert (dup.staleness, dup.weight, dup.version) == (0, 1.0, 1)
    assert same(d.s.outer_params, after) and d.s.version == 1
    assert d.s.stats()["commits_duplicate"] == 1 and d.s.stats()["commits_accepted"] == 1
    assert "w0" in d.s.leases  # the duplicate did not end the new lease


def test_dedupe_window_bounds_memory() -> None:
    d = driver(max_staleness=5, dedupe_window=1)
    d.join("w0")
    d.commit("w0", 0, cid="c1")
    d.checkout("w0")
    d.commit("w0", 1, cid="c2")  # evicts c1
    assert only(d.commit("w0", 1, cid="c2"), CommitReply).status == "duplicate"
    d.checkout("w0")
    assert only(d.commit("w0", 2, cid="c1"), CommitReply).status == "accepted"  # forgotten


# -- bad input -------------------------------------------------------------------------------


def _bad_inputs(d: Driver) -> list[tuple[str, list[Outgoing]]]:
    hg = grad()
    nan = grad()
    nan["a"] = torch.tensor([1.0, math.nan], dtype=F64)
    inf = grad()
    inf["b"] = torch.tensor(math.inf, dtype=F64)
    cases = [
        ("unknown_worker", d.commit("ghost", 0)),
        ("unknown_worker", d.checkout("ghost")),
        ("unknown_worker", d.heartbeat("ghost", 0.0)),
        ("not_owner", d.send("w1", Heartbeat(request_id=1, worker_id="w0"), 0.0)),
        ("not_owner", d.send("w1", Register(request_id=1, worker_id="w9"), 0.0)),
        ("bad_tensor", d.commit("w0", 0, {"a": hg["a"]})),  # missing key
        ("bad_tensor", d.commit("w0", 0, hg | {"c": torch.zeros(1, dtype=F64)})),  # extra key
        ("bad_tensor", d.commit("w0", 0, hg | {"a": torch.zeros(3, dtype=F64)})),  # shape
        ("bad_tensor", d.commit("w0", 0, hg | {"a": torch.zeros(2)})),  # dtype
        ("bad_tensor", d.commit("w0", 0, hg | {"a": [1.0, 2.0]})),  # not a tensor
        ("bad_tensor", d.commit("w0", 0, "not a dict")),
        ("non_finite", d.commit("w0", 0, nan)),
        ("non_finite", d.commit("w0", 0, inf)),
        ("bad_version", d.commit("w0", 5)),  # never issued
        ("bad_version", d.commit("w0", -1)),
        ("bad_version", d.commit("w0", True)),
        ("malformed", d.commit("w0", 0, cid="")),
        ("malformed", d.checkout("w0", have="zero")),  # type: ignore[arg-type]
        ("malformed", d.send("", Heartbeat(request_id=1, worker_id=""), 0.0)),
        ("unknown_op", d.send("w0", HeartbeatAck(request_id=1, version=0), 0.0)),
    ]
    return cases


def test_bad_input_gets_an_error_reply_a_counter_and_changes_nothing() -> None:
    d = driver()
    d.join("w0", "w1")
    lease = d.s.leases["w0"]
    before = (d.s.outer_params, d.s.version, d.s.workers, d.s.stats()["commits_accepted"])
    cases = _bad_inputs(d)
    for code, out in cases:
        err = only(out, ErrorReply)
        assert err.code == code, (code, err)
        assert err.message
    assert same(d.s.outer_params, before[0])
    assert (d.s.version, d.s.workers, d.s.stats()["commits_accepted"]) == before[1:]
    assert d.s.leases["w0"] == lease  # errors do not renew or end a lease
    st_ = d.s.stats()
    assert st_["errors"] == len(cases) and sum(st_["errors_by_code"].values()) == len(cases)
    assert st_["errors_by_code"]["bad_tensor"] == 6
    # after all that, a good commit still works
    assert only(d.commit("w0", 0), CommitReply).status == "accepted"


def test_commit_for_a_version_other_than_the_lease_is_bad_version() -> None:
    d = driver(max_in_flight=3)
    d.join("w0", "w1")
    d.commit("w1", 0)  # version 1
    d.checkout("w0")  # w0 abandons its lease on 0 and now holds 1
    err = only(d.commit("w0", 0), ErrorReply)
    assert err.code == "bad_version" and "holds a lease on version 1" in err.message
    assert d.s.leases["w0"].version == 1 and d.s.version == 1


def test_replies_go_to_the_connection_that_sent_the_message() -> None:
    d = driver()
    out = d.send("w1", Heartbeat(request_id=3, worker_id="w0"), 0.0)
    assert out[0].to == "w1" and out[0].message.request_id == 3


# -- sync mode -----------------------------------------------------------------------------------


def test_sync_mode_averages_n_commits_steps_once_and_releases_everyone() -> None:
    d = driver(mode="sync", num_workers=3)
    d.join("w0", "w1", "w2")
    assert only(d.commit("w0", 0, grad(1.0)), CommitReply).version == 0
    assert only(d.checkout("w0", have=0, rid=10), CheckoutReply).status == "deferred"
    assert only(d.commit("w1", 0, grad(2.0)), CommitReply).status == "accepted"
    assert only(d.checkout("w1", have=0, rid=11), CheckoutReply).status == "deferred"
    assert d.s.version == 0 and same(d.s.outer_params, lam0())
    out = d.commit("w2", 0, grad(6.0))
    reply = pick(out, CommitReply, "w2")[0]
    assert (reply.status, reply.weight, reply.version) == ("accepted", 1.0, 1)
    # one step with the mean (1 + 2 + 6)/3 = 3: λ_a = [1, 2] − 0.5·[3, 6]
    assert d.s.version == 1 and d.s.stats()["steps"] == 1
    assert d.s.outer_params["a"].tolist() == [-0.5, -1.0]
    grants = {o.to: o.message for o in out if isinstance(o.message, CheckoutReply)}
    assert {w: (m.request_id, m.status, m.version) for w, m in grants.items()} == {
        "w0": (10, "granted", 1),
        "w1": (11, "granted", 1),
    }
    assert same(grants["w0"].outer_params, d.s.outer_params)
    assert d.s.leases["w0"].version == 1 and d.s.leases["w1"].version == 1


def test_sync_mode_rejects_second_and_stale_commits() -> None:
    d = driver(mode="sync", num_workers=2, max_staleness=5)
    d.join("w0", "w1", "w2")
    d.commit("w0", 0)
    again = only(d.commit("w0", 0), CommitReply)
    assert again.status == "rejected" and "already committed" in again.reason
    d.commit("w1", 0)  # step: version 1
    late = only(d.commit("w2", 0), CommitReply)  # an extra worker missed the barrier
    assert (late.status, late.staleness) == ("rejected", 1)  # sync accepts staleness 0 only
    assert d.s.version == 1 and d.s.stats()["commits_rejected"] == 2


def test_sync_barrier_survives_a_dead_worker_via_expiry() -> None:
    d = driver(mode="sync", num_workers=3)
    d.join("w0", "w1", "w2")
    d.commit("w0", 0, grad(1.0), now=1.0)
    d.commit("w1", 0, grad(3.0), now=1.0)
    d.checkout("w0", now=1.0, have=0, rid=20)
    d.checkout("w1", now=1.0, have=0, rid=21)
    for t in (2.0, 3.0, 4.0):  # w0, w1 keep heartbeating; w2 is dead
        d.heartbeat("w0", t)
        d.heartbeat("w1", t)
    assert d.tick(T - 0.01) == [] and d.s.version == 0
    out = d.tick(T)  # w2 expires: step with the two commits that arrived
    assert d.s.version == 1 and d.s.outer_params["a"].tolist() == [0.0, 0.0]  # mean g = 2
    assert sorted((o.to, o.message.request_id) for o in out) == [("w0", 20), ("w1", 21)]
    # the barrier now waits for the live workers only
    d.commit("w0", 1, grad(1.0), now=T)
    assert d.s.version == 1
    d.commit("w1", 1, grad(1.0), now=T)
    assert d.s.version == 2 and d.s.history[-1]["commits"] == 2
    # a replacement joins: the barrier waits for it again
    d.join("w2", now=T)
    d.checkout("w0", now=T)
    d.checkout("w1", now=T)
    d.commit("w0", 2, now=T)
    d.commit("w1", 2, now=T)
    assert d.s.version == 2
    d.commit("w2", 2, now=T)
    assert d.s.version == 3


def test_sync_barrier_releases_when_a_worker_deregisters() -> None:
    d = driver(mode="sync", num_workers=2)
    d.join("w0", "w1")
    d.commit("w0", 0)
    d.checkout("w0", have=0, rid=30)
    out = d.deregister("w1", 0.5)
    assert d.s.version == 1 and [(o.to, o.message.request_id) for o in out] == [("w0", 30)]


def test_sync_barrier_waits_for_num_workers_at_start_up() -> None:
    d = driver(mode="sync", num_workers=2)
    d.join("w0")
    d.commit("w0", 0)
    d.checkout("w0", rid=40)
    d.tick(1.0)
    assert d.s.version == 0  # w1 has not joined yet: no step with one commit
    d.join("w1", now=1.0)
    out = d.commit("w1", 0, now=1.0)
    assert d.s.version == 1 and [m.request_id for m in pick(out, CheckoutReply, "w0")] == [40]


def test_sync_barrier_ready_rule() -> None:
    assert not sync_barrier_ready(set(), {"a"}, 1, True)
    assert sync_barrier_ready({"a", "b"}, {"a", "b", "c"}, 2, False)
    assert not sync_barrier_ready({"a"}, {"a", "b"}, 3, True)
    assert sync_barrier_ready({"a", "gone"}, {"a"}, 3, True)


# -- max_steps / shutdown --------------------------------------------------------------------


def test_max_steps_shuts_everyone_down() -> None:
    d = driver(max_in_flight=1, max_steps=2)
    d.join("w0", "w1")
    d.commit("w0", 0)
    d.checkout("w0", rid=50)  # deferred (w1 holds 0)
    out = d.commit("w1", 0)  # second step: done
    assert d.s.done and d.s.version == 2
    assert isinstance(out[0].message, CommitReply) and out[0].to == "w1"
    notices = {o.to: o.message.request_id for o in out if isinstance(o.message, ShutdownNotice)}
    assert notices == {"w0": 50, "w1": -1}  # the deferred checkout is answered by the notice
    lam = d.s.outer_params
    assert only(d.checkout("w0"), ShutdownNotice).reason.startswith("job done")
    assert isinstance(only(d.commit("w0", 2), ShutdownNotice), ShutdownNotice)
    assert isinstance(only(d.heartbeat("w1", 0.1), ShutdownNotice), ShutdownNotice)
    assert only(d.register("w7"), ErrorReply).code == "shutting_down"
    assert same(d.s.outer_params, lam) and d.s.version == 2
    assert d.deregister("w0", 0.2) == [] and d.s.workers == ("w1",)


def test_max_steps_in_sync_mode() -> None:
    d = driver(mode="sync", num_workers=2, max_steps=1)
    d.join("w0", "w1")
    d.commit("w0", 0)
    d.checkout("w0", rid=60)
    out = d.commit("w1", 0)
    assert d.s.done and {(o.to, o.message.request_id) for o in pick_all(out, ShutdownNotice)} == {
        ("w0", 60),
        ("w1", -1),
    }
    assert pick(out, CheckoutReply) == []


def pick_all(out: Iterable[Outgoing], cls: type[Message]) -> list[Outgoing]:
    return [o for o in out if isinstance(o.message, cls)]


# -- optimizers and checkpoints --------------------------------------------------------------


def _run_steps(d: Driver, n: int, start: int = 0) -> None:
    d.register("w0") if "w0" not in d.s.workers else None
    for v in range(start, start + n):
        d.checkout("w0")
        assert only(d.commit("w0", v, grad(v + 1.0)), CommitReply).status == "accepted"


@pytest.mark.parametrize("opt", ["adam", "momentum", "factory"])
def test_other_optimizers_step(opt: str) -> None:
    spec: Any = (lambda ps: torch.optim.SGD(ps, lr=0.25)) if opt == "factory" else opt
    d = driver(optimizer=spec)
    _run_steps(d, 2)
    assert d.s.version == 2 and not same(d.s.outer_params, lam0())
    if opt == "factory":  # SGD(0.25): a −= 0.25·(1 + 2)·[1, 2]
        assert d.s.outer_params["a"].tolist() == [0.25, 0.5]


def test_state_dict_round_trip_restores_lambda_optimizer_and_dedupe() -> None:
    d = driver(optimizer="adam", min_commits=2, max_staleness=5, max_in_flight=5)
    d.join("w0", "w1")
    for v in range(2):
        d.commit("w0", v, grad(v + 1.0), cid=f"a{v}")
        d.commit("w1", v, grad(v + 2.0), cid=f"b{v}")
        d.checkout("w0")
        d.checkout("w1")
    d.commit("w0", 2, grad(5.0), cid="buffered")  # one commit buffered towards step 3
    buf = io.BytesIO()
    torch.save(d.s.state_dict(), buf)
    buf.seek(0)
    restored = Driver(
        CoordinatorState(
            {"a": torch.zeros(2, dtype=F64), "b": torch.zeros((), dtype=F64)}, d.s.config
        )
    )
    restored.s.load_state_dict(torch.load(buf, weights_only=True))
    assert restored.s.version == 2 and same(restored.s.outer_params, d.s.outer_params)
    assert (
        restored.s.stats()["commits_accepted"] == 5 and restored.s.stats()["buffered_commits"] == 1
    )
    assert restored.s.workers == ()  # workers register again
    restored.join("w1")
    d.checkout("w1")
    assert only(restored.commit("w1", 2, cid="b0"), CommitReply).status == "duplicate"
    for x in (d, restored):
        x.commit("w1", 2, grad(3.0), cid="next")
    assert d.s.version == restored.s.version == 3
    for k in ("a", "b"):  # same Adam moments → bit-identical step
        assert torch.equal(d.s.outer_params[k], restored.s.outer_params[k])


def test_stats_has_the_documented_keys() -> None:
    keys = driver().s.stats().keys()
    for k in (
        "version commits_accepted commits_rejected commits_duplicate checkouts "
        "checkouts_deferred errors workers_alive steps done"
    ).split():
        assert k in keys


# -- property tests: random event orders -------------------------------------------------------

WORKERS = ("w0", "w1", "w2")
KINDS = (  # repeated names are more likely
    ("commit", "checkout") * 5
    + ("heartbeat",) * 2
    + ("register", "deregister", "tick", "commit_dup", "commit_bad", "intruder")
)
DTS = (0.0,) * 3 + (0.1, 0.2, 0.3, 0.5) * 2 + (2.0, 6.0)  # lease_timeout is 5 s
EVENT = st.tuples(
    st.sampled_from(KINDS),
    st.integers(0, len(WORKERS) - 1),
    st.integers(0, 2),
    st.sampled_from(DTS),
)


class Model:
    """What the outside world can check about a run, fed every output of the machine."""

    def __init__(self, s: CoordinatorState) -> None:
        self.s = s
        self.rids = itertools.count(1)
        self.pending: dict[str, int] = {}
        self.answered: set[int] = set()
        self.accepted = 0
        self.commit_ids: list[str] = []

    def observe(self, out: list[Outgoing], now: float, grants_final: bool) -> None:
        cfg, s = self.s.config, self.s
        granted = False
        for o in out:
            m = o.message
            if isinstance(m, CommitReply) and m.status == "accepted":
                limit = 0 if cfg.mode == "sync" else cfg.max_staleness
                assert m.staleness <= limit and m.weight == cfg.decay**m.staleness
                self.accepted += 1
            elif isinstance(m, CheckoutReply) and m.status == "deferred":
                self.pending[o.to] = m.request_id
            elif isinstance(m, CheckoutReply):
                assert m.request_id not in self.answered, "a checkout answered twice"
                self.answered.add(m.request_id)
                if self.pending.get(o.to) == m.request_id:
                    del self.pending[o.to]
                granted = True
                if grants_final:
                    assert m.version == s.version
            elif isinstance(m, Registered):  # a new life: an old life's request is void
                self.pending.pop(o.to, None)
            elif isinstance(m, ShutdownNotice):  # answers a deferred checkout, if any
                assert s.done
                if self.pending.get(o.to) == m.request_id:
                    del self.pending[o.to]
        self.pending = {w: r for w, r in self.pending.items() if w in s.workers}
        assert self.pending == s.pending_checkouts
        st_ = s.stats()
        assert s.version == st_["steps"]
        assert st_["commits_accepted"] == self.accepted
        live = [lease.version for lease in s.leases.values() if lease.expires_at > now]
        window = s.version - min(live) if live else 0
        if cfg.mode == "async":
            assert s.version == self.accepted // cfg.min_commits
            if granted and grants_final:
                assert window < cfg.max_in_flight, "a grant violated the version window"
            if self.pending and not s.done:
                assert window >= cfg.max_in_flight, "deferred although the window allows"
        else:  # sync: steps happen only at a barrier, so never more steps than commits
            assert s.version <= self.accepted

    def event(
        self, d: Driver, ev: tuple[str, int, int, float], now: float, tick_first: bool
    ) -> None:
        kind, wi, p, _ = ev
        w = WORKERS[wi]
        if tick_first:
            self.observe(d.tick(now, optional=True), now, grants_final=True)
        if kind in ("checkout", "commit", "heartbeat") and w not in d.s.workers:
            out = d.send(w, Register(request_id=next(self.rids), worker_id=w), now)
            self.observe(out, now, grants_final=tick_first)  # mostly valid traffic
        if kind == "commit" and p < 2 and w not in d.s.leases and w not in d.s.pending_checkouts:
            out = d.send(w, Checkout(request_id=next(self.rids), worker_id=w), now)
            self.observe(out, now, grants_final=tick_first)  # the worker loop: checkout, commit
        before = (d.s.outer_params, d.s.version, d.s.workers, d.s.pending_checkouts, d.s.leases)
        rid = next(self.rids)
        version = d.s.version
        lease = d.s.leases.get(w)
        if kind == "register":
            out = d.send(w, Register(request_id=rid, worker_id=w), now)
        elif kind == "checkout":
            have = (-1, version, version - 1)[p]
            out = d.send(w, Checkout(request_id=rid, worker_id=w, have_version=have), now)
        elif kind in ("commit", "commit_bad"):
            v = lease.version if lease else (version, version - 1, version + 1)[p]
            g = grad(float(p + 1))
            if kind == "commit_bad":
                g = (g | {"a": torch.full((2,), math.nan, dtype=F64)}, {"a": g["a"]}, g)[p]
                v = v if p < 2 else version + 3
            cid = f"c{rid}"
            self.commit_ids.append(cid)
            msg = Commit(request_id=rid, worker_id=w, version=v, commit_id=cid, hypergradient=g)
            out = d.send(w, msg, now)
        elif kind == "commit_dup":
            cid = self.commit_ids[-1] if self.commit_ids else "none"
            msg = Commit(request_id=rid, worker_id=w, version=version, commit_id=cid,
                         hypergradient=grad())  # fmt: skip
            out = d.send(w, msg, now)
        elif kind == "heartbeat":
            out = d.send(w, Heartbeat(request_id=rid, worker_id=w), now)
        elif kind == "deregister":
            out = d.send(w, Deregister(request_id=rid, worker_id=w), now)
        elif kind == "intruder" and p == 0:  # speaks for someone else
            out = d.send(w, Heartbeat(request_id=rid, worker_id=w), now, identity="intruder")
        elif kind == "intruder":  # never registered
            out = d.send("zz", Checkout(request_id=rid, worker_id="zz"), now)
        else:
            out = d.tick(now)
        if tick_first and len(out) == 1 and isinstance(out[0].message, ErrorReply):
            after = (d.s.outer_params, d.s.version, d.s.workers, d.s.pending_checkouts, d.s.leases)
            assert same(after[0], before[0]) and after[1:] == before[1:], "an error changed state"
        if d.s.version == before[1]:
            assert same(d.s.outer_params, before[0]), "λ changed without a step"
        self.observe(out, now, grants_final=tick_first)
        if kind == "commit" and p < 2 and w in d.s.workers and not d.s.done:
            out = d.send(w, Checkout(request_id=next(self.rids), worker_id=w), now)
            self.observe(out, now, grants_final=tick_first)  # the worker loop: commit, checkout

    def drain(self, d: Driver, now: float) -> None:
        """Let every worker that is not waiting leave: each deferred request must be answered."""
        if d.s.config.mode == "sync" and not d.s.done:
            fresh = [f"f{i}" for i in range(d.s.config.num_workers or 0)]
            for f in fresh:  # make sure the job has started (num_workers alive together)
                self.observe(
                    d.send(f, Register(request_id=next(self.rids), worker_id=f), now), now, False
                )
        for w in [w for w in d.s.workers if w not in d.s.pending_checkouts]:
            out = d.send(w, Deregister(request_id=next(self.rids), worker_id=w), now)
            self.observe(out, now, grants_final=True)
        assert d.s.pending_checkouts == {} and self.pending == {}


def run_random(
    cfg: CoordinatorConfig,
    events: list[tuple[str, int, int, float]],
    tick_first: bool,
    make_driver: Any = None,
) -> Driver:
    d = Driver(CoordinatorState(lam0(), cfg)) if make_driver is None else make_driver(cfg)
    m = Model(d.s)
    now = 0.0
    for ev in events:
        now += ev[3]
        m.event(d, ev, now, tick_first)
    m.drain(d, now)
    st_ = d.s.stats()
    for name in ("steps", "checkouts_deferred", "deferred_granted", "commits_rejected",
                 "commits_duplicate", "workers_expired", "done"):  # fmt: skip
        if st_[name]:
            event(f"{cfg.mode}: {name}")  # coverage, see --hypothesis-show-statistics
    target(float(st_["deferred_granted"]), label="deferred checkouts granted later")
    return d


PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(
    events=st.lists(EVENT, min_size=5, max_size=40),
    max_in_flight=st.integers(1, 2),
    max_staleness=st.integers(0, 2),
    min_commits=st.integers(1, 2),
    max_steps=st.sampled_from([None, None, 2]),
    tick_first=st.booleans(),
)
def test_async_random_event_orders_keep_every_invariant(
    events: list[tuple[str, int, int, float]],
    max_in_flight: int,
    max_staleness: int,
    min_commits: int,
    max_steps: int | None,
    tick_first: bool,
) -> None:
    cfg = config(
        max_in_flight=max_in_flight,
        max_staleness=max_staleness,
        min_commits=min_commits,
        max_steps=max_steps,
    )
    run_random(cfg, events, tick_first)


@PROPS
@given(
    events=st.lists(EVENT, min_size=5, max_size=40),
    num_workers=st.integers(1, 3),
    max_steps=st.sampled_from([None, None, 2]),
    tick_first=st.booleans(),
)
def test_sync_random_event_orders_keep_every_invariant(
    events: list[tuple[str, int, int, float]],
    num_workers: int,
    max_steps: int | None,
    tick_first: bool,
) -> None:
    run_random(
        config(mode="sync", num_workers=num_workers, max_steps=max_steps), events, tick_first
    )


def _summary(log: list[Outgoing]) -> list[tuple[Any, ...]]:
    return [
        (o.to, o.message.op, o.message.request_id, getattr(o.message, "status", None),
         getattr(o.message, "version", None), getattr(o.message, "code", None))
        for o in log
    ]  # fmt: skip


@settings(max_examples=80, deadline=None)
@given(events=st.lists(EVENT, min_size=5, max_size=30), mode=st.sampled_from(["async", "sync"]))
def test_results_do_not_depend_on_how_often_the_loop_ticks(
    events: list[tuple[str, int, int, float]], mode: str
) -> None:
    """Replaying a run without its optional ticks (one before every message) changes nothing."""
    cfg = config(mode=mode, num_workers=2, max_in_flight=1)
    a = run_random(cfg, events, tick_first=True)
    b = Driver(CoordinatorState(lam0(), cfg))
    for identity, msg, now in a.inputs:
        if msg is not None:
            b.send(identity, msg, now)
        elif identity == "tick":
            b.tick(now)
    assert _summary(a.log) == _summary(b.log)
    assert same(a.s.outer_params, b.s.outer_params) and a.s.stats() == b.s.stats()


# -- fast paths against the plain rules -------------------------------------------------------


class SweepsAlways(CoordinatorState):
    """The machine without its expiry bound: it sweeps before every event, as the rule reads."""

    def handle(
        self, identity: str, msg: Message, now: float, *, owned: bool = False
    ) -> list[Outgoing]:
        self._next_expiry = -math.inf
        return super().handle(identity, msg, now, owned=owned)

    def tick(self, now: float) -> list[Outgoing]:
        self._next_expiry = -math.inf
        return super().tick(now)


class Twin(Driver):
    """Feeds every event to a reference machine (sweeps before every event, keeps the caller's
    tensors) and then to the machine under test (expiry bound, owns the decoded tensors, like
    the coordinator's loop); both must answer and end up the same, bit for bit."""

    def __init__(self, cfg: CoordinatorConfig) -> None:
        super().__init__(CoordinatorState(lam0(), cfg))
        self.ref = SweepsAlways(lam0(), cfg)

    def send(
        self, wid: str, msg: Message, now: float, identity: str | None = None
    ) -> list[Outgoing]:
        identity = wid if identity is None else identity
        self.inputs.append((identity, msg, now))
        expected = self.ref.handle(identity, msg, now)  # before: the twin may reuse the tensors
        out = self.s.handle(identity, msg, now, owned=True)
        self._compare(expected, out)
        return out

    def tick(self, now: float, optional: bool = False) -> list[Outgoing]:
        self.inputs.append(("" if optional else "tick", None, now))
        expected = self.ref.tick(now)
        out = self.s.tick(now)
        self._compare(expected, out)
        return out

    def _compare(self, expected: list[Outgoing], out: list[Outgoing]) -> None:
        self.log.extend(out)
        assert _summary(out) == _summary(expected)
        for a, b in zip(out, expected, strict=True):
            if isinstance(a.message, CheckoutReply):
                assert same(a.message.outer_params, b.message.outer_params)
        assert same(self.s.outer_params, self.ref.outer_params)
        assert self.s.stats() == self.ref.stats() and self.s.leases == self.ref.leases


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=st.lists(EVENT, min_size=5, max_size=40),
    mode=st.sampled_from(["async", "sync"]),
    min_commits=st.integers(1, 2),
    tick_first=st.booleans(),
)
def test_expiry_bound_and_owned_tensors_change_no_decision(
    events: list[tuple[str, int, int, float]], mode: str, min_commits: int, tick_first: bool
) -> None:
    """Skipping sweeps until the earliest deadline, and computing λ in the memory of handed-over
    hypergradients, give exactly what sweeping before every event on copies gives."""
    cfg = config(mode=mode, num_workers=2, max_in_flight=1, max_staleness=2,
                 min_commits=min_commits)  # fmt: skip
    run_random(cfg, events, tick_first, make_driver=Twin)


def test_a_silent_worker_expires_on_time_while_others_keep_talking() -> None:
    d = driver(max_in_flight=1)
    d.join("w0", now=0.0)
    d.join("w1", now=1.0)
    for t in (2.0, 3.0, 4.0, 4.9):  # w1 talks; w0 (lease on version 0) stays silent
        d.heartbeat("w1", t)
    assert set(d.s.workers) == {"w0", "w1"}
    d.commit("w1", 0, now=4.95)
    assert only(d.checkout("w1", now=4.99), CheckoutReply).status == "deferred"  # w0 holds v0
    out = d.heartbeat("w1", now=T)  # w0's deadline: expired first, w1's checkout granted
    assert d.s.workers == ("w1",) and d.s.stats()["workers_expired"] == 1
    assert [m.status for m in pick(out, CheckoutReply, to="w1")] == ["granted"]
    d.register("w0", now=20.0)  # all gone but w0 (w1 expired at 9.9 s): a new deadline counts
    assert d.s.workers == ("w0",)
    assert d.s.tick(20.0 + T - 0.01) == [] and d.s.workers == ("w0",)
    d.s.tick(20.0 + T)
    assert d.s.workers == ()


@pytest.mark.parametrize("mode", ["async", "sync"])
@pytest.mark.parametrize("min_commits", [1, 2])
def test_plain_sgd_step_equals_torch_optim_sgd_bit_for_bit(mode: str, min_commits: int) -> None:
    """The "sgd" fast path (no optimizer call, λ computed in the gradient's memory) against
    torch.optim.SGD stepping leaves, with stale weights, averaging and float32 roundings."""
    lam = {"a": torch.linspace(-1, 1, 7), "b": torch.tensor(0.3)}
    kw: dict[str, Any] = {"mode": mode, "num_workers": 3, "min_commits": min_commits,
                          "max_in_flight": 5, "max_staleness": 3, "decay": 0.7,
                          "outer_lr": 0.123}  # fmt: skip
    fast = Driver(CoordinatorState(lam, config(**kw)))
    ref = Driver(CoordinatorState(lam, config(**kw, optimizer=lambda ps: torch.optim.SGD(
        ps, lr=0.123))))  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    for d in (fast, ref):
        d.join("w0", "w1", "w2")
    for i in range(12):
        w = f"w{i % 3}"
        g = {"a": torch.randn(7, generator=gen), "b": torch.randn((), generator=gen)}
        replies = []
        for d, owned in ((ref, False), (fast, True)):
            version = d.s.leases[w].version
            msg = Commit(request_id=i, worker_id=w, version=version, commit_id=f"c{i}",
                         hypergradient={k: v.clone() for k, v in g.items()})  # fmt: skip
            replies.append(_summary(d.s.handle(w, msg, 0.0, owned=owned)))
            d.checkout(w)
        assert replies[0] == replies[1]
        assert same(fast.s.outer_params, ref.s.outer_params)
    assert fast.s.version >= 4
    if mode == "async":  # stale commits (weights 0.7**s) were part of it
        assert fast.s.stats()["accepted_by_staleness"].keys() - {0}


@pytest.mark.parametrize("owned", [False, True])
def test_granted_lambda_is_never_written_after_it_was_handed_out(owned: bool) -> None:
    """Checkout replies share MetaState's tensors (zero-copy sends): later steps must never
    write into them; and without owned=True the caller's hypergradient stays untouched too."""
    d = driver(max_in_flight=5, max_staleness=5)
    d.join("w0")
    handed: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []
    for v in range(4):
        reply = only(d.checkout("w0"), CheckoutReply)
        handed.append((reply.outer_params, {k: t.clone() for k, t in reply.outer_params.items()}))
        g = grad(v + 1.0)
        kept = {k: t.clone() for k, t in g.items()}
        msg = Commit(request_id=1000 + v, worker_id="w0", version=v, commit_id=f"x{v}",
                     hypergradient=g)  # fmt: skip
        assert only(d.s.handle("w0", msg, 0.0, owned=owned), CommitReply).status == "accepted"
        if not owned:
            assert same(g, kept)
    for shared, snapshot in handed:
        assert same(shared, snapshot)
    assert d.s.version == 4


def test_owned_bad_or_rejected_commits_change_nothing() -> None:
    d = driver(max_in_flight=5, max_staleness=0)
    d.join("w0", "w1")
    d.commit("w0", 0)
    before = d.s.outer_params
    bad = grad()
    bad["a"] = torch.tensor([1.0, math.inf], dtype=F64)
    stale = Commit(request_id=1, worker_id="w1", version=0, commit_id="s", hypergradient=grad())
    nan = Commit(request_id=2, worker_id="w1", version=1, commit_id="n", hypergradient=bad)
    assert only(d.s.handle("w1", stale, 0.0, owned=True), CommitReply).status == "rejected"
    d.checkout("w1")
    assert only(d.s.handle("w1", nan, 0.0, owned=True), ErrorReply).code == "non_finite"
    assert d.s.version == 1 and same(d.s.outer_params, before)
