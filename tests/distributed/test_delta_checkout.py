"""Delta checkouts: a worker with a lossy codec gets ``λ_now − copy_w`` coded with its codec,
rebuilds exactly the coordinator's record ``copy_w`` (checked by checksum), resyncs with a
full copy when its copy is wrong, and pays fewer bytes than for a full λ. Real coordinator,
real Worker (its checkout path), real sockets on 127.0.0.1.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import pytest
import torch

from chronos.core import InnerProblem
from chronos.distributed.coordinator import Coordinator
from chronos.distributed.messages import Checkout, CheckoutReply, Commit, CommitReply, Register
from chronos.distributed.protocol import checksum
from chronos.distributed.state import CoordinatorState
from chronos.distributed.transport import ClientTransport
from chronos.distributed.worker import Worker, WorkerConfig

pytestmark = pytest.mark.timeout(60)

N = 400


def lam0() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(N, generator=g), "b": torch.randn(4, 5, generator=g,
                                                                dtype=torch.float64)}


def problem() -> InnerProblem:
    def inner(p: dict[str, torch.Tensor], h: dict[str, torch.Tensor]) -> torch.Tensor:
        return (p["t"] ** 2).sum()

    return InnerProblem.from_functions(inner, inner, {"t": torch.zeros(2)})


@pytest.fixture
def coordinator() -> Iterator[Coordinator]:
    c = Coordinator(lam0(), port=0, optimizer="sgd", outer_lr=0.1, min_commits=1,
                    max_in_flight=100, max_staleness=100)
    c.start()
    try:
        yield c
    finally:
        c.stop()


class Driver:
    """A raw identity worker that moves λ by one dense step per :meth:`step`."""

    def __init__(self, address: str) -> None:
        self.t = ClientTransport(address, identity=b"driver")
        self.rid = 0
        assert self._call(Register(request_id=self._next(), worker_id="driver")).op == \
            "registered"
        self.seed = 0

    def _next(self) -> int:
        self.rid += 1
        return self.rid

    def _call(self, msg: object) -> object:
        self.t.send_message(msg)  # type: ignore[arg-type]
        while True:
            reply = self.t.recv_message(timeout_ms=10_000)
            assert reply is not None
            if reply.request_id == msg.request_id:  # type: ignore[attr-defined]
                return reply

    def step(self) -> None:
        r = self._call(Checkout(request_id=self._next(), worker_id="driver"))
        assert isinstance(r, CheckoutReply) and r.status == "granted"
        self.seed += 1
        g = torch.Generator().manual_seed(self.seed)
        grad = {k: torch.randn(v.shape, generator=g, dtype=v.dtype)
                for k, v in r.outer_params.items()}
        rid = self._next()
        c = self._call(Commit(request_id=rid, worker_id="driver", version=r.version,
                              commit_id=f"d-{rid}", hypergradient=grad))
        assert isinstance(c, CommitReply) and c.status == "accepted", c

    def close(self) -> None:
        self.t.close()


@pytest.fixture
def driver(coordinator: Coordinator) -> Iterator[Driver]:
    d = Driver(coordinator.address)
    try:
        yield d
    finally:
        d.close()


def make_worker(coordinator: Coordinator, codec: str, wid: str = "w0") -> Worker:
    cfg = WorkerConfig(coordinator_addr=coordinator.address, worker_id=wid, codec=codec,
                       connect_timeout=10.0)
    return Worker(problem(), cfg).connect()


def record(coordinator: Coordinator, wid: str) -> tuple[int, dict[str, torch.Tensor]]:
    state: CoordinatorState = coordinator._state
    with coordinator._lock:
        version, copy = state._copies[wid]
        return version, {k: v.clone() for k, v in copy.items()}


def checkout_reply_bytes(worker: Worker) -> tuple[int, int]:
    assert worker._net is not None
    c = worker._net.ops.by_op().get("checkout_reply", {})
    return c.get("received", 0), c.get("messages_received", 0)


@pytest.mark.parametrize("codec", ["int8", "topk:0.1", "topk:0.25+int8", "fp16"])
def test_worker_copy_equals_coordinator_record_bitwise(
    coordinator: Coordinator, driver: Driver, codec: str
) -> None:
    worker = make_worker(coordinator, codec)
    try:
        b0, _ = checkout_reply_bytes(worker)
        version, outer = worker._checkout()  # the first one is full
        full_bytes = checkout_reply_bytes(worker)[0] - b0
        assert version == 0 and all(torch.equal(outer[k], v) for k, v in lam0().items())
        delta_bytes = []
        for i in range(6):
            for _ in range(1 + i % 3):  # 1-3 versions per checkout
                driver.step()
            before = checkout_reply_bytes(worker)[0]
            version, outer = worker._checkout()
            delta_bytes.append(checkout_reply_bytes(worker)[0] - before)
            assert version == coordinator.version
            rec_version, copy = record(coordinator, "w0")
            assert rec_version == version
            for k in copy:  # bitwise: the same decode, the same add, the same dtype
                assert outer[k].dtype == copy[k].dtype
                assert torch.equal(outer[k], copy[k]), (codec, i, k)
            assert checksum(outer) == checksum(copy)
        s = worker.stats()
        assert s["checkouts_delta"] == 6 and s["checkout_resyncs"] == 0
        cs = coordinator.stats()
        assert cs["checkouts_delta"] == 6 and cs["checkouts_full"] == 1
        assert cs["delta_copies"] == 1
        # lossy but self-correcting: the copy tracks λ (error of one code, not accumulated)
        lam = coordinator.outer_params
        err = float((outer["a"] - lam["a"]).norm() / lam["a"].norm())
        assert err < 0.5, err
        assert max(delta_bytes) < full_bytes, (delta_bytes, full_bytes)
    finally:
        worker.close()


def test_topk_error_is_carried_not_lost() -> None:
    """What top-k leaves out stays in λ − copy_w and goes out with later deltas: once "a"
    stops moving, the worker's copy of it converges to λ (state machine, no sockets)."""
    from chronos.distributed.aggregation import CoordinatorConfig

    st = CoordinatorState(lam0(), CoordinatorConfig(optimizer="sgd", outer_lr=1.0,
                                                    min_commits=1, max_in_flight=100,
                                                    max_staleness=100,
                                                    aggregation="buffered"))  # d's g as is
    st.handle("w", Register(request_id=0, worker_id="w", codec="topk:0.1"), now=0.0)
    st.handle("d", Register(request_id=0, worker_id="d"), now=0.0)
    first = st.handle("w", Checkout(request_id=1, worker_id="w"), now=0.0)[0].message
    assert isinstance(first, CheckoutReply) and first.kind == "full"
    have, rid, errors = 0, 1, []
    for i in range(14):
        rid += 1
        out = st.handle("d", Checkout(request_id=rid, worker_id="d"), now=0.0)
        lam = out[0].message.outer_params
        g = {"a": torch.ones_like(lam["a"]) if i == 0 else torch.zeros_like(lam["a"]),
             "b": torch.ones_like(lam["b"])}  # "a" moves once, "b" every step
        st.handle("d", Commit(request_id=rid, worker_id="d", version=st.version,
                              commit_id=f"d{rid}", hypergradient=g), now=0.0)
        reply = st.handle("w", Checkout(request_id=rid, worker_id="w", have_version=have),
                          now=0.0)[0].message
        assert isinstance(reply, CheckoutReply) and reply.kind == "delta"
        have = reply.version
        errors.append(float((st._copies["w"][1]["a"] - st.outer_params["a"]).abs().max()))
    assert errors[0] > 0.5  # top-10 % of a dense change of 1.0: most of "a" not sent yet
    assert errors[-1] < 1e-6, errors  # every entry of "a" went out eventually
    assert all(b <= a + 1e-7 for a, b in itertools.pairwise(errors)), errors


