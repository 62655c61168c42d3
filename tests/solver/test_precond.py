"""K-FAC preconditioner and preconditioned CG: same answers, fewer iterations, clear errors."""

import warnings

import pytest
import torch
from solver_problems import make_logistic, make_ridge, rel_err

from chronos.core.errors import ConfigError, ConvergenceWarning, ShapeMismatchError
from chronos.solver import KFACPreconditioner, cg, direct, implicit_hypergradient
from chronos.solver.hvp import linearize_inner

f64 = torch.float64


def spd(n, cond, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=f64))
    return (q * torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=f64)) @ q.T


def test_preconditioned_cg_matches_plain_cg_and_dense_solve():
    a = spd(20, 1e4)
    b = {"x": torch.linspace(-1, 1, 20, dtype=f64)}
    mv = lambda v: {"x": a @ v["x"]}  # noqa: E731
    approx_inv = torch.linalg.inv(a + 0.3 * torch.diag(torch.diagonal(a)))  # a rough M
    pc = lambda r: {"x": approx_inv @ r["x"]}  # noqa: E731
    x0, plain = cg(max_iter=200, tol=1e-12)(mv, b)
    x1, pre = cg(max_iter=200, tol=1e-12, preconditioner=pc)(mv, b)
    exact = torch.linalg.solve(a, b["x"])
    assert plain.converged and pre.converged
    assert rel_err(x0["x"], exact) < 1e-8 and rel_err(x1["x"], exact) < 1e-8
    assert pre.iterations < plain.iterations
    # convergence is judged on the true residual ‖b − Ax‖
    assert float((b["x"] - a @ x1["x"]).norm()) <= 1e-11 * float(b["x"].norm())


@pytest.mark.parametrize("check_every", [1, 3, 7])
def test_check_every_gives_the_same_solution(check_every):
    a = spd(15, 100.0)
    b = {"x": torch.ones(15, dtype=f64)}
    x, info = cg(max_iter=100, tol=1e-10, check_every=check_every)(
        lambda v: {"x": a @ v["x"]}, b)
    assert info.converged and info.iterations % check_every == 0
    assert rel_err(x["x"], torch.linalg.solve(a, b["x"])) < 1e-8


def test_indefinite_preconditioner_is_refused():
    a = spd(5, 10.0)
    with pytest.raises(ConfigError, match="not positive definite"):
        cg(preconditioner=lambda r: {"x": -r["x"]})(lambda v: {"x": a @ v["x"]},
                                                     {"x": torch.ones(5, dtype=f64)})
    with pytest.raises(ConfigError, match="callable"):
        cg(preconditioner=3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="check_every"):
        cg(check_every=0)


def _squared_problem(c, n=60, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=f64)
    w = torch.rand(n, generator=g, dtype=f64)
    y = torch.randn(n, c, generator=g, dtype=f64)

    def inner(p, h):
        z = x @ p["W"] + p["b"]
        return (w * 0.5 * ((z - y) ** 2).sum(1)).mean() + 0.5 * 0.05 * (
            (p["W"] ** 2).sum() + (p["b"] ** 2).sum())

    params = {"W": torch.zeros(d, c, dtype=f64), "b": torch.zeros(c, dtype=f64)}
    return x, w, inner, params


@pytest.mark.parametrize("c", [1, 3])
def test_kfac_is_exact_for_squared_loss(c):
    """Squared error: every output Hessian is I, so H = A ⊗ I + ρI exactly: one CG step."""
    x, w, inner, params = _squared_problem(c)
    lin = linearize_inner(inner, params, {"s": torch.zeros(1, dtype=f64)})
    pc = KFACPreconditioner.linear(x, params, loss="squared", sample_weights=w, reg=0.05)
    rhs = {"W": torch.randn(5, c, dtype=f64), "b": torch.randn(c, dtype=f64)}
    sol, info = cg(tol=1e-12, preconditioner=pc)(lin.hvp, rhs)
    assert info.converged and info.iterations <= 2
    ref, _ = direct()(lin.hvp, rhs)
    assert rel_err(sol["W"], ref["W"]) < 1e-9 and rel_err(sol["b"], ref["b"]) < 1e-9
    # and the preconditioner itself is the exact inverse
    assert rel_err(pc(lin.hvp(rhs))["W"], rhs["W"]) < 1e-10


