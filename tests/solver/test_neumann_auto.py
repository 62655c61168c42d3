"""Neumann / fixed point with alpha="auto": power-iteration step, caching, divergence reports."""

import math
import warnings

import pytest
import torch
from solver_problems import Ridge, rel_err

from chronos.core import InnerProblem, Trajectory
from chronos.core.errors import ConfigError, ConvergenceWarning
from chronos.solver import (
    ImplicitDifferentiation,
    fixed_point,
    implicit_hypergradient,
    make_solver,
    neumann,
)
from chronos.solver.spectral import DEFAULT_POWER_ITERS, lambda_max, power_iteration, safe_step

f64 = torch.float64
LAM_MAX = 2.7  # the ridge Hessian's top eigenvalue: above 2/alpha for the old default alpha=1


def ridge_with_spectrum(eigs, n=60, m=40, seed=0, dtype=f64) -> Ridge:
    """Ridge whose Hessian ``XᵀX/n + diag(exp λ)`` has exactly the eigenvalues ``eigs``.

    ``λ_j = log 0.1`` for every feature and ``X = √n U diag(√(eigs − 0.1)) Vᵀ``.
    """
    g = torch.Generator().manual_seed(seed)
    eigs = torch.as_tensor(eigs, dtype=f64)
    d = len(eigs)
    u, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=f64))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=f64))
    X = math.sqrt(n) * u @ torch.diag((eigs - 0.1).sqrt()) @ v.T
    w_true = torch.randn(d, generator=g, dtype=f64)
    y = X @ w_true + 0.5 * torch.randn(n, generator=g, dtype=f64)
    Xv = torch.randn(m, d, generator=g, dtype=f64)
    yv = Xv @ w_true + 0.5 * torch.randn(m, generator=g, dtype=f64)
    lam = torch.full((d,), math.log(0.1), dtype=f64)
    return Ridge(X.to(dtype), y.to(dtype), Xv.to(dtype), yv.to(dtype), lam.to(dtype))


@pytest.fixture
def ridge27() -> Ridge:
    return ridge_with_spectrum(torch.linspace(0.4, LAM_MAX, 8))


def system(r: Ridge):
    """``(matvec counting its calls, b, exact x)`` for ``H x = b`` with ``b = X_vᵀ y_v``."""
    h = r.hessian()
    calls = [0]

    def mv(v):
        calls[0] += 1
        return {"w": h @ v["w"]}

    b = {"w": r.Xv.T @ r.yv / len(r.yv)}
    exact = torch.linalg.solve(h.to(f64), b["w"].to(f64))
    return mv, b, exact, calls


def test_the_fixture_has_the_advertised_spectrum(ridge27):
    assert float(torch.linalg.eigvalsh(ridge27.hessian()).max()) == pytest.approx(LAM_MAX)


# -- power iteration --------------------------------------------------------------------------


def test_power_iteration_is_close_to_eigvalsh_and_never_above(ridge27):
    h = ridge27.hessian()
    true = float(torch.linalg.eigvalsh(h).max())
    est = power_iteration(lambda v: h @ v, torch.zeros(8, dtype=f64))
    assert est.matvecs <= DEFAULT_POWER_ITERS
    assert 0.97 * true <= est.value <= true * (1 + 1e-12)
    # deterministic: same operator, same estimate
    assert power_iteration(lambda v: h @ v, torch.zeros(8, dtype=f64)).value == est.value


def test_power_iteration_on_a_larger_spread_spectrum_is_within_the_safety_margin():
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=f64))
    eigs = torch.logspace(-3, 0, 300, dtype=f64) * 5.0  # no gap to speak of at the top
    a = q @ torch.diag(eigs) @ q.T
    est = power_iteration(lambda v: a @ v, torch.zeros(300, dtype=f64))
    assert 0.5 * 5.0 < est.value <= 5.0 * (1 + 1e-12)  # α = 1/λ̂ < 2/λ_max
    assert safe_step(est.value) * 5.0 < 2.0


def test_lambda_max_on_tensor_dicts():
    est = lambda_max(lambda v: {"a": 2 * v["a"], "b": 7 * v["b"]},
                     {"a": torch.zeros(3, dtype=f64), "b": torch.zeros(2, 2, dtype=f64)})
    assert est.value == pytest.approx(7.0, rel=1e-3)


