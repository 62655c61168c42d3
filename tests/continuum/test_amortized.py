"""Amortized hypergradients: warm starts from the memory, adaptive tolerances, convergence."""

from __future__ import annotations

import pytest
import torch

from chronos.benchmarks.problems import digits_ridge, digits_weight_decay
from chronos.continuum import ContinuumMemory
from chronos.continuum.amortized import AmortizationConfig, AmortizedHypergradient
from chronos.core import tensordict as td
from chronos.core.errors import ChronosTypeError, ConfigError
from chronos.solver import ImplicitDifferentiation


def _run(problem, cfg: AmortizationConfig, steps: int, lr: float):
    amortized = AmortizedHypergradient(problem, cfg)
    opt = ImplicitDifferentiation(problem.default_outer_params(), lr=lr)
    infos = []
    for _ in range(steps):
        h, step = amortized(opt.outer_params)
        opt.step(h)
        infos.append(step)
    return float(opt.outer_params["log_decay"].detach()), amortized, infos


@pytest.mark.parametrize("mode", ["none", "previous", "nearest", "predicted"])
def test_every_mode_converges_to_the_closed_form_optimum_on_ridge(mode: str) -> None:
    problem = digits_ridge()
    best = problem.optimal_log_decay()
    final, _amortized, _ = _run(problem, AmortizationConfig(warm_start=mode), 40, lr=2.0)
    assert abs(final - best) < 5e-3, (mode, final, best)


def test_amortized_and_exact_reach_the_same_lambda() -> None:
    problem = digits_ridge()
    exact_cfg = AmortizationConfig(warm_start="none", adaptive=False, inner_tol=1e-9,
                                   linear_tol=1e-10)
    exact, _, _ = _run(problem, exact_cfg, 40, lr=2.0)
    amortized, _a, _ = _run(problem, AmortizationConfig(), 40, lr=2.0)
    assert abs(exact - amortized) < 5e-3
    assert abs(exact - problem.optimal_log_decay()) < 1e-3


def test_tolerances_follow_the_hypergradient_norm() -> None:
    problem = digits_ridge()
    cfg = AmortizationConfig(inner_tol=1e-7, linear_tol=1e-8, slack=100.0, linear_slack=10.0)
    amortized = AmortizedHypergradient(problem, cfg)
    assert amortized.tolerances() == pytest.approx((1e-5, 1e-7))  # nothing seen: loosest
    opt = ImplicitDifferentiation(problem.default_outer_params(), lr=2.0)
    norms = []
    for _ in range(12):
        expected = amortized.tolerances()
        h, step = amortized(opt.outer_params)
        assert (step.inner_tol, step.linear_tol) == pytest.approx(expected)
        norms.append(float(td.norm(h)))
        opt.step(h)
        rho = norms[-1] / norms[0]
        inner, linear = (min(max(s * rho, 1.0), s) for s in (100.0, 10.0))
        assert amortized.tolerances() == pytest.approx((1e-7 * inner, 1e-8 * linear))
    assert norms[-1] < norms[0] / 100  # the schedule reached the exact floor
    assert amortized.tolerances() == pytest.approx((1e-7, 1e-8))
    fixed = AmortizedHypergradient(problem, AmortizationConfig(adaptive=False, inner_tol=1e-7,
                                                               linear_tol=1e-8))
    assert fixed.tolerances() == (1e-7, 1e-8)


def test_memory_records_every_step_with_its_solutions() -> None:
    problem = digits_ridge()
    memory = ContinuumMemory(capacity=10)
    amortized = AmortizedHypergradient(problem, memory=memory)
    opt = ImplicitDifferentiation(problem.default_outer_params(), lr=2.0)
    starts = []
    for _ in range(3):
        h, step = amortized(opt.outer_params)
        starts.append(step.warm_start)
        opt.step(h)
    assert starts == ["none", "predicted", "predicted"]
    assert len(memory) == 3
    entry = memory.latest()
    assert entry is not None
    assert set(entry.extra) >= {"inner_solution", "cg_solution"}
    assert entry.extra["inner_solution"].keys() == problem.init_params().keys()
    assert amortized.totals["steps"] == 3


def test_previous_mode_does_not_fill_a_memory_and_none_never_warm_starts() -> None:
    problem = digits_ridge()
    prev = AmortizedHypergradient(problem, AmortizationConfig(warm_start="previous"))
    none = AmortizedHypergradient(problem, AmortizationConfig(warm_start="none"))
    lam = problem.default_outer_params()
    assert [prev(lam)[1].warm_start for _ in range(2)] == ["none", "previous"]
    assert [none(lam)[1].warm_start for _ in range(2)] == ["none", "none"]
    assert len(prev.memory) == 0


def test_predicted_warm_starts_save_linear_iterations_on_real_data() -> None:
    """Same tolerances, fewer CG iterations from the memory's extrapolated start (digits,
    float64, 8 outer steps); the hypergradients agree to the tolerance."""
    problem = digits_weight_decay(dtype=torch.float64)
    counts = {}
    finals = {}
    for mode in ("none", "predicted"):
        cfg = AmortizationConfig(warm_start=mode, adaptive=False, inner_tol=1e-8,
                                 linear_tol=1e-10)
        amortized = AmortizedHypergradient(problem, cfg)
        lam = problem.default_outer_params()
        for _ in range(8):
            h, _ = amortized(lam)
            lam = {k: v - 30.0 * h[k] for k, v in lam.items()}
        counts[mode] = amortized.totals["linear_iterations"]
        finals[mode] = lam["log_decay"]
    assert counts["predicted"] < 0.8 * counts["none"], counts
    torch.testing.assert_close(finals["predicted"], finals["none"], rtol=1e-4, atol=1e-4)


def test_bad_config_and_arguments() -> None:
    with pytest.raises(ConfigError, match="warm_start"):
        AmortizationConfig(warm_start="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="slack"):
        AmortizationConfig(slack=0.5)
    with pytest.raises(ConfigError, match="linear_tol"):
        AmortizationConfig(linear_tol=0.0)
    with pytest.raises(ConfigError, match="k must"):
        AmortizationConfig(k=0)
    with pytest.raises(ConfigError, match="max_inner_steps"):
        AmortizationConfig(max_inner_steps=-1)
    with pytest.raises(ChronosTypeError, match="InnerProblem"):
        AmortizedHypergradient("ridge")  # type: ignore[arg-type]
    with pytest.raises(ChronosTypeError, match="ContinuumMemory"):
        AmortizedHypergradient(digits_ridge(), memory={})  # type: ignore[arg-type]
