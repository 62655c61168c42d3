"""Inner problems: what a bilevel method optimizes in its inner loop.

A bilevel problem is ``min_λ F(θ*(λ), λ)`` subject to ``θ*(λ) = argmin_θ f(θ, λ)``.
:class:`InnerProblem` bundles the inner objective ``f`` (:meth:`InnerProblem.inner_loss`, also
reachable as :meth:`InnerProblem.objective`), the outer objective ``F``
(:meth:`InnerProblem.outer_loss`), the initial inner parameters
(:meth:`InnerProblem.init_params`) and a default inner solver (:meth:`InnerProblem.solve`).

Parameters are flat ``dict[str, Tensor]``; losses are plain functions
``loss(params, outer_params, batch=None) -> scalar Tensor``. Build a problem by subclassing,
from plain functions (:meth:`InnerProblem.from_functions`) or from an ``nn.Module`` and a loss
(:meth:`InnerProblem.from_module`); all three share one code path.

Example (ridge regression with a learned log weight decay):
    >>> import torch
    >>> X, y = torch.randn(20, 3), torch.randn(20)
    >>> problem = InnerProblem.from_functions(
    ...     inner_loss=lambda p, h: ((X @ p["w"] - y) ** 2).mean()
    ...                             + h["log_wd"].exp() * (p["w"] ** 2).sum(),
    ...     outer_loss=lambda p, h: ((X @ p["w"] - y) ** 2).mean(),
    ...     init_params={"w": torch.zeros(3)},
    ...     optimizer="lbfgs",
    ... )
    >>> theta, traj = problem.solve({"log_wd": torch.tensor(-2.0)}, num_steps=20)
    >>> traj.num_steps <= 20 and theta["w"].shape == (3,)
    True
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from chronos.core import tensordict as td
from chronos.core.errors import ChronosTypeError, ConfigError, NonFiniteError
from chronos.core.tensordict import TensorDict
from chronos.core.trajectory import Trajectory

__all__ = [
    "FunctionalProblem",
    "InnerProblem",
    "LossFn",
    "OptimizerSpec",
    "make_optimizer",
]

LossFn = Callable[..., Tensor]
"""``loss(params, outer_params)`` or ``loss(params, outer_params, batch)`` → scalar Tensor."""

OptimizerSpec = str | Callable[[list[Tensor]], torch.optim.Optimizer]
"""A name ("sgd", "momentum", "adam", "lbfgs") or a factory ``params -> Optimizer``."""

_OPTIMIZERS = ("sgd", "momentum", "adam", "lbfgs")


def make_optimizer(spec: OptimizerSpec, params: list[Tensor], lr: float) -> torch.optim.Optimizer:
    """Build a torch optimizer over ``params`` from a name or a factory.

    Names: ``"sgd"``, ``"momentum"`` (SGD, momentum 0.9), ``"adam"``, ``"lbfgs"`` (strong Wolfe
    line search; ``lr`` is its initial step, 1.0 is customary).
    """
    if callable(spec):
        opt = spec(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise ChronosTypeError(
                f"optimizer factory must return a torch.optim.Optimizer, got {type(opt).__name__}"
            )
        return opt
    if spec == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if spec == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if spec == "adam":
        return torch.optim.Adam(params, lr=lr)
    if spec == "lbfgs":
        return torch.optim.LBFGS(
            params,
            lr=lr,
            max_iter=1,
            max_eval=25,  # the line search's budget; torch's default for max_iter=1 is 1
            history_size=20,
            line_search_fn="strong_wolfe",
            # our own `tol` decides when to stop; torch's defaults stall one step at a time
            tolerance_grad=0.0,
            tolerance_change=0.0,
        )
    raise ConfigError(
        f"unknown optimizer {spec!r}; use one of {_OPTIMIZERS} or a callable params -> Optimizer"
    )


class InnerProblem(ABC):
    """Abstract inner problem; subclass it or use :meth:`from_functions` / :meth:`from_module`.

    Subclasses implement :meth:`inner_loss`, :meth:`outer_loss` and :meth:`init_params`.
    Class attributes set the defaults of :meth:`solve`: ``num_steps`` (100), ``inner_lr`` (0.1),
    ``optimizer`` ("sgd") and ``tol`` (0.0: run all steps).
    """

    num_steps: int = 100
    inner_lr: float = 0.1
    optimizer: OptimizerSpec = "sgd"
    tol: float = 0.0

    @abstractmethod
    def inner_loss(
        self, params: TensorDict, outer_params: TensorDict, batch: Any = None
    ) -> Tensor:
        """The inner objective f(θ, λ), a scalar."""

    @abstractmethod
    def outer_loss(
        self, params: TensorDict, outer_params: TensorDict, batch: Any = None
    ) -> Tensor:
        """The outer objective F(θ, λ), a scalar (e.g. a validation loss)."""

    @abstractmethod
    def init_params(self) -> TensorDict:
        """Fresh initial inner parameters θ_0."""

    def objective(self, params: TensorDict, outer_params: TensorDict, batch: Any = None) -> Tensor:
        """Alias of :meth:`inner_loss` (the seed API's name)."""
        return self.inner_loss(params, outer_params, batch)

    def solve(
        self,
        outer_params: Mapping[str, Tensor | float],
        init_params: Mapping[str, Tensor] | None = None,
        num_steps: int | None = None,
        *,
        optimizer: OptimizerSpec | None = None,
        lr: float | None = None,
        tol: float | None = None,
        batch: Any = None,
        record_every: int = 0,
        version: int = 0,
        worker_id: str | None = None,
        callback: Callable[[int, float], None] | None = None,
    ) -> tuple[TensorDict, Trajectory]:
        """Minimize the inner loss over θ for fixed λ with a torch optimizer.

        Runs up to ``num_steps`` optimizer steps from ``init_params`` (default
        :meth:`init_params`) and stops early once ``‖∇θ f‖₂ <= tol``. The solve itself is not
        differentiable: the returned parameters are detached leaves (use
        :mod:`chronos.solver` for hypergradients).

        Args:
            outer_params: λ (tensors or numbers); detached for the solve.
            init_params: θ_0; copied, never modified.
            num_steps: maximum optimizer steps (default: the class attribute).
            optimizer: a name or a factory, see :func:`make_optimizer`.
            lr: the optimizer's learning rate (default: the class attribute ``inner_lr``).
            tol: stop once the inner gradient norm is at most ``tol``.
            batch: passed to :meth:`inner_loss` at every step.
            record_every: keep a copy of θ every this many steps (0: none).
            version, worker_id: copied into the trajectory.
            callback: called as ``callback(step, loss)`` after every step (progress bars).

        Returns:
            ``(final_params, trajectory)``.

        Raises:
            NonFiniteError: the inner loss became NaN/Inf (lower the learning rate).
        """
        steps = self.num_steps if num_steps is None else num_steps
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ConfigError(f"num_steps must be an int >= 0, got {steps!r}")
        if record_every < 0:
            raise ConfigError(f"record_every must be >= 0, got {record_every}")
        step_lr = self.inner_lr if lr is None else lr
        if not (isinstance(step_lr, (int, float)) and step_lr > 0):
            raise ConfigError(f"lr must be a positive number, got {step_lr!r}")
        tolerance = self.tol if tol is None else tol
        if tolerance < 0:
            raise ConfigError(f"tol must be >= 0, got {tolerance}")
        outer = td.detach(td.as_tensor_dict(outer_params, what="outer_params"))
        start = self.init_params() if init_params is None else init_params
        params = {k: v.detach().clone().requires_grad_(True) for k, v in start.items()}
        leaves = list(params.values())
        opt = make_optimizer(self.optimizer if optimizer is None else optimizer, leaves, step_lr)

        losses: list[float] = []
        recorded: list[TensorDict] = [td.clone(params)] if record_every else []
        grad_norm = [math.inf]

        def closure() -> Tensor:
            opt.zero_grad(set_to_none=False)
            loss = self.inner_loss(params, outer, batch) if batch is not None else (
                self.inner_loss(params, outer)
            )
            if loss.dim() != 0:
                raise ChronosTypeError(
                    f"inner_loss must return a scalar tensor, got shape {tuple(loss.shape)}"
                )
            loss.backward()
            grad_norm[0] = float(
                torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad)
                                                      for p in leaves if p.grad is not None]))
            ) if leaves else 0.0
            return loss

        t0 = time.perf_counter()
        converged = False
        taken = 0
        for step in range(steps):
            loss = opt.step(closure)  # type: ignore[arg-type]
            assert isinstance(loss, Tensor)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise NonFiniteError(
                    f"inner loss became {value} at step {step}; lower the inner learning rate "
                    f"(now {step_lr}) or check the loss for log(0) / division by zero"
                )
            losses.append(value)
            taken = step + 1
            if record_every and taken % record_every == 0:
                recorded.append(td.clone(params))
            if callback is not None:
                callback(step, value)
            if tolerance > 0 and grad_norm[0] <= tolerance:
                converged = True
                break
        final = td.clone(params)
        traj = Trajectory(
            outer_params=td.clone(outer),
            final_params=final,
            version=version,
            worker_id=worker_id,
            steps=tuple(recorded),
            losses=tuple(losses),
            num_steps=taken,
            converged=converged,
            wall_time=time.perf_counter() - t0,
        )
        return final, traj

    # -- constructors -------------------------------------------------------------------------

    @staticmethod
    def from_functions(
        inner_loss: LossFn,
        outer_loss: LossFn,
        init_params: Mapping[str, Tensor] | Callable[[], Mapping[str, Tensor]],
        **defaults: Any,
    ) -> FunctionalProblem:
        """Build a problem from plain functions; see :class:`FunctionalProblem`."""
        return FunctionalProblem(inner_loss, outer_loss, init_params, **defaults)

    @staticmethod
    def from_module(
        module: nn.Module,
        inner_loss: Callable[[Tensor, Any, TensorDict, TensorDict], Tensor],
        outer_loss: Callable[[Tensor, Any, TensorDict, TensorDict], Tensor],
        inner_data: tuple[Any, Any],
        outer_data: tuple[Any, Any],
        **defaults: Any,
    ) -> FunctionalProblem:
        """Build a problem around an ``nn.Module`` through :func:`torch.func.functional_call`.

        ``inner_loss(outputs, targets, params, outer_params)`` and the same for
        ``outer_loss``; ``outputs = module(x)`` evaluated with ``params`` in place of the
        module's parameters. ``inner_data = (x, targets)`` is used by the inner loss and
        ``outer_data`` by the outer loss unless a ``batch = (x, targets)`` is passed. The
        initial parameters are copies of the module's own.

        Example:
            >>> import torch, torch.nn.functional as F
            >>> net = torch.nn.Linear(4, 2)
            >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
            >>> prob = InnerProblem.from_module(
            ...     net,
            ...     inner_loss=lambda out, t, p, h: F.cross_entropy(out, t)
            ...         + h["wd"] * (p["weight"] ** 2).sum(),
            ...     outer_loss=lambda out, t, p, h: F.cross_entropy(out, t),
            ...     inner_data=(x, y), outer_data=(x, y))
            >>> theta, _ = prob.solve({"wd": 0.01}, num_steps=5)
            >>> sorted(theta)
            ['bias', 'weight']
        """
        if not isinstance(module, nn.Module):
            raise ChronosTypeError(f"from_module needs an nn.Module, got {type(module).__name__}")
        initial = {k: v.detach().clone() for k, v in module.named_parameters()}

        def wrap(user_loss: Callable[..., Tensor], default: tuple[Any, Any]) -> LossFn:
            def loss(params: TensorDict, outer: TensorDict, batch: Any = None) -> Tensor:
                x, targets = default if batch is None else batch
                return user_loss(functional_call(module, params, (x,)), targets, params, outer)

            return loss

        return FunctionalProblem(
            wrap(inner_loss, inner_data), wrap(outer_loss, outer_data), initial, **defaults
        )


