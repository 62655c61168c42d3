"""Seed API: ImplicitDifferentiation / UnrolledDifferentiation on top of InnerProblem."""

import math

import pytest
import torch
from solver_problems import make_ridge, rel_err

from chronos.core import InnerProblem, Trajectory
from chronos.core.errors import (
    ChronosTypeError,
    ConfigError,
    KeyMismatchError,
    NonFiniteError,
    ShapeMismatchError,
)
from chronos.solver import (
    ImplicitDifferentiation,
    UnrolledDifferentiation,
    implicit_hypergradient,
    unrolled_hypergradient,
)

f64 = torch.float64


def ridge_problem(dtype=torch.float32, key="log_wd"):
    r = make_ridge(dtype=dtype)
    d = r.X.shape[1]
    prob = InnerProblem.from_functions(
        inner_loss=lambda p, h: 0.5 * ((r.X @ p["w"] - r.y) ** 2).mean()
        + 0.5 * (h[key].exp() * p["w"] ** 2).sum(),
        outer_loss=lambda p, h: 0.5 * ((r.Xv @ p["w"] - r.yv) ** 2).mean(),
        init_params={"w": torch.zeros(d, dtype=dtype)},
        optimizer="lbfgs", inner_lr=1.0, tol=1e-6, num_steps=50,
    )
    return r, prob


def test_seed_readme_quick_start_runs_as_written():
    # --- README imports (verbatim) ---
    from chronos.core import InnerProblem, MetaState  # noqa: F401
    from chronos.solver import ImplicitDifferentiation

    # the user's own object: a problem whose inner solve does not use "lr" at all
    r = make_ridge(dtype=torch.float32)
    inner_problem = InnerProblem.from_functions(
        inner_loss=lambda p, h: ((r.X @ p["w"] - r.y) ** 2).mean() + 0.01 * (p["w"] ** 2).sum(),
        outer_loss=lambda p, h: ((r.Xv @ p["w"] - r.yv) ** 2).mean(),
        init_params={"w": torch.zeros(6)}, num_steps=5, inner_lr=0.05,
    )
    # --- README loop (verbatim; "..." filled with num_steps=5) ---
    outer_opt = ImplicitDifferentiation(
        outer_params={"lr": torch.tensor(0.01)},
        lr=0.001
    )

    for step in range(100):  # noqa: B007
        final_params, trajectory = inner_problem.solve(outer_opt.outer_params, num_steps=5)  # noqa: RUF059
        hypergradient = outer_opt.compute_hypergradient([trajectory], inner_problem)
        outer_opt.step(hypergradient)
    # --- end README ---
    assert outer_opt.num_steps == 100
    # implicit differentiation cannot see a step size: zero hypergradient, and it says so
    assert outer_opt.last_info[0].unused_outer == ("lr",)
    assert float(outer_opt.outer_params["lr"].detach()) == pytest.approx(0.01)
    assert outer_opt.outer_params["lr"].is_leaf and outer_opt.outer_params["lr"].requires_grad


def test_implicit_outer_loop_lowers_the_validation_loss():
    _, prob = ridge_problem(dtype=f64)
    opt = ImplicitDifferentiation({"log_wd": torch.zeros(6, dtype=f64)}, lr=2.0)
    losses = []
    for _ in range(15):
        _, traj = prob.solve(opt.outer_params)
        losses.append(float(prob.outer_loss(traj.final_params, traj.outer_params)))
        opt.step(opt.compute_hypergradient([traj], prob))
    assert losses[-1] < losses[0] - 1e-4
    assert opt.last_info[0].converged


def test_weighted_average_over_trajectories():
    _, prob = ridge_problem(dtype=f64)
    opt = ImplicitDifferentiation({"log_wd": torch.zeros(6, dtype=f64)}, lr=0.1, method="direct")
    lam_a, lam_b = torch.zeros(6, dtype=f64), torch.full((6,), -1.0, dtype=f64)
    _, ta = prob.solve({"log_wd": lam_a})
    _, tb = prob.solve({"log_wd": lam_b})
    tb = Trajectory(outer_params=tb.outer_params, final_params=tb.final_params, weight=3.0)
    tz = Trajectory(outer_params=tb.outer_params, final_params=tb.final_params, weight=0.0)
    got = opt.compute_hypergradient([ta, tb, tz], prob)
    ha = implicit_hypergradient(prob.inner_loss, prob.outer_loss, ta.final_params,
                                {"log_wd": lam_a}, method="direct")
    hb = implicit_hypergradient(prob.inner_loss, prob.outer_loss, tb.final_params,
                                {"log_wd": lam_b}, method="direct")
    # (1/n) Σ w_i h_i over all n = 3 trajectories: the coordinator's rule
    expected = (ha["log_wd"] + 3.0 * hb["log_wd"]) / 3.0
    assert rel_err(got["log_wd"], expected) < 1e-10
    assert len(opt.last_info) == 2  # the zero-weight trajectory is skipped
    # evaluated at each trajectory's own λ, not the optimizer's current one
    assert not torch.allclose(ha["log_wd"], hb["log_wd"])


