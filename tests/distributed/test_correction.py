"""Stale-commit correction: the corrector alone, then inside the coordinator state machine."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from chronos.core.errors import ConfigError
from chronos.distributed.aggregation import CoordinatorConfig
from chronos.distributed.correction import StaleCorrector
from chronos.distributed.messages import Checkout, Commit, CommitReply, Register
from chronos.distributed.state import CoordinatorState

F64 = torch.float64
A = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=F64)  # g(λ) = A λ + c: a linear field
C = torch.tensor([1.0, -1.0], dtype=F64)


def field(lam: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"x": A @ lam + C}


def lam(*xs: float) -> dict[str, torch.Tensor]:
    return {"x": torch.tensor(xs, dtype=F64)}


def test_exact_on_a_linear_field() -> None:
    c = StaleCorrector(max_staleness=4, max_ratio=10.0)  # the move is larger than ‖g‖
    points = [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (2.0, 0.5)]
    for v, p in enumerate(points):
        c.record_version(v, lam(*p))
    for v, p in enumerate(points[:3]):  # fresh commits: stored, passed through
        out, corrected = c.correct("w", v, 0, field(torch.tensor(p, dtype=F64)))
        assert not corrected and torch.equal(out["x"], field(torch.tensor(p, dtype=F64))["x"])
    # a commit computed at version 2 applied at version 4 (staleness 2)
    g = field(torch.tensor(points[2], dtype=F64))
    out, corrected = c.correct("w", 2, 2, g)
    assert corrected and c.corrected == 1
    torch.testing.assert_close(out["x"], field(torch.tensor(points[4], dtype=F64))["x"],
                               rtol=1e-9, atol=1e-9)


def test_no_history_means_no_correction_and_histories_are_per_worker() -> None:
    c = StaleCorrector(max_staleness=2)
    for v in range(3):
        c.record_version(v, lam(float(v), 0.0))
    g = field(torch.tensor([0.0, 0.0], dtype=F64))
    out, corrected = c.correct("a", 0, 2, g)  # a's first commit: nothing to fit a slope on
    assert not corrected and torch.equal(out["x"], g["x"])
    c.correct("b", 1, 0, g)
    out, corrected = c.correct("a", 1, 1, g)  # b's entry does not count for a
    assert corrected  # a now has two entries of its own
    c.forget("a")
    _, corrected = c.correct("a", 1, 1, g)
    assert not corrected


def test_correction_is_capped_at_the_gradient_norm() -> None:
    c = StaleCorrector(max_staleness=4, max_ratio=0.5)
    c.record_version(0, lam(0.0))
    c.record_version(1, lam(1.0))
    c.record_version(2, lam(100.0))  # a huge move: the linear correction would be 2·99
    c.correct("w", 0, 0, {"x": torch.tensor([1.0], dtype=F64)})
    c.correct("w", 1, 0, {"x": torch.tensor([3.0], dtype=F64)})  # slope 2
    out, corrected = c.correct("w", 1, 1, {"x": torch.tensor([3.0], dtype=F64)})
    assert corrected
    assert out["x"].item() == pytest.approx(3.0 + 0.5 * 3.0)


def test_versions_beyond_the_window_are_not_corrected() -> None:
    c = StaleCorrector(max_staleness=1)  # keeps 2 versions
    for v in range(4):
        c.record_version(v, lam(float(v)))
    out, corrected = c.correct("w", 0, 3, {"x": torch.tensor([1.0], dtype=F64)})
    assert not corrected and out["x"].item() == 1.0


def test_bad_settings() -> None:
    with pytest.raises(ConfigError, match="min_entries"):
        StaleCorrector(2, min_entries=1)
    with pytest.raises(ConfigError, match="max_ratio"):
        StaleCorrector(2, max_ratio=0.0)
    with pytest.raises(ConfigError, match="stale_correction"):
        CoordinatorConfig(stale_correction="yes")  # type: ignore[arg-type]


def test_state_dict_round_trip() -> None:
    c = StaleCorrector(max_staleness=4)
    for v in range(3):
        c.record_version(v, lam(float(v), 1.0))
        c.correct("w", v, 0, field(torch.tensor([float(v), 1.0], dtype=F64)))
    d = StaleCorrector(max_staleness=4)
    d.load_state_dict(c.state_dict())
    g = field(torch.tensor([0.0, 1.0], dtype=F64))
    c.record_version(3, lam(5.0, 2.0))
    d.record_version(3, lam(5.0, 2.0))
    a, _ = c.correct("w", 1, 2, g)
    b, _ = d.correct("w", 1, 2, g)
    torch.testing.assert_close(a["x"], b["x"], rtol=0, atol=0)


# -- inside the state machine ---------------------------------------------------------------------


def _state(**kw: Any) -> CoordinatorState:
    kw = {"aggregation": "buffered"} | kw  # commit-time correction and its weight 1
    cfg = CoordinatorConfig(optimizer="sgd", outer_lr=0.1, min_commits=1, max_in_flight=4,
                            max_staleness=4, lease_timeout=100.0, heartbeat_interval=1.0, **kw)
    return CoordinatorState({"x": torch.tensor([0.0, 0.0], dtype=F64)}, cfg)


def _drive(state: CoordinatorState, schedule: list[str]) -> list[CommitReply]:
    """Each worker commits g(λ of its checked-out version), in ``schedule`` order."""
    held: dict[str, tuple[int, torch.Tensor]] = {}
    replies = []
    for w in sorted(set(schedule)):
        state.handle(w, Register(request_id=0, worker_id=w), now=0.0)
        r = state.handle(w, Checkout(request_id=1, worker_id=w), now=0.0)[0].message
        held[w] = (r.version, r.outer_params["x"].clone())
    for i, w in enumerate(schedule):
        v, x = held[w]
        out = state.handle(w, Commit(request_id=10 + i, worker_id=w, version=v,
                                     commit_id=f"{w}{i}", hypergradient=field(x)), now=0.0)
        reply = out[0].message
        assert isinstance(reply, CommitReply)
        replies.append(reply)
        r = state.handle(w, Checkout(request_id=1000 + i, worker_id=w), now=0.0)[0].message
        held[w] = (r.version, r.outer_params["x"].clone())
    return replies


def test_state_machine_weights_corrected_commits_one_and_counts_them() -> None:
    schedule = ["a", "b"] * 6  # round-robin: staleness 1 after the first commit
    on = _state(stale_correction=True)
    replies = _drive(on, schedule)
    stale = [r for r in replies if r.staleness > 0]
    assert stale and on.stats()["commits_corrected"] > 0
    corrected = [r for r in stale if r.weight == 1.0]
    assert len(corrected) == on.stats()["commits_corrected"]
    off = _state()
    replies_off = _drive(off, schedule)
    assert off.stats()["commits_corrected"] == 0
    assert all(r.weight == 0.5 ** r.staleness for r in replies_off)


def test_state_machine_correction_on_a_linear_field_tracks_the_current_gradient() -> None:
    """With g linear and every stale commit corrected exactly, the run equals SGD with fresh
    gradients from the moment both workers have two entries; compare λ against decay-only."""
    schedule = ["a", "b"] * 10
    on, off = _state(stale_correction=True), _state()
    _drive(on, schedule)
    _drive(off, schedule)
    opt = -torch.linalg.solve(A, C)  # the stationary point g = 0
    err_on = float(torch.linalg.vector_norm(on.outer_params["x"] - opt))
    err_off = float(torch.linalg.vector_norm(off.outer_params["x"] - opt))
    assert err_on < err_off
