"""Few-shot sinusoid iMAML: task generation, sharding, the batched model, hypergradients
checked against finite differences and a closed form, and a short meta-training run."""

import math
import warnings

import pytest
import torch

from chronos.benchmarks.sinusoid import (
    SinusoidIMAMLProblem,
    held_out_tasks,
    init_meta_params,
    meta_train,
    meta_train_tasks,
    post_adaptation_mse,
    predict,
    sample_tasks,
    sinusoid_imaml,
    tile,
    unadapted_mse,
)
from chronos.core import tensordict as td
from chronos.core.errors import ConfigError, ConvergenceWarning
from chronos.core.trajectory import Trajectory
from chronos.solver import ImplicitDifferentiation, implicit_hypergradient

F64 = torch.float64


def _newton_polish(problem, theta, phi, iters=4):
    """θ*(φ) to machine precision: Newton steps on the flattened inner loss (tiny problems;
    L-BFGS's line search stalls near 1e-8 in float64, where the loss stops changing)."""
    vec, spec = td.flatten(theta)
    vec = vec.detach().clone()

    def f(v):
        return problem.inner_loss(td.unflatten(v, spec), phi)

    for _ in range(iters):
        grad = torch.autograd.functional.jacobian(f, vec)
        hess = torch.autograd.functional.hessian(f, vec, vectorize=True)
        vec = vec - torch.linalg.solve(hess, grad)
    final = torch.autograd.functional.jacobian(f, vec)
    assert float(final.norm()) < 1e-12, float(final.norm())
    hess = torch.autograd.functional.hessian(f, vec, vectorize=True)
    assert float(torch.linalg.eigvalsh(hess)[0]) > 0  # a strict local minimum
    return td.unflatten(vec, spec)


def _solve_exactly(problem, phi, start=None):
    """L-BFGS from θ_t = φ, then Newton; from ``start`` (already close): Newton alone."""
    if start is None:
        start, _ = problem.solve(phi, init_params=problem.start_from(phi), num_steps=60,
                                 tol=1e-7)
    return _newton_polish(problem, start, phi)


def _random_direction(phi, seed):
    g = torch.Generator().manual_seed(seed)
    d = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in phi.items()}
    return td.scale(d, 1.0 / float(td.norm(d)))


# -- tasks ----------------------------------------------------------------------------------


