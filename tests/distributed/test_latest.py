"""Every shard counts: aggregation="latest" (each live worker's latest hypergradient in every
step), per-worker accounting, and the heterogeneous-shard ridge whose fixed point is known."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chronos.benchmarks.staleness import (
    POLICIES,
    ridge_fixed_point,
    ridge_shards,
    simulate,
)
from chronos.core.errors import ChronosTypeError, ConfigError
from chronos.distributed.aggregation import CoordinatorConfig
from chronos.distributed.latest import LatestGradients
from chronos.distributed.ledger import WorkerLedger, share_warnings
from chronos.distributed.messages import (
    Checkout,
    CheckoutReply,
    Commit,
    Deregister,
    ErrorReply,
    Register,
)
from chronos.distributed.state import CoordinatorState, Outgoing

F64 = torch.float64


def vec(*xs: float) -> dict[str, torch.Tensor]:
    return {"x": torch.tensor(xs, dtype=F64)}


# -- the table ------------------------------------------------------------------------------------


def test_entries_are_replaced_not_summed_and_the_mean_is_scaled_by_the_fresh_fraction() -> None:
    t = LatestGradients()
    t.put("a", vec(1.0, 2.0), version=0)
    t.put("b", vec(3.0, 6.0), version=0)
    t.put("a", vec(5.0, 10.0), version=1)  # a's newer work supersedes its older
    g, c = t.mean()
    assert torch.equal(g["x"], vec(4.0, 8.0)["x"]) and c == {"a": 0.5, "b": 0.5}
    g, c = t.mean(fresh=1)  # one of two entries new: half the mean
    assert torch.equal(g["x"], vec(2.0, 4.0)["x"]) and c == {"a": 0.25, "b": 0.25}
    g, _ = t.mean(fresh=7)  # never more than the mean
    assert torch.equal(g["x"], vec(4.0, 8.0)["x"])
    assert t.ages(3) == {"a": 2, "b": 3} and t.nbytes() == 2 * 2 * 8
    t.drop("a")
    t.drop("never-there")
    assert len(t) == 1 and "b" in t and "a" not in t


def test_a_summed_commit_is_stored_as_its_mean_and_take_avoids_the_copy() -> None:
    t = LatestGradients()
    t.put("a", vec(6.0), version=0, updates=3)  # a significance-filtered sum of 3
    assert t.entries["a"].grad["x"].item() == 2.0
    mine = vec(1.0)
    t.put("b", mine, version=0, take=True)
    t.put("c", mine, version=0)
    assert t.entries["b"].grad["x"].data_ptr() == mine["x"].data_ptr()
    assert t.entries["c"].grad["x"].data_ptr() != mine["x"].data_ptr()
    g, _ = t.mean()
    g["x"].add_(100.0)  # the caller may write into the result: the entries are untouched
    assert t.entries["b"].grad["x"].item() == 1.0
    with pytest.raises(ChronosTypeError, match="at least one entry"):
        LatestGradients().mean()


# -- the state machine ----------------------------------------------------------------------------


class Driver:
    def __init__(self, **kw: Any) -> None:
        base: dict[str, Any] = {"optimizer": "sgd", "outer_lr": 1.0, "min_commits": 1,
                                "lease_timeout": 5.0, "heartbeat_interval": 1.0}
        self.s = CoordinatorState(vec(0.0, 0.0), CoordinatorConfig(**(base | kw)))
        self.rids = itertools.count(1)

    def send(self, wid: str, msg: Any, now: float) -> list[Outgoing]:
        return self.s.handle(wid, msg, now)

    def join(self, wid: str, now: float = 0.0) -> None:
        self.send(wid, Register(request_id=next(self.rids), worker_id=wid), now)
        self.checkout(wid, now)

    def checkout(self, wid: str, now: float) -> CheckoutReply:
        out = self.send(wid, Checkout(request_id=next(self.rids), worker_id=wid), now)
        return out[0].message

    def commit(self, wid: str, version: int, g: dict[str, torch.Tensor], now: float) -> Any:
        rid = next(self.rids)
        out = self.send(wid, Commit(request_id=rid, worker_id=wid, version=version,
                                    commit_id=f"{wid}-{rid}", hypergradient=g), now)
        return out[0].message

    @property
    def lam(self) -> list[float]:
        return self.s.outer_params["x"].tolist()


def test_latest_is_the_default_and_every_step_averages_every_live_workers_entry() -> None:
    assert CoordinatorConfig().aggregation == "latest"
    d = Driver()
    d.join("fast")
    d.join("slow")
    # K = 2 live workers (slow has no entry yet: it counts as zero), n = 1 new: c = ½ · ½
    r = d.commit("fast", 0, vec(2.0, 0.0), now=1.0)
    assert (r.status, r.weight) == ("accepted", 1.0) and "latest" in r.reason
    assert d.lam == [-0.5, 0.0]
    d.checkout("fast", 1.0)
    d.commit("fast", 1, vec(4.0, 0.0), now=2.0)  # replaces, not adds: λ −= ¼ · (4, 0)
    assert d.lam == [-1.5, 0.0]
    d.checkout("fast", 2.0)
    r = d.commit("slow", 0, vec(0.0, 8.0), now=3.0)  # staleness 2, still weight 1
    assert (r.status, r.staleness, r.weight) == ("accepted", 2, 1.0)
    assert d.lam == [-2.5, -2.0]  # ¼ · ((4, 0) + (0, 8))
    d.commit("fast", 2, vec(2.0, 0.0), now=4.0)  # the slow worker's (0, 8) is still in
    assert d.lam == [-3.0, -4.0]
    st = d.s.stats()
    assert st["aggregation"] == "latest" and st["latest_entries"] == 2
    assert st["latest_bytes"] == 2 * 2 * 8
    # ages at the step (version 3): fast 3 − 2, slow 3 − 0
    assert d.s.history[-1]["entries"] == 2 and d.s.history[-1]["mean_entry_age"] == 2.0


def test_shares_are_exact_on_a_hand_computed_sequence() -> None:
    # buffered, decay 0.5: steps {a: 1/1}, {b: 0.25/1 (staleness 2)}, {a: 1/2, b: 0.5/2}
    d = Driver(aggregation="buffered", decay=0.5, min_commits=1, max_in_flight=4)
    d.join("a")
    d.join("b")
    d.commit("a", 0, vec(1.0, 1.0), now=1.0)
    d.checkout("a", 1.0)
    d.commit("a", 1, vec(1.0, 1.0), now=1.5)  # a's second step: {a: 1}
    d.checkout("a", 1.5)
    d.commit("b", 0, vec(1.0, 1.0), now=2.0)  # staleness 2: weight 0.25
    d.checkout("b", 2.0)
    workers = d.s.stats()["workers"]
    total = 1 + 1 + 0.25
    assert workers["a"]["share"] == pytest.approx(2 / total, abs=1e-15)
    assert workers["b"]["share"] == pytest.approx(0.25 / total, abs=1e-15)
    assert workers["b"]["weight_sum"] == 0.25 and workers["b"]["last_version"] == 0
    assert (workers["a"]["accepted"], workers["a"]["steps"], workers["a"]["last_version"]) == (
        2, 2, 1)
    # latest (K = 2, one new per step: c = ¼): steps {a}, {a}, {a, b}, {a, b}
    d = Driver(max_in_flight=4)
    d.join("a")
    d.join("b")
    d.commit("a", 0, vec(1.0, 1.0), now=1.0)
    d.checkout("a", 1.0)
    d.commit("a", 1, vec(1.0, 1.0), now=1.5)
    d.checkout("a", 1.5)
    d.commit("b", 0, vec(1.0, 1.0), now=2.0)
    d.checkout("b", 2.0)
    d.commit("a", 2, vec(1.0, 1.0), now=2.5)
    workers = d.s.stats()["workers"]
    assert workers["a"]["contribution"] == 1.0 and workers["b"]["contribution"] == 0.5
    assert workers["a"]["share"] == 1.0 / 1.5 and workers["b"]["share"] == 0.5 / 1.5
    # sync: every step 1/n each
    d = Driver(mode="sync", num_workers=2)
    d.join("a")
    d.join("b")
    for v in range(3):
        d.commit("a", v, vec(1.0, 1.0), now=1.0 + v)
        d.commit("b", v, vec(1.0, 1.0), now=1.0 + v)
        d.checkout("a", 1.0 + v)
        d.checkout("b", 1.0 + v)
    shares = {w: r["share"] for w, r in d.s.stats()["workers"].items()}
    assert shares == {"a": 0.5, "b": 0.5} and d.s.stats()["aggregation"] == "sync"


def test_a_dead_workers_entry_goes_with_it_and_joining_workers_count_from_their_commit() -> None:
    d = Driver()
    for w in ("a", "b"):
        d.join(w)
    d.commit("a", 0, vec(2.0, 2.0), now=1.0)
    d.commit("b", 0, vec(4.0, 4.0), now=1.2)
    assert d.s.stats()["latest_entries"] == 2
    d.send("b", Deregister(request_id=next(d.rids), worker_id="b"), now=1.3)
    assert d.s.stats()["latest_entries"] == 1
    assert d.s.stats()["workers"]["b"]["alive"] is False  # the record stays, marked
    before = d.lam
    d.checkout("a", 1.3)
    d.commit("a", 2, vec(2.0, 2.0), now=1.4)  # b's entry no longer pulls: K=1
    assert d.lam == [before[0] - 2.0, before[1] - 2.0]
    d.join("c", now=1.5)  # N grows: c counts from its first accepted commit
    assert d.s.stats()["latest_entries"] == 1
    d.checkout("a", 1.5)
    d.commit("c", 3, vec(0.0, 0.0), now=1.6)
    assert d.s.stats()["latest_entries"] == 2
    # a falls silent: after lease_timeout it expires, and its entry with it
    d.checkout("c", 1.6)
    d.checkout("c", 6.0)  # a was last heard of at 1.5: alive until 6.5
    assert d.s.stats()["workers_expired"] == 0
    d.checkout("c", 7.0)
    assert d.s.stats()["workers_expired"] == 1 and d.s.stats()["latest_entries"] == 1
    # a's late commit is refused (it must register again), and its entry does not come back
    r = d.commit("a", 3, vec(9.0, 9.0), now=6.1)
    assert isinstance(r, ErrorReply) and r.code == "unknown_worker"
    assert d.s.stats()["latest_entries"] == 1


def test_a_commit_whose_shape_changes_is_refused_and_never_mixed_into_the_table() -> None:
    d = Driver()
    d.join("a")
    d.commit("a", 0, vec(1.0, 1.0), now=1.0)
    d.checkout("a", 1.0)
    before = d.s.stats()["latest_bytes"]
    wrong_dtype = {"x": torch.ones(2, dtype=torch.float32)}
    for bad in (vec(1.0, 2.0, 3.0), wrong_dtype, {"y": vec(1, 1)["x"]}):
        r = d.commit("a", 1, bad, now=1.1)
        assert isinstance(r, ErrorReply) and r.code == "bad_tensor"
    assert d.s.stats()["latest_bytes"] == before and d.s.version == 1


def test_config_refuses_an_unknown_aggregation() -> None:
    with pytest.raises(ConfigError, match="aggregation must be 'latest'"):
        CoordinatorConfig(aggregation="mean")  # type: ignore[arg-type]


def test_latest_composes_with_stale_correction_on_a_linear_field() -> None:
    # g_k(λ) = λ − c_k: the correction g + J(λ_V − λ_v) is exact, so entries describe the
    # current λ and the run lands on the root mean(c_k) like sync would
    cs = (1.0, 2.0, 6.0)
    fns = [lambda lam, c=c: {"x": lam["x"] - c} for c in cs]
    cfg = CoordinatorConfig(optimizer="sgd", outer_lr=0.5, stale_correction=True)
    run = simulate(cfg, vec(0.0), fns, [1.0, 1.0, 4.0], until=80.0)
    assert run.stats["commits_corrected"] > 0
    assert run.final["x"].item() == pytest.approx(sum(cs) / 3, abs=1e-9)


# -- the heterogeneous ridge: each shard's hypergradient in closed form ---------------------------


@pytest.fixture(scope="module")
def ridge() -> tuple[list[Any], float]:
    shards = ridge_shards()
    return shards, ridge_fixed_point(shards)


def _run_ridge(ridge: tuple[list[Any], float], policy: str, until: float) -> tuple[float, Any]:
    shards, _ = ridge
    cfg = next(p for p in POLICIES if p.name == policy).coordinator_config(
        optimizer="sgd", outer_lr=shards[0].default_outer_lr)

    def fn(p: Any) -> Any:
        return lambda lam: {"log_decay": torch.tensor(
            p.closed_form_hypergradient(float(lam["log_decay"])), dtype=F64)}

    lam0 = {"log_decay": torch.tensor(3.0, dtype=F64)}
    run = simulate(cfg, lam0, [fn(p) for p in shards], [1.0, 1.0, 1.0, 4.0], until=until)
    return float(run.final["log_decay"]), run


def test_the_fixed_point_is_a_root_of_the_summed_closed_form_hypergradients(ridge) -> None:
    shards, star = ridge
    assert abs(sum(p.closed_form_hypergradient(star) for p in shards)) < 1e-8
    # and the closed form agrees with a float64 central difference of the validation loss
    p, h = shards[3], 1e-5
    fd = (p.validation_loss(star + h) - p.validation_loss(star - h)) / (2 * h)
    assert p.closed_form_hypergradient(star) == pytest.approx(fd, rel=1e-6, abs=1e-9)


@pytest.mark.timeout(60)
def test_async_defaults_end_at_the_sync_fixed_point_with_one_worker_4x_slower(ridge) -> None:
    _, star = ridge
    final, run = _run_ridge(ridge, "async aggregated", until=150.0)
    assert abs(final - star) < 1e-6
    shares = [r["share"] for r in run.stats["workers"].values()]
    assert min(shares) > 0.2  # every shard counted (0.25 each when all are in every step)
    # it really was slow (the window holds the others back a little: not the full 4×)
    assert run.computed["worker-3"] < run.computed["worker-0"] / 2


@pytest.mark.timeout(60)
@pytest.mark.parametrize("policy", ["async reject", "async decay-only"])
def test_the_old_policies_miss_the_fixed_point(ridge, policy: str) -> None:
    """The failure mode this issue is about: the slow worker's commits are rejected (or its
    leases cancelled) or decayed to a few percent, so λ settles near the root of the three
    fast shards' hypergradients (-0.92), far from the job's fixed point (-0.098)."""
    _, star = ridge
    final, run = _run_ridge(ridge, policy, until=150.0)
    assert abs(final - star) > 0.5
    slow = run.stats["workers"]["worker-3"]
    assert slow["share"] < 0.05
    assert share_warnings(run.stats["workers"])  # and the summary says so


def test_ledger_keeps_live_records_and_drops_the_oldest_departed_first() -> None:
    ledger = WorkerLedger(max_workers=2)
    ledger.joined("a")
    ledger.joined("b")
    ledger.left("a")
    ledger.joined("c")  # over the cap: a (departed) goes, b and c (alive) stay
    assert list(ledger.summary()) == ["b", "c"]
    ledger.joined("d")  # nobody departed: kept over the cap rather than dropping a live one
    assert list(ledger.summary()) == ["b", "c", "d"]


# -- invariants under any schedule ----------------------------------------------------------------

_OPS = st.lists(
    st.tuples(
        st.sampled_from(["register", "checkout", "commit", "stale_commit", "deregister", "wait"]),
        st.sampled_from(["a", "b", "c"]),
        st.floats(-5.0, 5.0, allow_nan=False),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_OPS, mode=st.sampled_from(["latest", "buffered"]))
def test_table_ledger_and_lambda_stay_consistent_under_any_schedule(
    ops: list[tuple[str, str, float]], mode: str
) -> None:
    d = Driver(aggregation=mode, min_commits="auto", lease_timeout=3.0)
    held: dict[str, int] = {}
    now = 0.0
    for op, w, x in ops:
        now += 0.5
        if op == "register":
            d.send(w, Register(request_id=next(d.rids), worker_id=w), now)
        elif op == "checkout":
            r = d.checkout(w, now)
            if isinstance(r, CheckoutReply) and r.status == "granted":
                held[w] = r.version
        elif op in ("commit", "stale_commit"):
            version = held.pop(w, d.s.version) - (op == "stale_commit")
            d.commit(w, version, vec(x, -x), now)
        elif op == "deregister":
            d.send(w, Deregister(request_id=next(d.rids), worker_id=w), now)
        else:
            now += 2.0
            d.s.tick(now)
        s = d.s.stats()
        alive = set(d.s.workers)
        with_entry = {wid for wid, r in s["workers"].items() if r["entry_age"] is not None}
        assert with_entry <= alive  # a dead worker's entry never stays
        assert all(r["entry_age"] >= 0 for wid, r in s["workers"].items() if wid in with_entry)
        assert s["latest_entries"] == len(with_entry) <= s["workers_alive"]
        if mode == "buffered":
            assert s["latest_entries"] == 0
        total = sum(r["share"] for r in s["workers"].values())
        assert total == pytest.approx(1.0) or total == 0.0
        assert all(r["alive"] == (wid in alive) for wid, r in s["workers"].items())
        assert s["commits_accepted"] == sum(r["accepted"] for r in s["workers"].values())
        assert s["commits_rejected"] == sum(r["rejected"] for r in s["workers"].values())
        assert torch.isfinite(d.s.outer_params["x"]).all()
