"""Linear solvers over tensor dicts: accuracy, convergence, warm starts, bad input."""

import itertools
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from chronos.core.errors import (
    ConfigError,
    ConvergenceWarning,
    KeyMismatchError,
    NonFiniteError,
    ShapeMismatchError,
)
from chronos.solver import cg, direct, fixed_point, make_solver, neumann

f64 = torch.float64


def spd(n, cond=10.0, seed=0, dtype=f64):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=f64))
    eig = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=f64)
    return ((q * eig) @ q.T).to(dtype)


def dict_system(a, shapes=((3,), (2, 2))):
    """Split a matrix operator over a dict with keys 'a', 'b' of the given shapes."""
    sizes = [torch.Size(s).numel() for s in shapes]

    def to_vec(d):
        return torch.cat([d["a"].reshape(-1), d["b"].reshape(-1)])

    def to_dict(v):
        return {"a": v[: sizes[0]].reshape(shapes[0]), "b": v[sizes[0] :].reshape(shapes[1])}

    def matvec(d):
        return to_dict(a @ to_vec(d))

    return matvec, to_vec, to_dict


@pytest.mark.parametrize("factory", [
    lambda: cg(max_iter=50, tol=1e-12),
    lambda: direct(),
    lambda: neumann(alpha=0.09, max_iter=2000, tol=1e-12),
    lambda: fixed_point(alpha=0.09, max_iter=2000, tol=1e-12),
    lambda: fixed_point(alpha=0.12, momentum=0.5, max_iter=2000, tol=1e-12),
])
def test_solvers_match_dense_solve_over_dicts(factory):
    a = spd(7, cond=10.0)
    matvec, to_vec, to_dict = dict_system(a)
    b = to_dict(torch.arange(1.0, 8.0, dtype=f64))
    x, info = factory()(matvec, b)
    assert set(x) == {"a", "b"} and x["b"].shape == (2, 2)
    exact = torch.linalg.solve(a, to_vec(b))
    assert torch.allclose(to_vec(x), exact, rtol=1e-9, atol=1e-10)
    assert info.converged and info.status == "converged"
    assert info.residual <= 1e-9 * info.b_norm + 1e-12
    assert info.iterations >= 1


def test_cg_solves_in_at_most_n_iterations_and_reports_them():
    a = spd(6, cond=100.0)
    b = {"x": torch.ones(6, dtype=f64)}
    x, info = cg(max_iter=100, tol=1e-10)(lambda v: {"x": a @ v["x"]}, b)
    assert info.iterations <= 7  # n plus rounding slack
    assert torch.allclose(a @ x["x"], b["x"], atol=1e-8)
    assert info.relative_residual <= 1e-10


def test_damping_solves_the_shifted_system():
    a = spd(5, cond=5.0)
    b = {"x": torch.ones(5, dtype=f64)}
    for solver in (cg(damping=0.7, tol=1e-12), direct(damping=0.7),
                   neumann(alpha=0.1, damping=0.7, max_iter=3000, tol=1e-12)):
        x, info = solver(lambda v: {"x": a @ v["x"]}, b)
        exact = torch.linalg.solve(a + 0.7 * torch.eye(5, dtype=f64), b["x"])
        assert torch.allclose(x["x"], exact, atol=1e-9), info


def test_fixed_point_without_momentum_equals_neumann_partial_sums():
    a = spd(5, cond=20.0)
    b = {"x": torch.linspace(-1, 1, 5, dtype=f64)}
    mv = lambda v: {"x": a @ v["x"]}  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        xn, infon = neumann(alpha=0.04, max_iter=15, tol=0.0)(mv, b)
        xf, infof = fixed_point(alpha=0.04, max_iter=15, tol=0.0)(mv, b)
    # explicit series α Σ_{k<15} (I − αA)^k b
    t = torch.eye(5, dtype=f64) - 0.04 * a
    series = 0.04 * sum(torch.linalg.matrix_power(t, k) for k in range(15)) @ b["x"]
    assert torch.allclose(xn["x"], series, atol=1e-12)
    assert torch.allclose(xf["x"], series, atol=1e-12)
    assert infon.iterations == infof.iterations == 15


