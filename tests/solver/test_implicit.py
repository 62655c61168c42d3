"""Conformance battery for implicit hypergradients: closed form, finite differences, bad input."""

import itertools
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from solver_problems import make_ridge, rel_err

from chronos.core.errors import (
    ChronosTypeError,
    ConfigError,
    ConvergenceWarning,
    KeyMismatchError,
    NonFiniteError,
    ShapeMismatchError,
)
from chronos.solver import cg, implicit_hypergradient, matmul
from chronos.solver import implicit as implicit_module

f64 = torch.float64


def ridge_call(r, **kw):
    return implicit_hypergradient(r.inner, r.outer, {"w": r.optimum()}, {"log_wd": r.lam}, **kw)


@pytest.mark.parametrize("method", ["cg", "direct"])
def test_ridge_closed_form_cg_and_direct(ridge, method):
    hg, info = ridge_call(ridge, method=method, return_info=True)
    exact = ridge.exact_hypergradient()
    assert rel_err(hg["log_wd"], exact) <= 1e-6
    assert info.converged and info.unused_outer == ()
    assert info.inner_grad_norm < 1e-10


@pytest.mark.parametrize("method,options", [
    ("neumann", {}),
    ("fixed_point", {}),
    ("fixed_point", {"momentum": 0.3}),
])
def test_ridge_neumann_and_fixed_point_converge_with_iterations(ridge, method, options):
    lmax = float(torch.linalg.eigvalsh(ridge.hessian()).max())
    exact = ridge.exact_hypergradient()
    errors = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for k in (2, 8, 32, 128):
            hg = ridge_call(ridge, method=method, max_iter=k, tol=0.0, alpha=1.0 / lmax,
                            **options)
            errors.append(rel_err(hg["log_wd"], exact))
    assert all(e2 < e1 for e1, e2 in itertools.pairwise(errors)), errors
    assert errors[-1] < 1e-4


def test_logistic_matches_central_finite_differences(logistic):
    lam = logistic.outer_params()
    theta = logistic.solve(lam)
    hg, info = implicit_hypergradient(logistic.inner, logistic.outer, theta, lam,
                                      return_info=True, tol=1e-12, max_iter=500)
    assert info.converged and info.inner_grad_norm < 1e-10
    h = 1e-5
    # a few coordinates of each outer parameter: per-feature decay and per-sample weight
    for name, idx in (("log_wd", 0), ("log_wd", 3), ("s", 0), ("s", 7), ("s", 21)):
        plus = {k: v.clone() for k, v in lam.items()}
        minus = {k: v.clone() for k, v in lam.items()}
        plus[name][idx] += h
        minus[name][idx] -= h
        fd = (logistic.outer(logistic.solve(plus), plus)
              - logistic.outer(logistic.solve(minus), minus)) / (2 * h)
        assert float(hg[name][idx]) == pytest.approx(float(fd), rel=1e-5, abs=1e-9), (name, idx)


def test_direct_term_of_the_outer_loss_is_included(ridge):
    def outer(p, h):
        return ridge.outer(p, h) + 0.3 * (h["log_wd"] ** 2).sum()

    hg = implicit_hypergradient(ridge.inner, outer, {"w": ridge.optimum()},
                                {"log_wd": ridge.lam}, method="direct")
    expected = ridge.exact_hypergradient() + 0.6 * ridge.lam
    assert rel_err(hg["log_wd"], expected) <= 1e-8


def test_damping_regularizes_the_hessian(ridge):
    w = ridge.optimum()
    hg = ridge_call(ridge, damping=0.5, tol=1e-13)
    # closed form with (H + 0.5 I)
    v = torch.linalg.solve(ridge.hessian() + 0.5 * torch.eye(len(w), dtype=f64),
                           ridge.Xv.T @ (ridge.Xv @ w - ridge.yv) / len(ridge.yv))
    expected = -(ridge.lam.exp() * w) * v
    assert rel_err(hg["log_wd"], expected) <= 1e-8
    # a ready solver callable gets the damping through the matvec
    hg2 = ridge_call(ridge, method=cg(tol=1e-13), damping=0.5)
    assert rel_err(hg2["log_wd"], expected) <= 1e-8