def test_power_iteration_validates_and_handles_the_zero_operator():
    with pytest.raises(ConfigError):
        power_iteration(lambda v: v, torch.zeros(3), max_iter=0)
    est = power_iteration(lambda v: 0 * v, torch.zeros(3))
    assert est.value == 0.0 and est.matvecs == 1 and safe_step(est.value) == 1.0


# -- linear solvers ---------------------------------------------------------------------------


def test_default_neumann_converges_on_a_ridge_with_lambda_max_above_two(ridge27):
    mv, b, exact, calls = system(ridge27)
    x, info = neumann(max_iter=500)(mv, b)
    assert info.converged and info.status == "converged"
    assert rel_err(x["w"], exact) <= 1e-6
    assert info.alpha is not None and 1 / LAM_MAX <= info.alpha < 2 / LAM_MAX
    assert info.iterations == calls[0]  # power-iteration matvecs are counted


def test_default_neumann_converges_in_float32():
    r = ridge_with_spectrum(torch.linspace(0.4, LAM_MAX, 8), dtype=torch.float32)
    mv, b, exact, _ = system(r)
    x, info = neumann(max_iter=500, tol=1e-6)(mv, b)
    assert info.converged and x["w"].dtype == torch.float32
    assert rel_err(x["w"].to(f64), exact) <= 1e-5


def test_alpha_one_diverges_and_says_so(ridge27):
    mv, b, _, _ = system(ridge27)
    with pytest.warns(ConvergenceWarning) as caught:
        x, info = neumann(alpha=1.0, max_iter=500)(mv, b)
    assert info.status == "diverged" and not info.converged and info.alpha == 1.0
    assert info.iterations < 50  # stopped early, not run to max_iter
    assert torch.isfinite(x["w"]).all() and info.residual <= info.initial_residual
    (w,) = [str(c.message) for c in caught]
    assert "alpha=1 exceeds 2/λ_max" in w and "alpha='auto'" in w
    assert "max_iter" not in w.lower().replace("iteration", "")
    # the reported bound is a true lower bound on λ_max, and close to it
    lower = float(w.split("λ_max >= ")[1].split(",")[0])
    assert 0.9 * LAM_MAX <= lower <= LAM_MAX * (1 + 1e-9)


def test_slow_but_converging_keeps_the_max_iter_advice(ridge27):
    mv, b, _, _ = system(ridge27)
    with pytest.warns(ConvergenceWarning, match="Raise max_iter"):
        _, info = neumann(max_iter=5)(mv, b)
    assert info.status == "max_iter"


def test_the_estimated_step_is_cached_and_reused(ridge27):
    mv, b, _, calls = system(ridge27)
    solve = neumann(max_iter=500)
    _, first = solve(mv, b)
    n_first = calls[0]
    calls[0] = 0
    _, second = solve(mv, b)
    assert second.alpha == first.alpha
    assert second.iterations == calls[0]
    spent = n_first - calls[0]  # the power iteration, only on the first solve
    assert 1 <= spent <= DEFAULT_POWER_ITERS


def test_a_cached_step_that_diverges_is_re_estimated():
    small = ridge_with_spectrum(torch.linspace(0.2, 0.5, 8))  # caches alpha = 2
    big = ridge_with_spectrum(torch.linspace(0.4, LAM_MAX, 8))  # same size, λ_max 2.7
    solve = neumann(max_iter=500)
    mv, b, _, _ = system(small)
    _, info = solve(mv, b)
    assert info.alpha == pytest.approx(1 / 0.5, rel=0.05)
    mv, b, exact, calls = system(big)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        x, info = solve(mv, b)
    assert info.converged and rel_err(x["w"], exact) <= 1e-6
    assert info.alpha < 2 / LAM_MAX and info.iterations == calls[0]


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_fixed_point_auto_converges(ridge27, momentum):
    mv, b, exact, _ = system(ridge27)
    x, info = fixed_point(max_iter=500, momentum=momentum)(mv, b)
    assert info.converged and rel_err(x["w"], exact) <= 1e-6
    assert info.alpha is not None and info.alpha * LAM_MAX < 2