def test_lone_stale_trajectory_weight_is_applied_like_the_coordinator():
    # A lone trajectory of weight 0.25 (staleness 2, decay 0.5) gives a quarter of the fresh
    # hypergradient, as a lone commit does on the coordinator ((1/n) Σ w_i g_i, not / Σ w_i).
    _, prob = ridge_problem(dtype=f64)
    opt = ImplicitDifferentiation({"log_wd": torch.zeros(6, dtype=f64)}, lr=0.1, method="direct")
    _, traj = prob.solve(opt.outer_params)
    fresh = opt.compute_hypergradient([traj], prob)["log_wd"]
    stale = Trajectory(outer_params=traj.outer_params, final_params=traj.final_params,
                       weight=0.25)
    got = opt.compute_hypergradient([stale], prob)["log_wd"]
    assert rel_err(got, 0.25 * fresh) < 1e-12
    assert float(fresh.norm()) > 0


def test_compute_hypergradient_bad_input():
    _, prob = ridge_problem()
    opt = ImplicitDifferentiation({"log_wd": torch.zeros(6)}, lr=0.1)
    _, traj = prob.solve(opt.outer_params, num_steps=5)
    with pytest.raises(ConfigError, match="at least one"):
        opt.compute_hypergradient([], prob)
    zero = Trajectory(outer_params=traj.outer_params, final_params=traj.final_params, weight=0.0)
    with pytest.raises(ConfigError, match="weights are 0"):
        opt.compute_hypergradient([zero], prob)
    with pytest.raises(ChronosTypeError, match="Trajectory"):
        opt.compute_hypergradient([{"w": 1}], prob)
    with pytest.raises(ChronosTypeError, match="InnerProblem"):
        opt.compute_hypergradient([traj], "problem")
    other = Trajectory(outer_params={"wd": torch.zeros(6)}, final_params=traj.final_params)
    with pytest.raises(KeyMismatchError):
        opt.compute_hypergradient([other], prob)
    # a single trajectory is accepted without a list
    assert opt.compute_hypergradient(traj, prob)["log_wd"].shape == (6,)


def test_step_applies_the_optimizer_and_validates():
    opt = ImplicitDifferentiation({"a": 1.0, "b": torch.zeros(2)}, lr=0.5)
    assert opt.outer_params["a"].dtype == torch.get_default_dtype()
    opt.step({"a": torch.tensor(2.0), "b": torch.tensor([1.0, -1.0])})
    assert float(opt.outer_params["a"].detach()) == pytest.approx(0.0)
    assert opt.outer_params["b"].detach().tolist() == [-0.5, 0.5]
    assert all(p.grad is None and p.is_leaf for p in opt.outer_params.values())
    with pytest.raises(KeyMismatchError):
        opt.step({"a": torch.tensor(1.0)})
    with pytest.raises(ShapeMismatchError):
        opt.step({"a": torch.tensor(1.0), "b": torch.zeros(3)})
    before = opt.outer_params["a"].detach().clone()
    with pytest.raises(NonFiniteError):
        opt.step({"a": torch.tensor(float("nan")), "b": torch.zeros(2)})
    assert torch.equal(opt.outer_params["a"].detach(), before)


