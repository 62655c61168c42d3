import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from chronos.core import BoundedVersionQueue, VersionTracker
from chronos.core.errors import ChronosTypeError, ConfigError, UnknownWorkerError, VersionError


def test_staleness_weight_and_rejection():
    t = VersionTracker(max_staleness=2, decay=0.5)
    for _ in range(5):
        t.advance()
    assert t.current == 5
    d = t.evaluate(5)
    assert d.accepted and d.staleness == 0 and d.weight == 1.0
    d = t.evaluate(3)
    assert d.accepted and d.staleness == 2 and d.weight == 0.25
    d = t.evaluate(2)
    assert not d.accepted and d.staleness == 3 and d.weight == 0.0
    assert "max_staleness 2" in d.reason
    with pytest.raises(VersionError, match="never issued"):
        t.evaluate(6)
    with pytest.raises(VersionError):
        t.evaluate(-1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_in_flight": 0}, "max_in_flight must be >= 1"),
        ({"max_in_flight": -3}, "max_in_flight"),
        ({"max_in_flight": 1.5}, "max_in_flight must be an int"),
        ({"max_staleness": -1}, "max_staleness must be >= 0"),
        ({"decay": 0.0}, r"decay must be in \(0, 1\]"),
        ({"decay": 1.5}, r"decay must be in \(0, 1\]"),
        ({"decay": "half"}, "decay must be a number"),
        ({"lease_timeout": 0}, "lease_timeout"),
        ({"lease_timeout": float("inf")}, "lease_timeout"),
        ({"version": -1}, "version"),
    ],
)
def test_bad_configuration_is_rejected_with_a_message(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        BoundedVersionQueue(**kwargs)


def test_window_defers_fast_worker_until_slow_lease_commits():
    q = BoundedVersionQueue(max_in_flight=2, max_staleness=5, decay=0.5, lease_timeout=100)
    assert q.checkout("slow", 0).version == 0
    for v in range(2):  # fast worker runs 2 versions ahead of slow
        assert q.checkout("fast", 1).granted
        assert q.commit("fast", v, 1).accepted
        q.advance()
    d = q.checkout("fast", 2)
    assert d.deferred and "window full" in d.reason
    assert q.deferred == ("fast",)
    assert q.grant_deferred(3) == []
    slow = q.commit("slow", 0, 4)
    assert slow.accepted and slow.staleness == 2 and slow.weight == 0.25
    assert q.grant_deferred(4) == [("fast", 2)]
    assert q.deferred == () and q.leases["fast"].version == 2


def test_expired_lease_stops_holding_the_window():
    q = BoundedVersionQueue(max_in_flight=1, max_staleness=3, lease_timeout=10)
    q.checkout("dead", 0)
    q.checkout("live", 0)
    q.commit("live", 0, 1)
    q.advance()
    assert q.checkout("live", 2).deferred
    assert q.grant_deferred(9.9) == []
    # past the lease the dead worker no longer counts, even before expire() collects it
    assert q.window_allows(10.0)
    assert q.grant_deferred(10.0) == [("live", 1)]
    assert q.expire(10.0) == ["dead"]


def test_heartbeat_renews_lease():
    q = BoundedVersionQueue(max_in_flight=1, lease_timeout=10)
    q.checkout("a", 0)
    assert q.heartbeat("a", 8)
    assert q.expire(12) == []
    assert q.expire(18) == ["a"]
    assert not q.heartbeat("a", 19)


def test_release_and_unknown_workers():
    q = BoundedVersionQueue(max_in_flight=1, lease_timeout=10)
    q.checkout("a", 0)
    q.checkout("b", 0)
    q.commit("b", 0, 0)
    q.advance()
    assert q.checkout("b", 0).deferred
    q.release("b")  # a deferred worker can leave too
    assert q.deferred == ()
    q.release("a")
    assert q.leases == {}
    with pytest.raises(UnknownWorkerError, match="holds no lease"):
        q.release("zzz")
    with pytest.raises(ChronosTypeError):
        q.checkout("", 0)
    with pytest.raises(ChronosTypeError):
        q.checkout("a", float("nan"))


def test_commit_checks_versions():
    q = BoundedVersionQueue(max_in_flight=3, max_staleness=1, lease_timeout=10)
    q.checkout("a", 0)
    with pytest.raises(VersionError, match="never issued"):
        q.commit("a", 7, 0)
    q.advance()
    with pytest.raises(VersionError, match="holds a lease on version 0"):
        q.commit("a", 1, 0)
    # no lease: judged on staleness alone
    d = q.commit("nobody", 1, 0)
    assert d.accepted and d.staleness == 0


def test_rechecking_out_abandons_previous_lease():
    q = BoundedVersionQueue(max_in_flight=1, lease_timeout=10)
    q.checkout("a", 0)
    q.advance()
    # "a" holds version 0, the window is 1 == max_in_flight, but it is a's own lease
    assert q.checkout("a", 1).granted
    assert q.leases["a"].version == 1


def test_two_workers_never_rejected_when_max_staleness_at_least_max_in_flight():
    for m in (1, 2, 3):
        q = BoundedVersionQueue(max_in_flight=m, max_staleness=m, lease_timeout=1e9)
        q.checkout("slow", 0)
        slow_version = 0
        for step in range(30):
            # fast worker commits as often as it is allowed
            if q.checkout("fast", step).granted:
                assert q.commit("fast", q.version, step).accepted
                q.advance()
            if step % 7 == 6:  # slow worker finally commits, then checks out again
                d = q.commit("slow", slow_version, step)
                assert d.accepted, d.reason
                q.grant_deferred(step)
                slow_version = q.checkout("slow", step).version


class VersionQueueMachine(RuleBasedStateMachine):
    """Random interleavings of checkouts, commits, heartbeats, releases and clock ticks."""

    workers = st.sampled_from(["w0", "w1", "w2", "w3"])

    @initialize(
        max_in_flight=st.integers(1, 4),
        max_staleness=st.integers(0, 4),
        decay=st.sampled_from([0.25, 0.5, 0.9, 1.0]),
    )
    def setup(self, max_in_flight, max_staleness, decay):
        self.q = BoundedVersionQueue(max_in_flight, max_staleness, decay, lease_timeout=5.0)
        self.now = 0.0
        self.granted_log = []

    def _check_grant(self, worker, version):
        """A grant is legal only if the window (other live leases) allowed it."""
        others = [
            lease.version
            for w, lease in self.q.live_leases(self.now).items()
            if w != worker
        ]
        oldest = min(others, default=version)
        assert version == self.q.version
        assert version - oldest < self.q.max_in_flight

    @rule(worker=workers)
    def checkout(self, worker):
        d = self.q.checkout(worker, self.now)
        if d.granted:
            self._check_grant(worker, d.version)
        else:
            assert self.q.window(self.now) >= self.q.max_in_flight
            assert worker in self.q.deferred

    @rule(worker=workers)
    def commit(self, worker):
        lease = self.q.leases.get(worker)
        if lease is None:
            return
        d = self.q.commit(worker, lease.version, self.now)
        s = self.q.version - lease.version
        assert d.staleness == s
        if d.accepted:
            assert s <= self.q.max_staleness
            assert d.weight == self.q.decay**s
            self.q.advance()
        else:
            assert s > self.q.max_staleness and d.weight == 0.0
        assert worker not in self.q.leases

    @rule(worker=workers)
    def heartbeat(self, worker):
        self.q.heartbeat(worker, self.now)

    @rule(worker=workers)
    def release(self, worker):
        if worker in self.q.leases or worker in self.q.deferred:
            self.q.release(worker)
            assert worker not in self.q.leases and worker not in self.q.deferred

    @rule(dt=st.floats(0.0, 6.0))
    def tick(self, dt):
        self.now += dt
        self.q.expire(self.now)
        before = self.q.deferred
        granted = self.q.grant_deferred(self.now)
        if granted:
            assert [w for w, _ in granted] == list(before)
            assert all(v == self.q.version for _, v in granted)
        elif before:
            assert not self.q.window_allows(self.now)

    @precondition(lambda self: bool(self.q.deferred))
    @rule()
    def blockers_finish(self):
        """Once every blocking lease commits or expires, every deferred checkout is granted."""
        waiting = set(self.q.deferred)
        for w, lease in list(self.q.leases.items()):
            if w not in waiting:
                if self.q.commit(w, lease.version, self.now).accepted:
                    self.q.advance()
        granted = self.q.grant_deferred(self.now)
        assert {w for w, _ in granted} == waiting
        assert self.q.deferred == ()

    @invariant()
    def leases_are_on_issued_versions(self):
        for lease in self.q.leases.values():
            assert 0 <= lease.version <= self.q.version
        assert not (set(self.q.leases) & set(self.q.deferred))


TestVersionQueueMachine = VersionQueueMachine.TestCase