class FunctionalProblem(InnerProblem):
    """An :class:`InnerProblem` made of plain functions.

    Args:
        inner_loss: ``f(params, outer_params[, batch])`` → scalar.
        outer_loss: ``F(params, outer_params[, batch])`` → scalar.
        init_params: θ_0 as a dict (copied on every :meth:`init_params`) or a zero-argument
            callable returning one.
        num_steps, inner_lr, optimizer, tol: defaults for :meth:`InnerProblem.solve`.
    """

    def __init__(
        self,
        inner_loss: LossFn,
        outer_loss: LossFn,
        init_params: Mapping[str, Tensor] | Callable[[], Mapping[str, Tensor]],
        *,
        num_steps: int | None = None,
        inner_lr: float | None = None,
        optimizer: OptimizerSpec | None = None,
        tol: float | None = None,
    ) -> None:
        if not callable(inner_loss) or not callable(outer_loss):
            raise ChronosTypeError("inner_loss and outer_loss must be callables")
        if not callable(init_params):
            td.check_same_structure(init_params, init_params, "init_params")
        self._inner = inner_loss
        self._outer = outer_loss
        self._init = init_params
        if num_steps is not None:
            self.num_steps = num_steps
        if inner_lr is not None:
            self.inner_lr = inner_lr
        if optimizer is not None:
            self.optimizer = optimizer
        if tol is not None:
            self.tol = tol

    def inner_loss(self, params: TensorDict, outer_params: TensorDict, batch: Any = None) -> Tensor:
        if batch is None:
            return self._inner(params, outer_params)
        return self._inner(params, outer_params, batch)

    def outer_loss(self, params: TensorDict, outer_params: TensorDict, batch: Any = None) -> Tensor:
        if batch is None:
            return self._outer(params, outer_params)
        return self._outer(params, outer_params, batch)

    def init_params(self) -> TensorDict:
        source = self._init() if callable(self._init) else self._init
        return td.clone(source)
