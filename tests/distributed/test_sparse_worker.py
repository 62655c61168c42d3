"""Sparse workers: local outer steps, max_skip, and error feedback that survives rejection.

A real :class:`~chronos.distributed.Coordinator` on 127.0.0.1 and real :class:`Worker` s in
threads. The end-to-end invariant is checked with plain SGD, ``outer_lr=1``, ``decay=1`` and
``min_commits=1`` (each accepted commit is one step ``λ ← λ − payload``), so

    λ_0 − λ_final = Σ accepted payloads = Σ_workers (computed − residual)

exactly (float64 rounding), including runs with rejected commits and a coordinator restart.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from chronos.communication.significance import significance
from chronos.core import InnerProblem
from chronos.core import tensordict as td
from chronos.distributed.coordinator import Coordinator
from chronos.distributed.worker import Worker, WorkerConfig

f64 = torch.float64
# the invariants below are exact sums of what was sent: the buffered rule applies every commit
# once (aggregation="latest" keeps each worker's latest instead; see test_latest.py)
SGD1 = {"optimizer": "sgd", "outer_lr": 1.0, "decay": 1.0, "min_commits": 1,
        "heartbeat_interval": 0.1, "aggregation": "buffered"}


class Bowl(InnerProblem):
    """θ* = λ (f = ½‖θ − λ‖², one SGD step of lr 1 from anywhere), F = ½κ‖θ − c‖², so the
    hypergradient is exactly ``κ(λ − c)``. Hooks: ``seen`` (λ and version of every solve),
    ``gate`` (set ``block``: the next solve waits on it; ``blocked`` tells it waits),
    ``pause`` (called once inside the next hypergradient, after the worker's last lease check).
    """

    num_steps = 1
    inner_lr = 1.0
    optimizer = "sgd"
    tol = 0.0

    def __init__(self, n: int = 6, kappa: float = 0.1, init: float = 0.0, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.n, self.kappa, self.init = n, kappa, init
        self.c = 1.0 + torch.rand(n, generator=gen, dtype=f64)
        self.seen: list[tuple[int, torch.Tensor]] = []
        self.block = False
        self.blocked = threading.Event()
        self.gate = threading.Event()
        self.pause_next: Callable[[int], None] | None = None
        self._pause: Callable[[], None] | None = None

    def default_outer_params(self) -> dict[str, torch.Tensor]:
        return {"lam": torch.full((self.n,), self.init, dtype=f64)}

    def init_params(self) -> dict[str, torch.Tensor]:
        return {"theta": torch.zeros(self.n, dtype=f64)}

    def inner_loss(self, params, outer_params, batch=None):
        return 0.5 * ((params["theta"] - outer_params["lam"]) ** 2).sum()

    def outer_loss(self, params, outer_params, batch=None):
        pause, self._pause = self._pause, None
        if pause is not None:
            pause()
        return 0.5 * self.kappa * ((params["theta"] - self.c) ** 2).sum()

    def solve(self, outer_params, init_params=None, num_steps=None, **kwargs):
        version = int(kwargs.get("version", -1))
        self.seen.append((version, outer_params["lam"].detach().clone()))
        if self.block:
            self.block = False
            self.blocked.set()
            assert self.gate.wait(30), "the test never opened the gate"
        if self.pause_next is not None:
            hook = self.pause_next
            self._pause = lambda: hook(version)
        return super().solve(outer_params, init_params, num_steps, **kwargs)


@pytest.fixture
def coordinators() -> Iterator[Callable[..., Coordinator]]:
    made: list[Coordinator] = []

    def make(problem: Bowl, port: int = 0, **kwargs: Any) -> Coordinator:
        c = Coordinator(problem.default_outer_params(), port=port, **kwargs).start()
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()


def run_all(ws: list[Worker], iterations: int, timeout: float = 30.0) -> None:
    """Run every worker for ``iterations`` in its own thread; fail if one does not finish."""
    errors: list[BaseException] = []

    def body(w: Worker) -> None:
        try:
            w.run(max_iterations=iterations)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=body, args=(w,)) for w in ws]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    for w in ws:
        w.stop()
    for t in threads:
        t.join(10)
    assert not [t for t in threads if t.is_alive()], "a worker did not finish"
    assert not errors, errors


def delivered(ws: list[Worker]) -> torch.Tensor:
    """Σ_workers (computed − residual), checking each worker's own bookkeeping on the way."""
    total = torch.zeros_like(ws[0].problem.default_outer_params()["lam"])
    for w in ws:
        fb = w.error_feedback()
        assert torch.allclose(td.add(fb["sent"], fb["residual"])["lam"], fb["computed"]["lam"],
                              rtol=0, atol=1e-12)
        total += td.sub(fb["computed"], fb["residual"])["lam"]
    return total


# -- the end-to-end invariant --------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.filterwarnings("ignore::chronos.distributed.aggregation.WindowStalenessWarning")
def test_invariant_holds_exactly_with_rejected_commits(coordinators, workers):
    probs = [Bowl(seed=0) for _ in range(4)]  # one problem; slow, pusher, a, b
    coord = coordinators(probs[0], max_staleness=0, max_in_flight=10, **SGD1)
    lam0 = coord.outer_params["lam"]
    slow, pusher, a, b = (
        workers(probs[0], coord.address, worker_id="slow", significance_threshold=1e-9),
        workers(probs[1], coord.address, worker_id="pusher", significance_threshold=1e-9),
        workers(probs[2], coord.address, worker_id="a", significance_threshold=0.05,
                max_skip=3),
        workers(probs[3], coord.address, worker_id="b", significance_threshold=0.05,
                max_skip=3, local_lr=0.5),
    )
    rounds = {"n": 0}

    def push(version: int) -> None:
        """Every 2nd hypergradient of ``slow`` (past its last lease check) waits for one
        iteration of ``pusher``: the version is then past ``version`` (pusher's own commit was
        accepted, or someone else's beat it), so slow's commit is rejected (max_staleness=0)."""
        rounds["n"] += 1
        if rounds["n"] % 2 == 0:
            pusher.step()
            assert coord.version > version

    probs[0].pause_next = push
    pusher.connect()
    run_all([slow, a, b], iterations=8)
    ws = [slow, pusher, a, b]
    s = slow.stats()
    assert s["commits_rejected"] >= 4 and s["commits_restored"] >= s["commits_rejected"]
    assert sum(w.stats()["commits_skipped"] for w in (a, b)) >= 1  # the filter held some back
    applied = lam0 - coord.outer_params["lam"]
    assert torch.allclose(applied, delivered(ws), rtol=0, atol=1e-9)
    c = coord.stats()
    assert c["commits_accepted"] == sum(w.stats()["commits_accepted"] for w in ws)
    assert coord.version == c["commits_accepted"]


@pytest.mark.timeout(90)
def test_invariant_holds_across_a_coordinator_restart(coordinators, workers):
    """The coordinator vanishes without a word (no ShutdownNotice) while both workers are
    inside a solve; a fresh one (λ_0 again) takes its port. The commits the workers then send
    on versions of the old coordinator are refused by the new one and go back into the
    residual: Σ over both coordinators of (λ_0 − λ_end) still equals what the workers count
    as delivered."""
    probs = [Bowl(seed=0), Bowl(seed=0)]
    first = coordinators(probs[0], **SGD1)
    lam0 = first.outer_params["lam"]
    ws = [workers(p, first.address, worker_id=f"w{i}", significance_threshold=0.05, max_skip=2,
                  request_timeout=0.3)
          for i, p in enumerate(probs)]
    threads = [threading.Thread(target=w.run, kwargs={"max_iterations": 14}) for w in ws]
    for t in threads:
        t.start()
    try:
        assert first.wait_for_version(3, timeout=20)
        for p in probs:
            p.block = True
        for p in probs:
            assert p.blocked.wait(20)  # both wait inside a solve: no commit in flight
        first._shutdown_workers = lambda: None  # type: ignore[method-assign]  # a crash
        first.stop()
        moved_first = lam0 - first.outer_params["lam"]
        second = coordinators(probs[0], port=first.port, **SGD1)
        for p in probs:
            p.gate.set()
        for t in threads:
            t.join(40)
        assert not [t for t in threads if t.is_alive()], "a worker did not finish"
    finally:
        for p in probs:
            p.gate.set()
        for w in ws:
            w.stop()
        for t in threads:
            t.join(10)
    stats = [w.stats() for w in ws]
    assert all(s["reconnects"] >= 1 and s["iterations"] == 14 for s in stats), stats
    assert second.version >= 1
    moved = moved_first + (lam0 - second.outer_params["lam"])
    assert torch.allclose(moved, delivered(ws), rtol=0, atol=1e-9)


# -- local outer steps ---------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_held_back_rounds_take_local_steps_instead_of_recomputing(coordinators, workers):
    prob = Bowl(init=1.0)  # ‖λ‖ ≈ 2.4, one local step 0.5·‖g‖ ≈ 0.07: held ~3 rounds
    coord = coordinators(prob, **{**SGD1, "min_commits": 10**6})
    w = workers(prob, coord.address, worker_id="local", significance_threshold=0.1,
                local_lr=0.5, max_skip=3)
    w.run(max_iterations=8)
    assert coord.version == 0  # λ never moved on the coordinator: every round is local
    s = w.stats()
    assert s["commits_skipped"] >= 4 and s["commits_accepted"] >= 1
    lams = [lam for _, lam in prob.seen]
    assert len(lams) == 8
    for i in range(len(lams)):
        for j in range(i):
            assert not torch.equal(lams[i], lams[j]), f"solve {i} repeated the λ of solve {j}"
    for prev, nxt in itertools.pairwise(lams):  # plain SGD on the worker's own g
        g = prob.kappa * (prev - prob.c)
        assert torch.allclose(nxt, prev - 0.5 * g, rtol=0, atol=1e-12)


def _custom_sgd(lr: float) -> Any:
    """An SGD coordinator the worker cannot read the step of (announced as "custom")."""
    return lambda params: torch.optim.SGD(params, lr=lr)


@pytest.mark.timeout(30)
def test_an_sgd_coordinators_announced_step_is_the_local_step(coordinators, workers):
    prob = Bowl()
    coord = coordinators(prob, **{**SGD1, "outer_lr": 0.5})
    w = workers(prob, coord.address, worker_id="told", significance_threshold=1e9,
                max_skip=1).connect()
    assert w.step() is None  # the step is known at once: nothing forced, held back
    assert w.stats()["local_lr"] == 0.5 and w.stats()["commits_forced"] == 0
    w.step()  # max_skip 1: sent; the second solve ran at λ_0 − 0.5·g_0
    (_, lam0), (_, lam1) = prob.seen[:2]
    g0 = prob.kappa * (lam0 - prob.c)
    assert torch.allclose(lam1, lam0 - 0.5 * g0, rtol=0, atol=1e-12)


@pytest.mark.timeout(30)
def test_measured_step_matches_the_coordinators_sgd_step_and_rebases(coordinators, workers):
    prob = Bowl()
    coord = coordinators(prob, **{**SGD1, "optimizer": _custom_sgd(0.5)})
    w = workers(prob, coord.address, worker_id="measure", significance_threshold=0.5,
                max_skip=2).connect()
    assert w.step() is not None  # no step measured yet: sent (bootstrap), λ_1 = λ_0 − 0.5·g
    assert math.isnan(w.stats()["local_lr"])
    w.step()  # checks out λ_1: one measured step of 0.5·‖g_0‖ per version
    g0, g1 = (float(lam.sub(prob.c).norm()) for _, lam in prob.seen[:2])  # ‖g‖ / κ
    assert w.stats()["local_lr"] == pytest.approx(0.5 * g0 / ((g0 + g1) / 2), rel=1e-9)
    for _ in range(4):
        w.step()
    assert [v for v, _ in prob.seen[:2]] == [0, 1]
    lams = [lam for _, lam in prob.seen]
    assert all(not torch.equal(x, y) for i, x in enumerate(lams) for y in lams[:i])
    fb = w.error_feedback()
    assert torch.allclose(td.add(fb["sent"], fb["residual"])["lam"], fb["computed"]["lam"],
                          atol=1e-12)
    assert torch.allclose(prob.default_outer_params()["lam"] - coord.outer_params["lam"],
                          0.5 * fb["sent"]["lam"], rtol=0, atol=1e-12)


# -- max_skip, λ = 0 -----------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_max_skip_bounds_silence_under_a_huge_threshold(coordinators, workers):
    prob = Bowl()
    coord = coordinators(prob, **{**SGD1, "optimizer": _custom_sgd(1.0)})
    w = workers(prob, coord.address, worker_id="quiet", significance_threshold=1e9, max_skip=2)
    w.connect()
    outcomes = []
    for _ in range(10):
        reply = w.step()
        outcomes.append(None if reply is None else reply.status)
    # round 1: no step size known yet (sent); then at most 2 held back in a row, always
    assert outcomes == ["accepted", None, None, "accepted", None, None, "accepted", None, None,
                        "accepted"]
    assert coord.version == 4
    s = w.stats()
    assert s["commits_forced"] == 4 and s["commits_skipped"] == 6


def test_zero_parameters_are_not_special_for_the_filter():
    zero = {"lam": torch.zeros(4, dtype=f64)}
    g = {"lam": torch.full((4,), 1e-3, dtype=f64)}
    assert significance(g, zero) > 1e6  # the plain rule: anything at λ = 0 is "significant"
    # parameter space with a yardstick: one local step of the coordinator's size is 1
    assert significance(g, zero, step_size=100.0, scale=0.2) == pytest.approx(1.0)
    assert significance(g, zero, step_size=100.0, scale=20.0) == pytest.approx(0.01)


@pytest.mark.timeout(30)
def test_starting_at_zero_does_not_send_everything_and_still_converges(coordinators, workers):
    prob = Bowl(kappa=0.3, init=0.0)
    coord = coordinators(prob, **SGD1)
    w = workers(prob, coord.address, worker_id="zero", significance_threshold=0.01, max_skip=4)
    w.run(max_iterations=30)
    s = w.stats()
    assert s["commits_sent"] < 30 and s["commits_skipped"] >= 5
    lam = coord.outer_params["lam"]
    assert float((lam - prob.c).norm()) < 0.05 * float(prob.c.norm())
    fb = w.error_feedback()
    assert torch.allclose(prob.default_outer_params()["lam"] - lam,
                          td.sub(fb["computed"], fb["residual"])["lam"], atol=1e-9)


# -- the README shape on the default problem -----------------------------------------------------


@pytest.mark.timeout(120)
def test_readme_worker_with_significance_threshold_learns_on_digits(workers):
    """``WorkerConfig(coordinator_addr=..., significance_threshold=0.01)`` on the default
    problem: the job runs (nothing stalls) and the outer loss the workers measure goes down."""
    from chronos.benchmarks.problems import digits_weight_decay

    shards = [digits_weight_decay(rank=i, world_size=2) for i in range(2)]
    coord = Coordinator(problem=shards[0], port=0, heartbeat_interval=0.1).start()
    try:
        ws = [Worker(p, WorkerConfig(coordinator_addr=coord.address, worker_id=f"d{i}",
                                     significance_threshold=0.01))
              for i, p in enumerate(shards)]
        try:
            run_all(ws, iterations=6, timeout=90)
        finally:
            for w in ws:
                w.close()
        history = coord.history
    finally:
        coord.stop()
    losses = [h["outer_loss"] for h in history if "outer_loss" in h]
    assert coord.version >= 2 and len(losses) >= 2, history
    assert losses[-1] < losses[0]
    assert all(w.stats()["iterations"] == 6 for w in ws)


# -- lossy codecs on commits, and the final flush ----------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("codec, threshold", [("topk:0.34+int8", 0.0), ("int8", 0.05),
                                              ("fp16", 0.0)])