def test_kfac_is_exact_for_one_logistic_output_and_nn_linear_layout():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(80, 4, generator=g, dtype=f64)
    y = (torch.rand(80, generator=g, dtype=f64) < 0.5).to(f64)
    params = {"weight": 0.3 * torch.randn(1, 4, generator=g, dtype=f64),
              "bias": torch.tensor([0.1], dtype=f64)}

    def inner(p, h):
        z = (x @ p["weight"].T + p["bias"])[:, 0]
        bce = torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="sum")
        return bce + 0.5 * 0.2 * (p["weight"] ** 2).sum() + 0.5 * 0.1 * (p["bias"] ** 2).sum()

    lin = linearize_inner(inner, params, {"s": torch.zeros(1, dtype=f64)})
    pc = KFACPreconditioner.linear(x, params, loss="logistic", reg=0.2, bias_reg=0.1,
                                   weight="weight", bias="bias", transposed=True,
                                   reduction="sum")
    rhs = {"weight": torch.randn(1, 4, dtype=f64), "bias": torch.randn(1, dtype=f64)}
    _, info = cg(tol=1e-12, preconditioner=pc)(lin.hvp, rhs)
    assert info.converged and info.iterations <= 2


def test_kfac_hypergradient_matches_closed_form_on_ridge():
    """Ridge with per-feature decay is a one-output squared problem: K-FAC is exact."""
    r = make_ridge()
    n = len(r.y)
    w = r.optimum()
    # f = ½‖Xw − y‖²/n + ½ Σ exp(λ_j) w_j²: squared loss, no bias, per-feature ridge
    pc = KFACPreconditioner.linear(r.X, {"w": w[:, None]}, loss="squared",
                                   reg=r.lam.exp(), weight="w", bias=None)

    def as_column(fn):
        return lambda v: {"w": fn({"w": v["w"][:, None]})["w"][:, 0]}

    hg, info = implicit_hypergradient(r.inner, r.outer, {"w": w}, {"log_wd": r.lam},
                                      preconditioner=as_column(pc), return_info=True)
    assert rel_err(hg["log_wd"], r.exact_hypergradient()) < 1e-8
    assert info.iterations <= 2 and n == 40


def test_kfac_hypergradient_matches_plain_cg_and_direct_on_logistic():
    lg = make_logistic()
    lam = lg.outer_params()
    theta = lg.solve(lam)
    reg = lam["log_wd"].exp()
    pc = KFACPreconditioner.linear_softmax(lg.X, theta, sample_weights=torch.sigmoid(lam["s"]),
                                           reg=reg, bias_reg=0.01)
    args = (lg.inner, lg.outer, theta, lam)
    h_pc, i_pc = implicit_hypergradient(*args, tol=1e-12, preconditioner=pc, return_info=True)
    h_cg, i_cg = implicit_hypergradient(*args, tol=1e-12, return_info=True)
    h_d = implicit_hypergradient(*args, method="direct")
    for k in lam:
        assert rel_err(h_pc[k], h_d[k]) < 1e-8 and rel_err(h_cg[k], h_d[k]) < 1e-8
    assert i_pc.iterations <= i_cg.iterations


