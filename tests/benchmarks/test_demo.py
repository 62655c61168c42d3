import pytest
import torch

from chronos.benchmarks.demo import main
from chronos.benchmarks.problems import digits_weight_decay


@pytest.mark.timeout(120)
def test_demo_runs_and_prints_accuracies(capsys):
    assert main(["--steps", "15", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "before training" in out and "after training" in out
    assert "test acc" in out


def test_digits_problem_learns_and_shards():
    p0 = digits_weight_decay(rank=0, world_size=2)
    p1 = digits_weight_decay(rank=1, world_size=2)
    assert len(p0.x_train) + len(p1.x_train) == 600
    theta, traj = p0.solve(p0.default_outer_params(), num_steps=30)
    assert traj.losses[-1] < traj.losses[0]
    assert p0.accuracy(theta, "test") > 0.85
    assert p0.default_outer_params()["log_decay"].shape == (64,)


def test_ridge_closed_forms_agree_with_solve():
    from chronos.benchmarks.problems import digits_ridge

    prob = digits_ridge()
    lam = -1.0
    theta, traj = prob.solve({"log_decay": torch.tensor(lam, dtype=torch.float64)})
    assert traj.converged, traj.num_steps
    closed = prob.closed_form_params(lam)
    assert torch.allclose(theta["w"], closed["w"], atol=1e-6)
    assert torch.allclose(theta["b"], closed["b"], atol=1e-6)
    best = prob.optimal_log_decay()
    assert -3.0 < best < 0.0
    for other in (best - 0.3, best + 0.3):
        assert prob.validation_loss(best) < prob.validation_loss(other)