def test_coded_commits_keep_the_invariant_and_the_final_flush_empties_the_residual(
        coordinators, workers, codec, threshold):
    prob = Bowl()
    coord = coordinators(prob, **SGD1)
    ws = [workers(prob, coord.address, worker_id=f"c{i}", codec=codec,
                  significance_threshold=threshold, max_skip=2) for i in range(2)]
    run_all(ws, iterations=6)  # run(max_iterations) ends with flush()
    applied = prob.default_outer_params()["lam"] - coord.outer_params["lam"]
    computed = sum((w.error_feedback()["computed"]["lam"] for w in ws), torch.zeros(prob.n,
                                                                                 dtype=f64))
    residual = sum((w.error_feedback()["residual"]["lam"] for w in ws), torch.zeros(prob.n,
                                                                                  dtype=f64))
    # what the coordinator applied (decoded payloads) + what is left = what was computed
    assert torch.allclose(applied + residual, computed, rtol=0, atol=1e-9)
    assert all(w.stats()["codec"] == codec for w in ws)
    assert coord.stats()["hypergradients_accepted"] >= coord.stats()["commits_accepted"] > 0
    if codec != "fp16":  # the flush sends what the codec dropped; fp16 leaves ~1e-4 relative
        assert float(residual.norm()) < 0.05 * float(computed.norm())