def test_unused_outer_parameter_gets_zero_and_is_named(ridge):
    lam = {"log_wd": ridge.lam, "dropout": torch.tensor(0.3, dtype=f64)}
    hg, info = implicit_hypergradient(ridge.inner, ridge.outer, {"w": ridge.optimum()}, lam,
                                      return_info=True)
    assert info.unused_outer == ("dropout",)
    assert hg["dropout"].shape == () and float(hg["dropout"]) == 0.0
    assert rel_err(hg["log_wd"], ridge.exact_hypergradient()) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_leaves_and_inputs_are_preserved(dtype):
    r = make_ridge(dtype=dtype)
    w = r.optimum().requires_grad_(True)
    lam = r.lam.clone().requires_grad_(True)
    w_before, lam_before = w.detach().clone(), lam.detach().clone()
    hg = implicit_hypergradient(r.inner, r.outer, {"w": w}, {"log_wd": lam})
    assert hg["log_wd"].dtype == dtype
    assert not hg["log_wd"].requires_grad and hg["log_wd"].grad_fn is None
    assert lam.is_leaf and lam.grad is None and w.is_leaf and w.grad is None
    assert torch.equal(w.detach(), w_before) and torch.equal(lam.detach(), lam_before)
    if dtype == torch.float32:  # float32 agrees with the float64 closed form to ~1e-4
        exact = make_ridge().exact_hypergradient()
        assert rel_err(hg["log_wd"].double(), exact) < 1e-3


def test_warm_start_with_the_previous_solution(ridge):
    _, cold = ridge_call(ridge, return_info=True, tol=1e-10)
    _, warm = ridge_call(ridge, return_info=True, tol=1e-10, init=cold.solution)
    assert warm.converged and warm.iterations <= 2 < cold.iterations


def test_non_convergence_returns_best_iterate_and_warns(ridge):
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        hg, info = ridge_call(ridge, max_iter=1, return_info=True)
    assert not info.converged and info.iterations == 1 and info.residual > 0
    assert torch.isfinite(hg["log_wd"]).all()


def test_non_finite_losses_and_parameters_raise(ridge):
    lam = {"log_wd": ridge.lam}
    w = {"w": ridge.optimum()}
    with pytest.raises(NonFiniteError, match="inner_loss"):
        implicit_hypergradient(lambda p, h: ridge.inner(p, h) * float("nan"), ridge.outer, w, lam)
    with pytest.raises(NonFiniteError, match="outer_loss"):
        implicit_hypergradient(ridge.inner, lambda p, h: torch.log(-(p["w"] ** 2).sum()), w, lam)
    with pytest.raises(NonFiniteError):
        implicit_hypergradient(ridge.inner, ridge.outer,
                               {"w": torch.full_like(w["w"], float("inf"))}, lam)
    with pytest.raises(NonFiniteError, match="gradient"):  # sqrt at 0: infinite gradient
        implicit_hypergradient(lambda p, h: p["w"].abs().sqrt().sum() + ridge.inner(p, h),
                               ridge.outer, {"w": torch.zeros_like(w["w"])}, lam)