def test_optimizer_choices_and_state_roundtrip():
    adam = ImplicitDifferentiation({"a": 1.0}, lr=0.1, optimizer="adam")
    assert isinstance(adam.optimizer, torch.optim.Adam)
    def sgd(ps):
        return torch.optim.SGD(ps, lr=0.2, momentum=0.9)

    custom = ImplicitDifferentiation({"a": 1.0}, lr=0.1, optimizer=sgd)
    custom.step({"a": torch.tensor(1.0)})
    state = custom.state_dict()
    fresh = ImplicitDifferentiation({"a": 0.0}, lr=0.1, optimizer=sgd)
    fresh.load_state_dict(state)
    assert float(fresh.outer_params["a"].detach()) == pytest.approx(0.8)
    custom.step({"a": torch.tensor(1.0)})
    fresh.step({"a": torch.tensor(1.0)})  # momentum buffer restored: same trajectory
    assert torch.allclose(fresh.outer_params["a"].detach(), custom.outer_params["a"].detach())
    assert fresh.num_steps == 2
    for bad in ({"lr": 0.0}, {"lr": 0.1, "optimizer": "lbfgs"}, {"lr": 0.1, "optimizer": "rms"}):
        with pytest.raises(ConfigError):
            ImplicitDifferentiation({"a": 1.0}, **bad)
    with pytest.raises(ConfigError, match="empty"):
        ImplicitDifferentiation({}, lr=0.1)
    with pytest.raises(ChronosTypeError, match="floating"):
        ImplicitDifferentiation({"a": torch.tensor(1)}, lr=0.1)


def test_warm_start_reduces_iterations_between_outer_steps():
    _, prob = ridge_problem(dtype=f64)
    opt = ImplicitDifferentiation({"log_wd": torch.zeros(6, dtype=f64)}, lr=0.5, warm_start=True,
                                  tol=1e-8)
    _, traj = prob.solve(opt.outer_params)
    opt.compute_hypergradient([traj], prob)
    first = opt.last_info[0].iterations
    opt.compute_hypergradient([traj], prob)
    assert opt.last_info[0].iterations < first


def test_solver_options_are_forwarded():
    _, prob = ridge_problem(dtype=f64)
    opt = ImplicitDifferentiation({"log_wd": torch.zeros(6, dtype=f64)}, lr=0.5,
                                  method="fixed_point", alpha=0.5, momentum=0.2, max_iter=500)
    _, traj = prob.solve(opt.outer_params)
    h = opt.compute_hypergradient([traj], prob)
    ref = implicit_hypergradient(prob.inner_loss, prob.outer_loss, traj.final_params,
                                 traj.outer_params, method="direct")
    assert rel_err(h["log_wd"], ref["log_wd"]) < 1e-6
    assert opt.last_info[0].solve.method == "fixed_point"


def test_unrolled_learns_the_inner_learning_rate():
    prob = InnerProblem.from_functions(
        inner_loss=lambda p, h: 0.5 * ((p["x"] - 3.0) ** 2).sum(),
        outer_loss=lambda p, h: ((p["x"] - 3.0) ** 2).sum(),
        init_params={"x": torch.zeros(2)}, num_steps=5,
    )
    opt = UnrolledDifferentiation({"lr": 0.1}, lr=0.01, inner_lr="lr")
    for _ in range(5):
        _, traj = prob.solve(opt.outer_params)
        opt.step(opt.compute_hypergradient([traj], prob))
    assert float(opt.outer_params["lr"].detach()) > 0.2
    assert opt.last_info[0].steps == 5  # default: the problem's num_steps
    with pytest.raises(ConfigError, match="names no outer parameter"):
        UnrolledDifferentiation({"lr": 0.1}, lr=0.01, inner_lr="eta")
    with pytest.raises(ConfigError, match="start"):
        UnrolledDifferentiation({"lr": 0.1}, lr=0.01, start="middle")


def test_unrolled_start_modes_match_the_functional_api():
    _, prob = ridge_problem(dtype=f64)
    lam = {"log_wd": torch.zeros(6, dtype=f64)}
    _, traj = prob.solve(lam, record_every=10)
    for start, init in (("init", traj.steps[0]), ("final", traj.final_params)):
        opt = UnrolledDifferentiation(lam, lr=0.1, steps=6, inner_lr=0.5, truncate=4,
                                      momentum=0.5, start=start)
        got = opt.compute_hypergradient([traj], prob)
        ref = unrolled_hypergradient(prob.inner_loss, prob.outer_loss, init, lam, steps=6,
                                     lr=0.5, truncate=4, momentum=0.5)
        assert torch.allclose(got["log_wd"], ref["log_wd"], rtol=1e-12)
    assert math.isfinite(opt.last_info[0].outer_loss)