def test_tasks_are_seeded_sinusoids_in_their_ranges():
    a = meta_train_tasks(50, seed=3)
    b = meta_train_tasks(50, seed=3)
    for name in ("x_support", "y_support", "x_query", "y_query", "amplitude", "phase"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.dtype == torch.float32 and (a.shots, a.queries, len(a)) == (10, 10, 50)
    assert not torch.equal(meta_train_tasks(50, seed=4).amplitude, a.amplitude)
    assert 0.1 <= float(a.amplitude.min()) and float(a.amplitude.max()) <= 5.0
    assert 0.0 <= float(a.phase.min()) and float(a.phase.max()) <= math.pi
    for x in (a.x_support, a.x_query):
        assert -5.0 <= float(x.min()) and float(x.max()) <= 5.0
    want = a.amplitude[:, None] * torch.sin(a.x_query - a.phase[:, None])
    assert torch.allclose(a.y_query, want, atol=1e-5)
    # the same draws in float64, up to float32 rounding
    c = meta_train_tasks(50, seed=3, dtype=F64)
    assert c.dtype == F64 and torch.allclose(c.y_support.float(), a.y_support, atol=1e-5)
    # sample_tasks is pure given its generator
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    s1, s2 = sample_tasks(4, 3, 5, generator=g1), sample_tasks(4, 3, 5, generator=g2)
    assert torch.equal(s1.x_query, s2.x_query) and s1.x_support.shape == (4, 3)


def test_held_out_tasks_differ_from_every_training_pool():
    test = held_out_tasks(100, seed=0, dtype=F64)  # float64: distinct draws never collide
    assert len(test) == 100 and torch.equal(test.phase, held_out_tasks(100, seed=0,
                                                                       dtype=F64).phase)
    for seed in (0, 1, 2):
        train = meta_train_tasks(100, seed=seed, dtype=F64)
        shared = set(train.amplitude.tolist()) & set(test.amplitude.tolist())
        assert not shared
        assert not set(train.x_support.flatten().tolist()) & set(test.x_support.flatten().tolist())


def test_bad_task_arguments_say_what_to_do():
    with pytest.raises(ConfigError, match="shots must be an int >= 1"):
        meta_train_tasks(10, shots=0)
    with pytest.raises(ConfigError, match="floating point"):
        held_out_tasks(10, dtype=torch.int64)
    with pytest.raises(ConfigError, match=r"torch\.Generator"):
        sample_tasks(3, generator=0)
    with pytest.raises(ConfigError, match="seed must be an int >= 0"):
        meta_train_tasks(3, seed=-1)


# -- sharding -------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 3, 4, 7])
def test_shards_partition_the_pool(world_size):
    pool = meta_train_tasks(30, seed=1)
    shards = [sinusoid_imaml(r, world_size, num_tasks=30, seed=1) for r in range(world_size)]
    amps = torch.cat([p.tasks.amplitude for p in shards])
    assert torch.equal(amps, pool.amplitude)  # union, in order: contiguous and disjoint
    assert torch.equal(torch.cat([p.tasks.x_query for p in shards]), pool.x_query)
    assert len(set(amps.tolist())) == 30
    sizes = [p.num_tasks for p in shards]
    assert min(sizes) == 30 // world_size and sum(sizes) == 30
    phi0 = shards[0].default_outer_params()
    for p in shards[1:]:  # one φ_0 for the whole job
        assert all(torch.equal(phi0[k], v) for k, v in p.default_outer_params().items())


def test_bad_shard_arguments_raise_config_errors():
    with pytest.raises(ConfigError, match=r"0 <= rank < world_size=2"):
        sinusoid_imaml(2, 2)
    with pytest.raises(ConfigError, match="rank"):
        sinusoid_imaml(-1, 2)
    with pytest.raises(ConfigError, match="world_size must be an int >= 1"):
        sinusoid_imaml(0, 0)
    with pytest.raises(ConfigError, match="num_tasks >= world_size or fewer workers"):
        sinusoid_imaml(1, 5, num_tasks=4)
    with pytest.raises(ConfigError, match="reg"):
        sinusoid_imaml(reg=0.0)
    with pytest.raises(ConfigError, match="hidden"):
        sinusoid_imaml(hidden=(40, 0))
    with pytest.raises(ConfigError, match="empty"):
        SinusoidIMAMLProblem(meta_train_tasks(4)[4:])


# -- the model and the losses ---------------------------------------------------------------


def test_batched_model_matches_one_network_per_task():
    tasks = meta_train_tasks(5, seed=2, dtype=F64)
    phi = init_meta_params((6, 7), seed=2, dtype=F64)
    theta = {k: v + 0.1 * torch.randn(v.shape, dtype=F64) for k, v in tile(phi, 5).items()}
    batched = predict(theta, tasks.x_query)
    for t in range(5):
        one = {k: v[t] for k, v in theta.items()}
        assert torch.allclose(predict(one, tasks.x_query[t:t + 1])[0], batched[t])
        x = tasks.x_query[t].unsqueeze(-1)
        h = torch.tanh(torch.tanh(x @ one["w1"] + one["b1"]) @ one["w2"] + one["b2"])
        assert torch.allclose((h @ one["w3"] + one["b3"]).squeeze(-1), batched[t])
    assert torch.allclose(predict(phi, tasks.x_query), predict(tile(phi, 5), tasks.x_query))
    # at θ_t = φ the proximal term vanishes: f = support MSE of φ, F = unadapted query MSE
    p = SinusoidIMAMLProblem(tasks, reg=2.0, hidden=(6, 7))
    start = p.start_from(phi)
    assert float(p.inner_loss(start, phi)) == pytest.approx(p.support_mse(phi), rel=1e-12)
    assert float(p.outer_loss(start, phi)) == pytest.approx(unadapted_mse(phi, tasks), rel=1e-12)
    assert p.init_params()["w2"].shape == (5, 6, 7)


# -- hypergradients -------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_implicit_hypergradient_matches_central_finite_differences():
    problem = sinusoid_imaml(num_tasks=3, hidden=(4, 4), reg=2.0, seed=1, dtype=F64)
    phi = problem.default_outer_params()
    theta = _solve_exactly(problem, phi)
    hyper, info = implicit_hypergradient(problem.inner_loss, problem.outer_loss, theta, phi,
                                         tol=1e-13, max_iter=500, return_info=True)
    assert info.converged and info.inner_grad_norm < 1e-12
    assert info.unused_outer == ()  # φ reaches f (not F): every key gets a hypergradient
    eps = 1e-4
    for seed in (0, 1):
        d = _random_direction(phi, seed)
        values = []
        for sign in (1.0, -1.0):
            shifted = td.axpy(sign * eps, d, phi)
            start = {k: v + sign * eps * d[k].unsqueeze(0) for k, v in theta.items()}
            values.append(float(problem.outer_loss(_solve_exactly(problem, shifted, start),
                                                   shifted)))
        fd = (values[0] - values[1]) / (2 * eps)
        analytic = float(td.dot(hyper, d))
        assert abs(fd - analytic) <= 1e-4 * abs(analytic), (fd, analytic)


@pytest.mark.timeout(60)
def test_linear_model_hypergradient_has_the_closed_form():
    problem = sinusoid_imaml(num_tasks=6, hidden=(), reg=1.5, seed=2, dtype=F64)
    phi = {"w1": torch.tensor([[0.7]], dtype=F64), "b1": torch.tensor([-0.3], dtype=F64)}
    # θ*(φ) = (H_t + ρI)⁻¹((2/K) X_tᵀy_t + ρφ): the solve reaches it (to L-BFGS's float64
    # floor: its line search stalls once the loss stops changing, near 1e-8 here)
    theta, traj = problem.solve(phi, init_params=problem.start_from(phi), num_steps=100,
                                tol=1e-10)
    closed = problem.closed_form_params(phi)
    for k in closed:
        assert torch.allclose(theta[k], closed[k], rtol=0, atol=1e-6), k
    # the formula (1/T) Σ_t ρ (H_t + ρI)⁻¹ ∇MSE_t^query equals autograd through θ*(φ)
    leaf = {k: v.clone().requires_grad_(True) for k, v in phi.items()}
    loss = problem.outer_loss(problem.closed_form_params(leaf), leaf)
    auto = dict(zip(leaf, torch.autograd.grad(loss, list(leaf.values())), strict=True))
    formula = problem.closed_form_hypergradient(phi)
    for k in phi:
        assert torch.allclose(formula[k], auto[k], rtol=1e-10), k
    # and the framework's implicit CG hypergradient, through the optimizer API, matches it:
    # at the exact θ* to CG's tolerance, at the solve's own θ to the solve's accuracy
    opt = ImplicitDifferentiation(phi, lr=0.01, method="cg", tol=1e-12, max_iter=100)
    exact = Trajectory(outer_params=phi, final_params=closed)
    for trajectory, rtol in ((exact, 1e-9), (traj, 1e-5)):
        hyper = opt.compute_hypergradient([trajectory], problem)
        assert opt.last_info[0].converged
        for k in phi:
            assert torch.allclose(hyper[k], formula[k], rtol=rtol, atol=0), (k, rtol)
    assert float(td.norm(formula)) > 1e-3  # not a trivial zero


@pytest.mark.timeout(60)
def test_equal_shards_average_to_the_pool_hypergradient():
    """The Hessian is block diagonal over tasks: the workers' mean hypergradient is the
    single-process one (what the coordinator's average relies on)."""
    kwargs = {"num_tasks": 4, "hidden": (4,), "reg": 2.0, "seed": 3, "dtype": F64}
    whole = sinusoid_imaml(**kwargs)
    phi = whole.default_outer_params()

    def hypergradient(p):
        theta = _solve_exactly(p, phi)
        return implicit_hypergradient(p.inner_loss, p.outer_loss, theta, phi, tol=1e-13,
                                      max_iter=500)

    full = hypergradient(whole)
    parts = [hypergradient(sinusoid_imaml(r, 2, **kwargs)) for r in range(2)]
    for k in phi:
        assert torch.allclose(0.5 * (parts[0][k] + parts[1][k]), full[k], rtol=1e-8,
                              atol=1e-12), k


# -- meta-training --------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_few_meta_training_steps_lower_the_held_out_post_adaptation_mse(one_torch_thread):
    problem = sinusoid_imaml(num_tasks=20, hidden=(20, 20), seed=0)
    test = held_out_tasks(20, seed=0)
    phi0 = problem.default_outer_params()
    before = post_adaptation_mse(phi0, test, reg=problem.reg, num_steps=60)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # meta_train reports, never warns
        rows, phi = meta_train(problem, outer_steps=8, lr=0.03, num_steps=20, cg_max_iter=20)
    after = post_adaptation_mse(phi, test, reg=problem.reg, num_steps=60)
    assert after < 0.7 * before, (before, after)
    assert after < unadapted_mse(phi0, test)
    assert [r["step"] for r in rows] == list(range(8))
    assert rows[-1]["query_mse"] < rows[0]["query_mse"]
    # a warm-started CG spends one more matvec on its starting residual
    assert all(r["cg_iterations"] <= 21 and r["inner_steps"] <= 20 for r in rows)
    assert set(phi) == set(phi0) and all(not v.requires_grad for v in phi.values())


@pytest.mark.timeout(60)
def test_meta_train_reports_held_out_numbers_when_asked(one_torch_thread):
    problem = sinusoid_imaml(num_tasks=6, hidden=(8,), seed=1)
    test = held_out_tasks(6, seed=1)
    rows, phi = meta_train(problem, outer_steps=3, num_steps=10, cg_max_iter=10,
                           eval_tasks=test, eval_every=2, eval_steps=10)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert [("held_out_mse" in r) for r in rows] == [True, False, True, True]
    assert rows[-1]["held_out_mse"] == pytest.approx(
        post_adaptation_mse(phi, test, reg=problem.reg, num_steps=10), rel=1e-6)
    with pytest.raises(ConfigError, match="outer_steps"):
        meta_train(problem, outer_steps=-1)
