"""Unrolled / truncated hypergradients against plain autograd through explicit Python loops."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from solver_problems import make_logistic, make_ridge, rel_err

from chronos.core.errors import ConfigError, KeyMismatchError, NonFiniteError, ShapeMismatchError
from chronos.solver import unrolled_hypergradient

f64 = torch.float64


def explicit_loop(inner, outer, theta0, lam, steps, lr, detach_first=0, momentum=0.0):
    """Reference: plain autograd through a Python loop (first ``detach_first`` steps cut)."""
    lam = {k: v.detach().clone().requires_grad_(True) for k, v in lam.items()}
    theta = {k: v.detach().clone().requires_grad_(True) for k, v in theta0.items()}
    buf = None
    for t in range(steps):
        if t == detach_first:
            theta = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
            buf = None if buf is None else [b.detach() for b in buf]
        g = torch.autograd.grad(inner(theta, lam), list(theta.values()), create_graph=True)
        buf = list(g) if buf is None else [momentum * b + x for b, x in zip(buf, g, strict=True)]
        step = lam[lr] if isinstance(lr, str) else lr
        theta = {k: v - step * b for (k, v), b in zip(theta.items(), buf, strict=True)}
    grads = torch.autograd.grad(outer(theta, lam), list(lam.values()), allow_unused=True)
    return {k: torch.zeros_like(v) if g is None else g
            for (k, v), g in zip(lam.items(), grads, strict=True)}


def logistic_setup():
    lg = make_logistic(n=30, d=3, classes=3)
    lam = lg.outer_params()
    theta0 = {"W": torch.zeros(3, 3, dtype=f64), "b": torch.zeros(3, dtype=f64)}
    return lg, lam, theta0


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_float_lr_matches_explicit_loop(momentum):
    lg, lam, theta0 = logistic_setup()
    hg = unrolled_hypergradient(lg.inner, lg.outer, theta0, lam, steps=12, lr=0.5,
                                momentum=momentum)
    ref = explicit_loop(lg.inner, lg.outer, theta0, lam, 12, 0.5, momentum=momentum)
    for k in lam:
        assert rel_err(hg[k], ref[k]) < 1e-10, k


def test_learned_lr_matches_explicit_loop_and_finite_differences():
    lg, lam, theta0 = logistic_setup()
    lam = {**lam, "lr": torch.tensor(0.4, dtype=f64)}
    hg, info = unrolled_hypergradient(lg.inner, lg.outer, theta0, lam, steps=10, lr="lr",
                                      return_info=True)
    ref = explicit_loop(lg.inner, lg.outer, theta0, lam, 10, "lr")
    for k in lam:
        assert rel_err(hg[k], ref[k]) < 1e-10, k
    assert info.unused_outer == () and info.differentiated_steps == 10
    h = 1e-6

    def final_loss(step):
        out = unrolled_hypergradient(lg.inner, lg.outer, theta0, {**lam, "lr": step}, steps=10,
                                     lr="lr", return_info=True)[1]
        return out.outer_loss

    fd = (final_loss(lam["lr"] + h) - final_loss(lam["lr"] - h)) / (2 * h)
    assert float(hg["lr"]) == pytest.approx(fd, rel=1e-6)


@pytest.mark.parametrize("truncate", [7, 8, 100])
def test_truncate_at_least_steps_equals_full_unrolling(truncate):
    r = make_ridge()
    args = (r.inner, r.outer, {"w": torch.zeros(6, dtype=f64)}, {"log_wd": r.lam})
    full = unrolled_hypergradient(*args, steps=7, lr=0.3)
    trunc = unrolled_hypergradient(*args, steps=7, lr=0.3, truncate=truncate)
    assert torch.equal(full["log_wd"], trunc["log_wd"])


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_truncated_matches_a_loop_with_the_first_steps_cut(momentum):
    lg, lam, theta0 = logistic_setup()
    lam = {**lam, "lr": torch.tensor(0.5, dtype=f64)}
    hg, info = unrolled_hypergradient(lg.inner, lg.outer, theta0, lam, steps=15, lr="lr",
                                      truncate=4, momentum=momentum, return_info=True)
    ref = explicit_loop(lg.inner, lg.outer, theta0, lam, 15, "lr", detach_first=11,
                        momentum=momentum)
    for k in lam:
        assert rel_err(hg[k], ref[k]) < 1e-10, k
    assert info.differentiated_steps == 4 and len(info.inner_losses) == 15


def test_truncated_unrolling_approaches_the_implicit_hypergradient():
    r = make_ridge()
    args = (r.inner, r.outer, {"w": torch.zeros(6, dtype=f64)}, {"log_wd": r.lam})
    lmax = float(torch.linalg.eigvalsh(r.hessian()).max())
    errs = [rel_err(unrolled_hypergradient(*args, steps=300, lr=1 / lmax, truncate=k)["log_wd"],
                    r.exact_hypergradient()) for k in (5, 40, 300)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-3


def test_zero_steps_and_zero_truncation_give_the_direct_term_only():
    r = make_ridge()
    lam = {"log_wd": r.lam}

    def outer(p, h):
        return r.outer(p, h) + (h["log_wd"] ** 2).sum()

    for kw in ({"steps": 0}, {"steps": 5, "truncate": 0}):
        hg = unrolled_hypergradient(r.inner, outer, {"w": torch.zeros(6, dtype=f64)}, lam,
                                    lr=0.1, **kw)
        assert torch.allclose(hg["log_wd"], 2 * r.lam)


class SavedBytes:
    """Live bytes of tensors autograd keeps for backward, and their peak (saved-tensor hooks).

    Views of the same storage are counted once per save, so this over-counts shared data
    alike for every run; what matters is how the peak scales with the number of steps.
    """

    def __init__(self):
        self.live = 0
        self.peak = 0

    def pack(self, t):
        return _Held(t, self)

    @staticmethod
    def unpack(held):
        return held.t


class _Held:
    def __init__(self, t, owner):
        self.t, self.n, self.owner = t, t.numel() * t.element_size(), owner
        owner.live += self.n
        owner.peak = max(owner.peak, owner.live)

    def __del__(self):
        self.owner.live -= self.n


def _peak_saved(steps, truncate):
    r = make_ridge(d=50, n=60)
    meter = SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        unrolled_hypergradient(r.inner, r.outer, {"w": torch.zeros(50, dtype=f64)},
                               {"log_wd": r.lam}, steps=steps, lr=0.05, truncate=truncate)
    assert meter.live == 0  # every graph was freed: no leak
    return meter.peak


def test_truncated_memory_is_flat_in_steps_and_full_memory_grows():
    trunc = [_peak_saved(s, 5) for s in (10, 40, 160)]
    full = [_peak_saved(s, None) for s in (10, 40)]
    assert trunc[0] == trunc[1] == trunc[2]
    assert full[1] > 3.5 * full[0]  # the meter does see growth when the graph grows
    assert full[0] > trunc[0]


def _peak_allocated(steps, truncate):
    """Peak of live CPU bytes allocated by torch, from the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile

    r = make_ridge(d=50, n=60)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        unrolled_hypergradient(r.inner, r.outer, {"w": torch.zeros(50, dtype=f64)},
                               {"log_wd": r.lam}, steps=steps, lr=0.05, truncate=truncate)
    deltas = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                    if e.self_cpu_memory_usage)
    live = peak = 0
    for _, d in deltas:
        live += d
        peak = max(peak, live)
    return peak