def test_neumann_error_decreases_with_iterations():
    a = spd(8, cond=30.0)
    b = {"x": torch.ones(8, dtype=f64)}
    exact = torch.linalg.solve(a, b["x"])
    errors = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for k in (2, 8, 32, 128, 512):
            x, _ = neumann(alpha=1.0 / 30.0, max_iter=k, tol=0.0)(lambda v: {"x": a @ v["x"]}, b)
            errors.append(float((x["x"] - exact).norm()))
    assert all(e2 < e1 for e1, e2 in itertools.pairwise(errors)), errors
    assert errors[-1] < 1e-3 * errors[0]


def test_momentum_speeds_up_fixed_point():
    a = spd(10, cond=100.0)
    b = {"x": torch.ones(10, dtype=f64)}
    mv = lambda v: {"x": a @ v["x"]}  # noqa: E731
    _, plain = fixed_point(alpha=1 / 100, max_iter=20000, tol=1e-8)(mv, b)
    # heavy ball with the classical tuning for eigenvalues in [1, 100]
    _, heavy = fixed_point(alpha=4 / (1 + 10) ** 2, momentum=((10 - 1) / (10 + 1)) ** 2,
                           max_iter=20000, tol=1e-8)(mv, b)
    assert plain.converged and heavy.converged
    assert heavy.iterations < plain.iterations / 3


def test_warm_start_from_the_solution_needs_no_iterations():
    a = spd(6)
    b = {"x": torch.ones(6, dtype=f64)}
    mv = lambda v: {"x": a @ v["x"]}  # noqa: E731
    x, cold = cg(tol=1e-12)(mv, b)
    x2, warm = cg(tol=1e-8)(mv, b, init=x)
    assert warm.converged and warm.iterations == 1  # one matvec for the initial residual
    assert cold.iterations > warm.iterations
    assert torch.allclose(x2["x"], x["x"])


