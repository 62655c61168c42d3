import pytest

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