def test_truncated_peak_allocation_is_flat_in_steps_by_the_profiler():
    short, long = _peak_allocated(8, 4), _peak_allocated(32, 4)
    full_short, full_long = _peak_allocated(8, None), _peak_allocated(32, None)
    assert long <= 1.1 * short
    assert full_long > 2.5 * full_short  # the measurement does see a growing graph


def test_dtype_and_leaves_are_preserved():
    r = make_ridge(dtype=torch.float32)
    lam = r.lam.clone().requires_grad_(True)
    w0 = torch.zeros(6, requires_grad=True)
    hg = unrolled_hypergradient(r.inner, r.outer, {"w": w0}, {"log_wd": lam}, steps=5, lr=0.1)
    assert hg["log_wd"].dtype == torch.float32 and not hg["log_wd"].requires_grad
    assert lam.is_leaf and lam.grad is None and w0.grad is None
    assert float(w0.detach().abs().sum()) == 0.0


def test_unused_outer_parameter_is_zero_and_named():
    r = make_ridge()
    hg, info = unrolled_hypergradient(r.inner, r.outer, {"w": torch.zeros(6, dtype=f64)},
                                      {"log_wd": r.lam, "other": torch.ones(2, dtype=f64)},
                                      steps=3, lr=0.1, return_info=True)
    assert info.unused_outer == ("other",) and hg["other"].tolist() == [0.0, 0.0]


def test_bad_inputs_raise_clear_errors():
    r = make_ridge()
    args = (r.inner, r.outer, {"w": torch.zeros(6, dtype=f64)}, {"log_wd": r.lam})
    with pytest.raises(KeyMismatchError, match="names no outer parameter"):
        unrolled_hypergradient(*args, steps=3, lr="eta")
    with pytest.raises(ShapeMismatchError, match="scalar"):
        unrolled_hypergradient(*args, steps=3, lr="log_wd")
    for bad in ({"steps": -1, "lr": 0.1}, {"steps": 3, "lr": -0.1}, {"steps": 3, "lr": 0.1,
                "truncate": -2}, {"steps": 3, "lr": 0.1, "momentum": 1.0},
                {"steps": 2.5, "lr": 0.1}):
        with pytest.raises(ConfigError):
            unrolled_hypergradient(*args, **bad)
    with pytest.raises(NonFiniteError, match="inner_loss at step"):  # diverges to inf
        unrolled_hypergradient(*args, steps=2000, lr=1e3)


@settings(max_examples=10)
@given(steps=st.integers(1, 6), truncate=st.integers(0, 8), lr=st.floats(0.01, 0.3),
       momentum=st.sampled_from([0.0, 0.5]))
def test_truncation_property_against_explicit_loop(steps, truncate, lr, momentum):
    r = make_ridge(d=3)
    lam = {"log_wd": r.lam}
    theta0 = {"w": torch.ones(3, dtype=f64)}
    hg = unrolled_hypergradient(r.inner, r.outer, theta0, lam, steps=steps, lr=lr,
                                truncate=truncate, momentum=momentum)
    cut = max(steps - truncate, 0)
    if cut >= steps:
        assert float(hg["log_wd"].abs().sum()) == 0.0
        return
    ref = explicit_loop(r.inner, r.outer, theta0, lam, steps, lr, detach_first=cut,
                        momentum=momentum)
    assert torch.allclose(hg["log_wd"], ref["log_wd"], rtol=1e-10, atol=1e-14)