def test_not_converged_returns_best_iterate_and_warns_once():
    a = spd(30, cond=1e4)
    b = {"x": torch.ones(30, dtype=f64)}
    mv = lambda v: {"x": a @ v["x"]}  # noqa: E731
    solver = cg(max_iter=3, tol=1e-12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            x, info = solver(mv, b)
    conv = [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert len(conv) == 1 and "max_iter=3" in str(conv[0].message)
    assert not info.converged and info.status == "max_iter" and info.iterations == 3
    true_residual = float((b["x"] - a @ x["x"]).norm())
    assert true_residual == pytest.approx(info.residual, rel=1e-6)
    # CG's best iterate has the smallest A-norm error: better than the zero start
    exact = torch.linalg.solve(a, b["x"])
    a_norm = lambda e: float(e @ a @ e)  # noqa: E731
    assert a_norm(x["x"] - exact) < a_norm(exact)


def test_diverging_richardson_returns_the_smallest_residual_iterate():
    a = torch.diag(torch.tensor([1.0, 3.0], dtype=f64))  # alpha=0.7 > 2/3: diverges
    b = {"x": torch.ones(2, dtype=f64)}
    with pytest.warns(ConvergenceWarning):
        x, info = neumann(alpha=0.7, max_iter=10)(lambda v: {"x": a @ v["x"]}, b)
    # residuals (0.3^k, (-1.1)^k): smallest at k = 1, i.e. x_1 = alpha * b
    assert torch.allclose(x["x"], 0.7 * b["x"])
    assert info.residual == pytest.approx((0.3**2 + 1.1**2) ** 0.5)
    assert info.iterations == 10 and not info.converged


def test_cg_reports_breakdown_on_an_indefinite_matrix():
    a = torch.diag(torch.tensor([1.0, -1.0], dtype=f64))
    with pytest.warns(ConvergenceWarning, match="not positive definite"):
        x, info = cg()(lambda v: {"x": a @ v["x"]}, {"x": torch.ones(2, dtype=f64)})
    assert info.status == "breakdown" and not info.converged
    assert torch.isfinite(x["x"]).all()


def test_direct_falls_back_to_least_squares_when_singular():
    a = torch.diag(torch.tensor([2.0, 0.0], dtype=f64))
    with pytest.warns(ConvergenceWarning):
        x, info = direct()(lambda v: {"x": a @ v["x"]}, {"x": torch.ones(2, dtype=f64)})
    assert info.status == "singular"
    assert torch.allclose(x["x"], torch.tensor([0.5, 0.0], dtype=f64))


def test_direct_refuses_huge_systems():
    with pytest.raises(ConfigError, match="max_size"):
        direct(max_size=4)(lambda v: v, {"x": torch.ones(5)})


def test_non_finite_matvec_raises():
    with pytest.raises(NonFiniteError, match="NaN/Inf"):
        cg()(lambda v: {"x": v["x"] * float("nan")}, {"x": torch.ones(3)})
    with pytest.raises(NonFiniteError, match="NaN/Inf"):
        neumann(alpha=0.1)(lambda v: {"x": v["x"] * float("nan")}, {"x": torch.ones(3)})
    # a diverging step is stopped and reported as such long before it overflows
    with pytest.warns(ConvergenceWarning, match="exceeds 2/λ_max"):
        x, info = neumann(alpha=10.0, max_iter=2000)(lambda v: {"x": 5.0 * v["x"]},
                                                      {"x": torch.ones(3)})
    assert info.status == "diverged" and info.iterations == 2 and torch.isfinite(x["x"]).all()


def test_structure_mismatches_raise_clear_errors():
    b = {"x": torch.ones(3)}
    with pytest.raises(KeyMismatchError, match="only in"):
        cg()(lambda v: {"y": v["x"]}, b)
    with pytest.raises(ShapeMismatchError, match="shape"):
        cg()(lambda v: {"x": torch.ones(4)}, b)
    with pytest.raises(ShapeMismatchError):
        cg()(lambda v: v, b, init={"x": torch.ones(2)})
    with pytest.raises(KeyMismatchError):
        cg()(lambda v: v, b, init={"z": torch.ones(3)})
    with pytest.raises(NonFiniteError, match="init"):
        cg()(lambda v: v, b, init={"x": torch.full((3,), float("inf"))})
    with pytest.raises(ConfigError, match="empty"):
        cg()(lambda v: v, {})


@pytest.mark.parametrize("call", [
    lambda: cg(max_iter=0),
    lambda: cg(tol=-1.0),
    lambda: cg(damping=-0.1),
    lambda: neumann(alpha=0.0),
    lambda: fixed_point(momentum=1.0),
    lambda: direct(max_size=0),
    lambda: make_solver("gmres"),
    lambda: make_solver("cg", alpha=0.1),
    lambda: make_solver(cg(), tol=1e-3),
])
def test_bad_configuration_is_refused(call):
    with pytest.raises(ConfigError):
        call()


def test_zero_right_hand_side_gives_zero_without_iterations():
    for solver in (cg(), neumann(), fixed_point(), direct()):
        x, info = solver(lambda v: {"x": 3 * v["x"]}, {"x": torch.zeros(4)})
        assert x["x"].tolist() == [0.0] * 4 and info.converged
    assert info.status == "converged"


def test_dtype_is_preserved():
    for dtype in (torch.float32, f64):
        x, _ = cg()(lambda v: {"x": 2 * v["x"]}, {"x": torch.ones(3, dtype=dtype)})
        assert x["x"].dtype == dtype


@given(
    n=st.integers(1, 12),
    log_cond=st.floats(0.0, 3.0),
    seed=st.integers(0, 10_000),
)
def test_cg_matches_dense_solve_on_random_spd(n, log_cond, seed):
    a = spd(n, cond=10.0**log_cond, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    b = torch.randn(n, generator=g, dtype=f64)
    x, info = cg(max_iter=10 * n + 10, tol=1e-12)(lambda v: {"x": a @ v["x"]}, {"x": b})
    assert info.converged
    exact = torch.linalg.solve(a, b)
    assert float((x["x"] - exact).norm()) <= 1e-7 * max(1.0, float(exact.norm()))


@given(n=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_richardson_error_is_monotone_for_small_steps(n, seed):
    a = spd(n, cond=20.0, seed=seed)
    b = {"x": torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=f64)}
    exact = torch.linalg.solve(a, b["x"])
    errors = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for k in (1, 4, 16, 64):
            x, _ = fixed_point(alpha=1 / 20, max_iter=k, tol=0.0)(lambda v: {"x": a @ v["x"]}, b)
            errors.append(float((x["x"] - exact).norm()))
    assert all(e2 <= e1 + 1e-12 for e1, e2 in itertools.pairwise(errors))