def test_bad_inputs_raise_clear_errors(ridge):
    lam = {"log_wd": ridge.lam}
    w = {"w": ridge.optimum()}
    with pytest.raises(KeyMismatchError, match="init"):
        implicit_hypergradient(ridge.inner, ridge.outer, w, lam, init={"v": torch.zeros(6)})
    with pytest.raises(ShapeMismatchError, match="init"):
        implicit_hypergradient(ridge.inner, ridge.outer, w, lam, init={"w": torch.zeros(5)})
    with pytest.raises(ChronosTypeError, match="scalar"):
        implicit_hypergradient(lambda p, h: p["w"] ** 2, ridge.outer, w, lam)
    with pytest.raises(ChronosTypeError, match="dtype"):
        implicit_hypergradient(ridge.inner, ridge.outer, {"w": torch.zeros(6, dtype=torch.long)},
                               lam)
    with pytest.raises(ChronosTypeError):
        implicit_hypergradient(ridge.inner, ridge.outer, w, [ridge.lam])
    with pytest.raises(ConfigError, match="unknown linear solver"):
        implicit_hypergradient(ridge.inner, ridge.outer, w, lam, method="lu")
    with pytest.raises(ConfigError, match="damping"):
        implicit_hypergradient(ridge.inner, ridge.outer, w, lam, damping=-1.0)
    with pytest.raises(ConfigError, match="empty"):
        implicit_hypergradient(ridge.inner, ridge.outer, w, {})


def test_float_outer_params_are_accepted():
    inner = lambda p, h: 0.5 * ((p["w"] - h["c"]) ** 2).sum()  # noqa: E731  θ* = c
    outer = lambda p, h: (p["w"] ** 3).sum()  # noqa: E731       dF/dc = 3c²
    hg = implicit_hypergradient(inner, outer, {"w": torch.tensor(2.0)}, {"c": 2.0})
    assert float(hg["c"]) == pytest.approx(12.0)


def test_autotuned_products_give_the_same_result(monkeypatch):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 30, generator=g, dtype=f64)
    y = torch.randint(0, 4, (200,), generator=g)
    W0 = 0.01 * torch.randn(30, 4, generator=g, dtype=f64)

    def inner(p, h):
        ce = torch.nn.functional.cross_entropy(X @ p["W"] + p["b"], y)
        return ce + 0.5 * h["wd"] * ((p["W"] ** 2).sum() + (p["b"] ** 2).sum())

    def outer(p, h):
        return torch.nn.functional.cross_entropy(X[:50] @ p["W"] + p["b"], y[:50])

    args = (inner, outer, {"W": W0, "b": torch.zeros(4, dtype=f64)},
            {"wd": torch.tensor(0.1, dtype=f64)})
    plain = implicit_hypergradient(*args, tol=1e-12, autotune=False)
    tuners = []

    def always_swap():  # every product through the transposed path
        tuners.append(matmul.MatmulAutotuner(min_flops=0, margin=float("inf")))
        return tuners[-1]

    monkeypatch.setattr(implicit_module, "MatmulAutotuner", always_swap)
    swapped = implicit_hypergradient(*args, tol=1e-12, autotune=True)
    assert tuners and tuners[0].swapped > 10
    assert rel_err(swapped["wd"], plain["wd"]) < 1e-10


@settings(max_examples=15)
@given(d=st.integers(1, 5), seed=st.integers(0, 1000), shift=st.floats(-2.0, 1.0))
def test_ridge_closed_form_property(d, seed, shift):
    r = make_ridge(d=d, seed=seed)
    r.lam = r.lam + shift
    hg = ridge_call(r, tol=1e-13, max_iter=200)
    exact = r.exact_hypergradient()
    err = float((hg["log_wd"] - exact).norm())
    assert err <= 1e-6 * float(exact.norm()) + 1e-12


def test_hypergradient_descends_the_validation_loss(ridge):
    lam = ridge.lam.clone()
    start = float(ridge.outer({"w": ridge.optimum(lam)}, {}))
    for _ in range(20):
        hg = implicit_hypergradient(ridge.inner, ridge.outer, {"w": ridge.optimum(lam)},
                                    {"log_wd": lam})
        lam = lam - 2.0 * hg["log_wd"]
    end = float(ridge.outer({"w": ridge.optimum(lam)}, {}))
    assert end < start and math.isfinite(end)