def test_kfac_cuts_iterations_on_digits_softmax():
    datasets = pytest.importorskip("sklearn.datasets")
    xs, ys = datasets.load_digits(return_X_y=True)
    x = torch.tensor(xs[:400] / 16.0, dtype=torch.float32)
    y = torch.tensor(ys[:400])
    s = torch.randn(400, generator=torch.Generator().manual_seed(0))
    reg = 1e-3

    def inner(p, h):
        ce = torch.nn.functional.cross_entropy(x @ p["W"] + p["b"], y, reduction="none")
        return (torch.sigmoid(h["s"]) * ce).mean() + 0.5 * reg * (
            (p["W"] ** 2).sum() + (p["b"] ** 2).sum())

    params = {"W": torch.zeros(64, 10, requires_grad=True),
              "b": torch.zeros(10, requires_grad=True)}
    opt = torch.optim.LBFGS(list(params.values()), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = inner(params, {"s": s})
        loss.backward()
        return loss

    opt.step(closure)
    theta = {k: v.detach() for k, v in params.items()}
    outer = lambda p, h: torch.nn.functional.cross_entropy(x[:100] @ p["W"] + p["b"], y[:100])  # noqa: E731
    pc = KFACPreconditioner.linear_softmax(x, theta, sample_weights=torch.sigmoid(s), reg=reg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        h0, plain = implicit_hypergradient(inner, outer, theta, {"s": s}, tol=1e-5,
                                           max_iter=500, return_info=True)
        h1, pre = implicit_hypergradient(inner, outer, theta, {"s": s}, tol=1e-5, max_iter=500,
                                         preconditioner=pc, return_info=True)
    assert plain.converged and pre.converged
    assert pre.iterations <= 0.7 * plain.iterations, (pre.iterations, plain.iterations)
    assert rel_err(h1["s"], h0["s"]) < 1e-3
    # stale factors are still a valid preconditioner; update() refreshes them
    pc.update(theta, sample_weights=torch.sigmoid(s + 1.0))
    _, again = implicit_hypergradient(inner, outer, theta, {"s": s}, tol=1e-5, max_iter=500,
                                      preconditioner=pc, return_info=True)
    assert again.converged and pc.updates == 2


def test_bad_inputs_give_clear_errors():
    x = torch.randn(10, 3)
    params = {"W": torch.zeros(3, 2), "b": torch.zeros(2)}
    with pytest.raises(ConfigError, match="damping"):
        KFACPreconditioner.linear_softmax(x, params)  # no ridge, no damping: singular
    with pytest.raises(ConfigError, match="loss must be one of"):
        KFACPreconditioner.linear(x, params, loss="hinge", reg=0.1)
    with pytest.raises(ConfigError, match="2-d"):
        KFACPreconditioner.linear(torch.randn(10), params, reg=0.1)
    with pytest.raises(ShapeMismatchError, match="d = 3"):
        KFACPreconditioner.linear(x, {"W": torch.zeros(4, 2), "b": torch.zeros(2)}, reg=0.1)
    with pytest.raises(ConfigError, match="exactly"):
        KFACPreconditioner.linear(x, {"W": torch.zeros(3, 2)}, reg=0.1)
    with pytest.raises(ShapeMismatchError, match="sample_weights"):
        KFACPreconditioner.linear(x, params, reg=0.1, sample_weights=torch.ones(9))
    with pytest.raises(ConfigError, match=">= 0"):
        KFACPreconditioner.linear(x, params, reg=0.1, sample_weights=-torch.ones(10))
    with pytest.raises(ShapeMismatchError, match="per input feature"):
        KFACPreconditioner.linear(x, params, reg=torch.ones(5))
    with pytest.raises(ConfigError, match="one output"):
        KFACPreconditioner.linear(x, params, loss="logistic", reg=0.1)
    pc = KFACPreconditioner.linear(x, params, reg=0.1)
    with pytest.raises(ConfigError, match="method='cg'"):
        implicit_hypergradient(lambda p, h: (p["W"] ** 2).sum() + (p["b"] ** 2).sum(),
                               lambda p, h: p["W"].sum(), params, {"c": 1.0},
                               method="direct", preconditioner=pc)


def test_autotune_is_off_by_default(monkeypatch):
    from chronos.solver import implicit as implicit_module

    made = []
    monkeypatch.setattr(implicit_module, "MatmulAutotuner", lambda: made.append(1))
    r = make_ridge()
    implicit_hypergradient(r.inner, r.outer, {"w": r.optimum()}, {"log_wd": r.lam})
    assert made == []
