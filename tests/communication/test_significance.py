import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from chronos.communication import SignificanceConfig, SignificanceFilter, significance
from chronos.core.errors import ConfigError


def test_significance_is_relative_norm():
    d = {"a": torch.tensor([3.0, 4.0])}
    p = {"a": torch.tensor([0.0, 10.0])}
    assert significance(d, p) == pytest.approx(0.5)
    assert significance(d, {"a": torch.zeros(2)}, eps=1.0) == pytest.approx(5.0)


@given(
    deltas=st.lists(
        st.lists(st.floats(-1.0, 1.0, allow_nan=False), min_size=3, max_size=3),
        min_size=1,
        max_size=30,
    ),
    threshold=st.sampled_from([0.0, 0.01, 0.1, 0.5, 2.0]),
    target=st.sampled_from([None, 0.3]),
)
def test_error_feedback_invariant_sent_plus_residual_equals_total(deltas, threshold, target):
    f = SignificanceFilter(SignificanceConfig(threshold=threshold, target_rate=target))
    params = {"w": torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)}
    total = torch.zeros(3, dtype=torch.float64)
    sent_sum = torch.zeros(3, dtype=torch.float64)
    for d in deltas:
        delta = {"w": torch.tensor(d, dtype=torch.float64)}
        total += delta["w"]
        out = f.update(delta, params)
        if out is not None:
            sent_sum += out["w"]
        assert torch.allclose(sent_sum + f.residual["w"], total, atol=1e-12)
    s = f.stats()
    assert s["sent"] + s["skipped"] == len(deltas)


def test_small_updates_are_held_then_sent_together():
    f = SignificanceFilter(SignificanceConfig(threshold=0.1))
    params = {"w": torch.ones(4)}  # ‖θ‖ = 2, so ‖Δ‖ must exceed 0.2
    small = {"w": torch.full((4,), 0.04)}  # ‖Δ‖ = 0.08
    assert not f.should_communicate(small, params)
    assert f.update(small, params) is None
    assert f.update(small, params) is None  # residual 0.16
    out = f.update(small, params)  # 0.24 > 0.2
    assert out is not None and torch.allclose(out["w"], torch.full((4,), 0.12))
    assert float(f.residual_norm) == 0.0
    assert f.stats()["sent"] == 1 and f.stats()["skipped"] == 2


def test_flush_returns_and_clears_residual():
    f = SignificanceFilter(SignificanceConfig(threshold=10.0))
    assert f.flush() is None
    f.update({"w": torch.ones(2)}, {"w": torch.ones(2)})
    out = f.flush()
    assert out is not None and torch.equal(out["w"], torch.ones(2))
    assert f.flush() is None


def test_adaptive_threshold_tracks_target_rate():
    torch.manual_seed(0)
    f = SignificanceFilter(SignificanceConfig(threshold=1e-4, target_rate=0.25, gain=0.2))
    params = {"w": torch.ones(10)}
    sent = 0
    n = 2000
    for _ in range(n):
        if f.update({"w": 0.01 * torch.randn(10)}, params) is not None:
            sent += 1
    assert abs(sent / n - 0.25) < 0.05
    assert f.threshold != 1e-4


@pytest.mark.parametrize(
    "kwargs",
    [{"threshold": -1.0}, {"threshold": math.inf}, {"eps": 0.0}, {"target_rate": 0.0},
     {"target_rate": 1.5}, {"gain": 0.0}, {"min_threshold": 2.0, "max_threshold": 1.0},
     {"max_skip": 0}, {"max_skip": True}],
)
def test_bad_config(kwargs):
    with pytest.raises(ConfigError):
        SignificanceConfig(**kwargs)


def test_significance_in_parameter_space_with_a_scale():
    d = {"a": torch.tensor([3.0, 4.0])}  # ‖Δ‖ = 5
    zero = {"a": torch.zeros(2)}
    assert significance(d, zero, step_size=0.1, scale=1.0) == pytest.approx(0.5)
    assert significance(d, {"a": torch.tensor([0.0, 9.0])}, step_size=0.1,
                        scale=1.0) == pytest.approx(0.05)
    # θ = 0 with a yardstick: a small update is held back, not sent at infinite significance
    f = SignificanceFilter(SignificanceConfig(threshold=0.01))
    assert f.update({"a": torch.full((2,), 1e-3)}, zero, step_size=1.0, scale=1.0) is None


def test_max_skip_bounds_consecutive_holds_and_counts_forced_sends():
    f = SignificanceFilter(SignificanceConfig(threshold=1e9, max_skip=2))
    params = {"w": torch.ones(3)}
    outs = [f.update({"w": torch.ones(3)}, params) for _ in range(7)]
    assert [o is not None for o in outs] == [False, False, True, False, False, True, False]
    assert torch.equal(outs[2]["w"], torch.full((3,), 3.0))
    s = f.stats()
    assert s["sent"] == 2 and s["forced"] == 2 and s["skipped"] == 5 and f.held == 1
    assert f.update({"w": torch.ones(3)}, params, force=True) is not None  # forced at once
    with pytest.raises(ConfigError, match="max_skip"):
        SignificanceConfig(max_skip=0)


@given(
    deltas=st.lists(
        st.tuples(st.lists(st.floats(-1.0, 1.0, allow_nan=False), min_size=3, max_size=3),
                  st.booleans()),
        min_size=1,
        max_size=30,
    ),
    threshold=st.sampled_from([0.0, 0.1, 2.0]),
)
def test_invariant_holds_when_sends_are_refused_and_restored(deltas, threshold):
    """``sent`` counts only delivered payloads; a refused one goes back into the residual."""
    f = SignificanceFilter(SignificanceConfig(threshold=threshold, max_skip=3))
    params = {"w": torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)}
    total = torch.zeros(3, dtype=torch.float64)
    delivered = torch.zeros(3, dtype=torch.float64)
    for d, accepted in deltas:
        delta = {"w": torch.tensor(d, dtype=torch.float64)}
        total += delta["w"]
        out = f.update(delta, params, step_size=0.5, scale=0.1)
        if out is not None:
            if accepted:
                delivered += out["w"]
            else:
                f.restore(out)
        assert torch.allclose(delivered + f.residual["w"], total, atol=1e-12)
