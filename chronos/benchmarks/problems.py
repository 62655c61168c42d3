"""Built-in bilevel problems on real data.

:class:`LogisticRegressionProblem` — multinomial logistic regression whose inner objective is

    f(θ, λ) = CE(X_tr W + b, y_tr) + ½ Σ_j exp(λ_j) ‖W_j‖²

(``W_j``: row ``j`` of the weight matrix, i.e. the weights of input feature ``j``), and whose
outer objective is the validation cross-entropy ``F(θ) = CE(X_val W + b, y_val)``. ``λ`` is a
per-feature log weight decay (``per_feature=True``) or a single log strength broadcast to every
feature. :func:`digits_weight_decay` builds it on scikit-learn's digits for worker ``rank`` of
``world_size`` (each worker trains on its own shard of the training set and validates on the
shared validation set); it is the factory ``chronos run`` uses by default.

Example:
    >>> prob = digits_weight_decay(rank=0, world_size=1, per_feature=False)
    >>> theta, traj = prob.solve(prob.default_outer_params(), num_steps=30)
    >>> 0.8 < prob.accuracy(theta, "val") <= 1.0
    True
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from chronos.benchmarks.data import Split, load_digits_split, shard
from chronos.core.errors import ConfigError
from chronos.core.problem import InnerProblem
from chronos.core.tensordict import TensorDict

__all__ = ["LogisticRegressionProblem", "digits_weight_decay"]


class LogisticRegressionProblem(InnerProblem):
    """Multinomial logistic regression with a learned (per-feature) L2 penalty.

    Args:
        split: the data; training rows ``train_slice`` are this problem's shard.
        per_feature: learn one log decay per input feature (else one shared value).
        init_log_decay: starting value of λ.
        train_slice: which training rows to use (default: all).

    Inner solve defaults: L-BFGS, up to 100 steps, gradient tolerance 1e-6.
    """

    num_steps = 100
    inner_lr = 1.0
    optimizer = "lbfgs"
    tol = 1e-6

    def __init__(
        self,
        split: Split,
        per_feature: bool = True,
        init_log_decay: float = math.log(1e-3),
        train_slice: slice | None = None,
    ) -> None:
        rows = train_slice or slice(None)
        self.split = split
        self.x_train = split.x_train[rows]
        self.y_train = split.y_train[rows]
        if len(self.x_train) == 0:
            raise ConfigError("the training shard is empty; use fewer workers or more data")
        self.per_feature = per_feature
        self.init_log_decay = float(init_log_decay)

    def default_outer_params(self) -> TensorDict:
        """λ at its starting value: ``{"log_decay": ...}``."""
        shape = (self.split.num_features,) if self.per_feature else ()
        return {
            "log_decay": torch.full(shape, self.init_log_decay, dtype=self.split.x_train.dtype)
        }

    def init_params(self) -> TensorDict:
        d, c = self.split.num_features, self.split.num_classes
        dtype = self.split.x_train.dtype
        return {"W": torch.zeros(d, c, dtype=dtype), "b": torch.zeros(c, dtype=dtype)}

    @staticmethod
    def logits(params: TensorDict, x: Tensor) -> Tensor:
        return x @ params["W"] + params["b"]

    def penalty(self, params: TensorDict, outer_params: TensorDict) -> Tensor:
        """½ Σ_j exp(λ_j) ‖W_j‖² (λ broadcast when it is a scalar)."""
        row_sq = (params["W"] ** 2).sum(dim=1)
        return 0.5 * (outer_params["log_decay"].exp() * row_sq).sum()

    def inner_loss(self, params: TensorDict, outer_params: TensorDict, batch: Any = None) -> Tensor:
        x, y = (self.x_train, self.y_train) if batch is None else batch
        return F.cross_entropy(self.logits(params, x), y) + self.penalty(params, outer_params)

    def outer_loss(self, params: TensorDict, outer_params: TensorDict, batch: Any = None) -> Tensor:
        x, y = (self.split.x_val, self.split.y_val) if batch is None else batch
        return F.cross_entropy(self.logits(params, x), y)

    def accuracy(self, params: TensorDict, which: str = "val") -> float:
        """Accuracy on ``"train"`` (this shard), ``"val"`` or ``"test"``."""
        data = {
            "train": (self.x_train, self.y_train),
            "val": (self.split.x_val, self.split.y_val),
            "test": (self.split.x_test, self.split.y_test),
        }
        if which not in data:
            raise ConfigError(f"which must be one of {sorted(data)}, got {which!r}")
        x, y = data[which]
        with torch.no_grad():
            return float((self.logits(params, x).argmax(dim=1) == y).float().mean())


def digits_weight_decay(
    rank: int = 0,
    world_size: int = 1,
    *,
    per_feature: bool = True,
    n_train: int = 600,
    n_val: int = 400,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    init_log_decay: float = math.log(1e-3),
) -> LogisticRegressionProblem:
    """Per-feature weight decay on scikit-learn's digits, sharded for worker ``rank``."""
    split = load_digits_split(n_train=n_train, n_val=n_val, seed=seed, dtype=dtype)
    return LogisticRegressionProblem(
        split,
        per_feature=per_feature,
        init_log_decay=init_log_decay,
        train_slice=shard(len(split.x_train), rank, world_size),
    )
