import math

import pytest
import torch
import torch.nn.functional as F

from chronos.core import InnerProblem, Trajectory
from chronos.core.errors import ChronosTypeError, ConfigError, NonFiniteError


def _ridge(n=40, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = X @ torch.randn(d, generator=g, dtype=torch.float64) + 0.1 * torch.randn(
        n, generator=g, dtype=torch.float64
    )
    return X, y


def test_solve_reaches_closed_form_ridge_optimum():
    X, y = _ridge()
    n, d = X.shape
    prob = InnerProblem.from_functions(
        inner_loss=lambda p, h: ((X @ p["w"] - y) ** 2).sum() / n
        + h["log_wd"].exp() * (p["w"] ** 2).sum(),
        outer_loss=lambda p, h: ((X @ p["w"] - y) ** 2).mean(),
        init_params={"w": torch.zeros(d, dtype=torch.float64)},
        optimizer="lbfgs",
        inner_lr=1.0,
        tol=1e-7,
    )
    lam = 0.3
    theta, traj = prob.solve({"log_wd": torch.tensor(math.log(lam), dtype=torch.float64)},
                             num_steps=200)
    closed = torch.linalg.solve(X.T @ X / n + lam * torch.eye(d, dtype=torch.float64), X.T @ y / n)
    assert torch.allclose(theta["w"], closed, atol=1e-8)
    assert traj.converged and traj.num_steps < 200
    assert isinstance(traj, Trajectory) and len(traj.losses) == traj.num_steps
    assert not theta["w"].requires_grad and theta["w"].grad_fn is None


def test_solve_with_sgd_records_steps_and_decreases_loss():
    X, y = _ridge()
    prob = InnerProblem.from_functions(
        inner_loss=lambda p, h: ((X @ p["w"] - y) ** 2).mean() + h["wd"] * (p["w"] ** 2).sum(),
        outer_loss=lambda p, h: ((X @ p["w"] - y) ** 2).mean(),
        init_params=lambda: {"w": torch.zeros(5, dtype=torch.float64)},
    )
    calls = []
    theta, traj = prob.solve({"wd": 0.01}, num_steps=20, lr=0.05, record_every=5,
                             version=4, worker_id="w1", callback=lambda s, v: calls.append(s))
    assert traj.num_steps == 20 and calls == list(range(20))
    assert len(traj.steps) == 1 + 4  # θ0 and every 5th step
    assert torch.equal(traj.steps[-1]["w"], theta["w"])
    assert traj.losses[-1] < traj.losses[0]
    assert traj.version == 4 and traj.worker_id == "w1"
    assert traj.outer_params["wd"].dtype == torch.get_default_dtype()


def test_solve_does_not_modify_init_params_and_objective_alias():
    X, y = _ridge()
    init = {"w": torch.zeros(5, dtype=torch.float64)}
    prob = InnerProblem.from_functions(
        inner_loss=lambda p, h: ((X @ p["w"] - y) ** 2).mean(),
        outer_loss=lambda p, h: ((X @ p["w"] - y) ** 2).mean(),
        init_params=init,
    )
    prob.solve({"a": 0.0}, init_params=init, num_steps=5)
    assert float(init["w"].abs().sum()) == 0.0
    p = prob.init_params()
    assert torch.equal(prob.objective(p, {}), prob.inner_loss(p, {}))


def test_batch_is_passed_to_user_functions():
    seen = []

    def inner(p, h, batch):
        seen.append(batch)
        return (p["w"] ** 2).sum()

    prob = InnerProblem.from_functions(inner, inner, {"w": torch.ones(2)})
    prob.solve({"a": 0.0}, num_steps=2, batch="B")
    assert seen == ["B", "B"]


def test_from_module_uses_functional_call():
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    prob = InnerProblem.from_module(
        net,
        inner_loss=lambda out, t, p, h: F.cross_entropy(out, t)
        + h["wd"] * (p["weight"] ** 2).sum(),
        outer_loss=lambda out, t, p, h: F.cross_entropy(out, t),
        inner_data=(x, y),
        outer_data=(x, y),
        optimizer="adam",
        inner_lr=0.05,
    )
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    theta, traj = prob.solve({"wd": 0.001}, num_steps=50)
    assert traj.losses[-1] < traj.losses[0]
    # the module itself is untouched
    for k, v in net.named_parameters():
        assert torch.equal(v, before[k])
    assert float(prob.outer_loss(theta, {"wd": torch.tensor(0.0)})) < traj.losses[0]


def test_bad_inputs_raise_actionable_errors():
    prob = InnerProblem.from_functions(
        lambda p, h: (p["w"] ** 2).sum(), lambda p, h: (p["w"] ** 2).sum(), {"w": torch.ones(2)}
    )
    with pytest.raises(ConfigError, match="num_steps"):
        prob.solve({"a": 0.0}, num_steps=-1)
    with pytest.raises(ConfigError, match="lr"):
        prob.solve({"a": 0.0}, lr=0.0)
    with pytest.raises(ConfigError, match="unknown optimizer"):
        prob.solve({"a": 0.0}, optimizer="rmsprop-ish")
    with pytest.raises(ChronosTypeError):
        InnerProblem.from_functions("nope", "nope", {"w": torch.ones(2)})  # type: ignore[arg-type]
    vec = InnerProblem.from_functions(lambda p, h: p["w"] * 2, lambda p, h: p["w"].sum(),
                                      {"w": torch.ones(2)})
    with pytest.raises(ChronosTypeError, match="scalar"):
        vec.solve({"a": 0.0}, num_steps=1)
    diverge = InnerProblem.from_functions(
        lambda p, h: -(p["w"] ** 4).sum(), lambda p, h: p["w"].sum(), {"w": torch.ones(2)}
    )
    with pytest.raises(NonFiniteError, match="lower the inner learning rate"):
        diverge.solve({"a": 0.0}, num_steps=200, lr=10.0)
    with pytest.raises(TypeError):
        InnerProblem()  # type: ignore[abstract]


def test_trajectory_validates():
    with pytest.raises(ConfigError):
        Trajectory(outer_params={}, final_params={}, version=-1)
    with pytest.raises(ConfigError):
        Trajectory(outer_params={}, final_params={}, weight=-0.5)
    assert Trajectory(outer_params={}, final_params={}).final_loss is None