def test_tampered_copy_triggers_a_resync_and_ends_with_the_right_lambda(
    coordinator: Coordinator, driver: Driver, caplog: pytest.LogCaptureFixture
) -> None:
    worker = make_worker(coordinator, "int8")
    try:
        worker._checkout()
        driver.step()
        worker._checkout()
        assert worker.stats()["checkouts_delta"] == 1
        driver.step()
        assert worker._outer is not None
        worker._outer["a"][0] += 1.0  # the worker's copy is now wrong
        with caplog.at_level("WARNING", logger="chronos.worker"):
            version, outer = worker._checkout()
        assert any("checksum" in r.getMessage() for r in caplog.records)
        lam = coordinator.outer_params
        assert version == coordinator.version
        assert all(torch.equal(outer[k], lam[k]) for k in lam)  # a full copy: exact λ
        s, cs = worker.stats(), coordinator.stats()
        assert s["checkout_resyncs"] == 1 and cs["checkout_resyncs"] == 1
        assert cs["checkouts_full"] == 2 and cs["checkouts_delta"] == 2
        # and deltas resume afterwards
        driver.step()
        version, outer = worker._checkout()
        _, copy = record(coordinator, "w0")
        assert all(torch.equal(outer[k], copy[k]) for k in copy)
        assert worker.stats()["checkouts_delta"] == 2
    finally:
        worker.close()


def test_identity_workers_and_far_behind_workers_get_full_copies(
    coordinator: Coordinator, driver: Driver
) -> None:
    plain = make_worker(coordinator, "identity", "plain")
    lossy = make_worker(coordinator, "int8", "lossy")
    try:
        plain._checkout()
        lossy._checkout()
        for _ in range(coordinator._state.max_delta_lag + 1):
            driver.step()
        _, outer = plain._checkout()
        lam = coordinator.outer_params
        assert all(torch.equal(outer[k], lam[k]) for k in lam)
        assert plain.stats()["checkouts_delta"] == 0
        _, outer = lossy._checkout()  # too far behind: full
        assert all(torch.equal(outer[k], lam[k]) for k in lam)
        assert lossy.stats()["checkouts_delta"] == 0
        driver.step()
        lossy._checkout()
        assert lossy.stats()["checkouts_delta"] == 1
        cs = coordinator.stats()
        assert cs["delta_copies"] == 1  # only the lossy worker costs a λ copy
        assert cs["worker_codecs"] == {"lossy": "int8"}
    finally:
        plain.close()
        lossy.close()


def test_copy_is_dropped_when_the_worker_leaves(coordinator: Coordinator) -> None:
    worker = make_worker(coordinator, "int8")
    worker._checkout()
    assert coordinator.stats()["delta_copies"] == 1
    worker.close()  # deregisters (the link thread has sent it when close() returns)
    deadline = time.monotonic() + 10.0
    while coordinator.stats()["delta_copies"] and time.monotonic() < deadline:
        time.sleep(0.01)  # nothing to await: poll the coordinator's counter
    assert coordinator.stats()["delta_copies"] == 0