def test_fixed_point_with_a_too_large_alpha_diverges(ridge27):
    mv, b, _, _ = system(ridge27)
    with pytest.warns(ConvergenceWarning, match=r"exceeds 2\(1\+momentum\)/λ_max"):
        _, info = fixed_point(alpha=1.5, momentum=0.3, max_iter=500)(mv, b)
    assert info.status == "diverged"


def test_damping_is_part_of_the_estimated_operator(ridge27):
    mv, b, _, _ = system(ridge27)
    _, info = neumann(max_iter=500, damping=1.0)(mv, b)
    # α = 1/λ̂ with λ̂ <= λ_max(H + I) = 3.7 and within 10% of it (not 1/2.7: undamped)
    assert info.converged and 1.0 <= info.alpha * (LAM_MAX + 1.0) < 1.1


def test_zero_rhs_spends_nothing_on_estimation():
    _, info = neumann()(lambda v: {"x": 3 * v["x"]}, {"x": torch.zeros(4)})
    assert info.iterations == 0 and info.alpha is None and info.converged


@pytest.mark.parametrize("alpha", ["fast", "AUTO", 0.0, -1.0, math.nan, math.inf, True, None])
def test_bad_alpha_is_refused(alpha):
    with pytest.raises(ConfigError, match="alpha"):
        neumann(alpha=alpha)
    with pytest.raises(ConfigError, match="alpha"):
        fixed_point(alpha=alpha)


def test_explicit_alpha_still_works_through_make_solver():
    x, info = make_solver("neumann", alpha=0.1, max_iter=5, warn=False)(
        lambda v: v, {"x": torch.ones(2, dtype=f64)})
    assert info.alpha == 0.1 and info.iterations == 5
    assert x["x"].tolist() == pytest.approx([1 - 0.9**5] * 2)


# -- hypergradients ---------------------------------------------------------------------------


def call(r: Ridge, **kw):
    return implicit_hypergradient(r.inner, r.outer, {"w": r.optimum()}, {"log_wd": r.lam}, **kw)


@pytest.mark.parametrize("method", ["neumann", "fixed_point"])
def test_implicit_hypergradient_default_alpha_matches_cg(ridge27, method):
    ref = call(ridge27, method="cg")
    assert rel_err(ref["log_wd"], ridge27.exact_hypergradient()) <= 1e-8
    hg, info = call(ridge27, method=method, max_iter=500, return_info=True)
    assert info.converged and rel_err(hg["log_wd"], ref["log_wd"]) <= 1e-6


def test_implicit_hypergradient_diverging_alpha_gives_the_right_advice(ridge27):
    with pytest.warns(ConvergenceWarning) as caught:
        _, info = call(ridge27, method="neumann", alpha=1.0, max_iter=500, return_info=True)
    assert info.solve.status == "diverged"
    (w,) = [str(c.message) for c in caught]
    assert "alpha=1 exceeds 2/λ_max" in w and "raise max_iter" not in w


def test_implicit_differentiation_estimates_once_across_outer_steps(ridge27):
    r = ridge27
    prob = InnerProblem.from_functions(
        inner_loss=r.inner, outer_loss=r.outer, init_params={"w": torch.zeros(8, dtype=f64)})
    opt = ImplicitDifferentiation({"log_wd": r.lam}, lr=0.1, method="neumann", max_iter=500)
    seen = []
    for _ in range(3):
        lam = {k: v.detach().clone() for k, v in opt.outer_params.items()}
        theta = {"w": r.optimum(lam["log_wd"])}
        traj = Trajectory(final_params=theta, outer_params=lam)
        h = opt.compute_hypergradient([traj], prob)
        info = opt.last_info[0]
        ref = implicit_hypergradient(r.inner, r.outer, theta, lam, method="cg")
        assert info.converged and rel_err(h["log_wd"], ref["log_wd"]) <= 1e-6
        seen.append(info.solve)
        opt.step(h)
    assert seen[0].alpha == seen[1].alpha == seen[2].alpha  # one estimate, reused
    # what the first step spent on power iteration, the later ones did not
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        _, fresh = call(r, method="neumann", max_iter=500, return_info=True)
        _, fixed = call(r, method="neumann", max_iter=500, alpha=seen[0].alpha,
                        return_info=True)
    assert 1 <= fresh.iterations - fixed.iterations <= DEFAULT_POWER_ITERS
