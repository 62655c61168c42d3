"""Outer optimizers: hypergradients from trajectories, then a ``torch.optim`` step.

Thin classes over the functional core (:func:`~chronos.solver.implicit.implicit_hypergradient`,
:func:`~chronos.solver.unrolled.unrolled_hypergradient`), with the seed README's shape:

* ``.outer_params`` — λ as a dict of leaf tensors (numbers are accepted and converted), updated
  in place by :meth:`OuterOptimizer.step`; pass it straight to ``InnerProblem.solve``.
* ``compute_hypergradient(trajectories, inner_problem)`` — the weighted mean
  ``(1/n) Σ_i w_i h_i`` of the ``n`` per-trajectory hypergradients, ``w_i = trajectory.weight``
  (e.g. ``decay**staleness``). This is the coordinator's rule
  (:func:`chronos.distributed.aggregation.aggregate_gradient`): divided by ``n``, not by
  ``Σ_i w_i``, so a weight is really applied — a lone trajectory of weight 0.25 gives a
  quarter of the weight-1 hypergradient, exactly as a lone commit of staleness 2 moves λ a
  quarter as far on the coordinator. Each ``h_i`` is evaluated at the trajectory's own
  ``outer_params`` — the λ its ``final_params`` were computed for — not at the optimizer's
  current λ (they differ when a trajectory is stale).
* ``step(hypergradient)`` — one step of any ``torch.optim`` optimizer (SGD by default).

Example (the seed README's single-node quick start, with a ridge problem):
    >>> import torch
    >>> from chronos.core import InnerProblem
    >>> X, y = torch.randn(40, 3), torch.randn(40)
    >>> inner_problem = InnerProblem.from_functions(
    ...     inner_loss=lambda p, h: ((X @ p["w"] - y) ** 2).mean()
    ...                             + h["log_wd"].exp() * (p["w"] ** 2).sum(),
    ...     outer_loss=lambda p, h: ((X[:20] @ p["w"] - y[:20]) ** 2).mean(),
    ...     init_params={"w": torch.zeros(3)}, optimizer="lbfgs", inner_lr=1.0, tol=1e-6)
    >>> outer_opt = ImplicitDifferentiation(outer_params={"log_wd": torch.tensor(0.0)}, lr=0.5)
    >>> for step in range(3):
    ...     final_params, trajectory = inner_problem.solve(outer_opt.outer_params, num_steps=50)
    ...     hypergradient = outer_opt.compute_hypergradient([trajectory], inner_problem)
    ...     outer_opt.step(hypergradient)
    >>> outer_opt.num_steps, outer_opt.outer_params["log_wd"].is_leaf
    (3, True)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from chronos.core import tensordict as td
from chronos.core.errors import ChronosTypeError, ConfigError, NonFiniteError
from chronos.core.problem import InnerProblem, OptimizerSpec, make_optimizer
from chronos.core.tensordict import TensorDict
from chronos.core.trajectory import Trajectory
from chronos.solver.implicit import HypergradInfo, _solver, implicit_hypergradient
from chronos.solver.linear import LinearSolver
from chronos.solver.unrolled import UnrollInfo, unrolled_hypergradient

__all__ = ["ImplicitDifferentiation", "OuterOptimizer", "UnrolledDifferentiation"]


class OuterOptimizer:
    """Shared plumbing: leaf outer parameters, a torch optimizer, weighted averaging.

    Args:
        outer_params: λ as tensors or numbers (copied into fresh leaf tensors).
        lr: the outer learning rate (> 0).
        optimizer: ``"sgd"`` (default), ``"momentum"``, ``"adam"`` or a factory
            ``params -> torch.optim.Optimizer`` (see :func:`chronos.core.make_optimizer`).
    """

    def __init__(
        self,
        outer_params: Mapping[str, Tensor | float],
        lr: float,
        optimizer: OptimizerSpec | None = None,
    ) -> None:
        params = td.as_tensor_dict(outer_params, what="outer_params")
        if not params:
            raise ConfigError("outer_params is empty; give at least one outer parameter")
        for k, v in params.items():
            if not v.is_floating_point():
                raise ChronosTypeError(
                    f"outer_params[{k!r}] has dtype {v.dtype}; outer parameters must be floating "
                    "point tensors or Python numbers"
                )
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ConfigError(f"lr (the outer learning rate) must be a number > 0, got {lr!r}")
        self.outer_params: TensorDict = {
            k: v.detach().clone().requires_grad_(True) for k, v in params.items()
        }
        self.lr = float(lr)
        spec = "sgd" if optimizer is None else optimizer
        if spec == "lbfgs":
            raise ConfigError(
                "lbfgs needs a closure that re-solves the inner problem; use 'sgd', 'momentum', "
                "'adam' or a factory params -> torch.optim.Optimizer for the outer loop"
            )
        self.optimizer: torch.optim.Optimizer = make_optimizer(
            spec, list(self.outer_params.values()), self.lr
        )
        self.num_steps = 0

    def step(self, hypergradient: Mapping[str, Tensor]) -> None:
        """Apply one optimizer step along ``hypergradient`` (same keys/shapes as λ)."""
        td.check_same_structure(self.outer_params, hypergradient, "outer_params and hypergradient")
        if not td.is_finite(hypergradient):
            raise NonFiniteError(
                "the hypergradient has NaN/Inf; nothing was applied (check the inner solve)"
            )
        for k, p in self.outer_params.items():
            p.grad = hypergradient[k].detach().to(dtype=p.dtype, device=p.device).clone()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.num_steps += 1

    def state_dict(self) -> dict[str, Any]:
        """A snapshot (deep copy) of λ, the optimizer state and the step count."""
        return {
            "outer_params": td.clone(self.outer_params),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "num_steps": self.num_steps,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict` output (λ updated in place, same keys/shapes)."""
        td.check_same_structure(self.outer_params, state["outer_params"], "state outer_params")
        with torch.no_grad():
            for k, p in self.outer_params.items():
                p.copy_(state["outer_params"][k])
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.num_steps = int(state.get("num_steps", 0))

    def _average(
        self,
        trajectories: Sequence[Trajectory] | Trajectory,
        one: Callable[[Trajectory], TensorDict],
    ) -> TensorDict:
        trajs = [trajectories] if isinstance(trajectories, Trajectory) else list(trajectories)
        if not trajs:
            raise ConfigError("compute_hypergradient needs at least one trajectory")
        for t in trajs:
            if not isinstance(t, Trajectory):
                raise ChronosTypeError(
                    f"trajectories must be Trajectory objects (from InnerProblem.solve), got "
                    f"{type(t).__name__}"
                )
            td.check_same_structure(self.outer_params, t.outer_params,
                                    "the optimizer's outer_params and trajectory.outer_params")
        if not any(t.weight > 0 for t in trajs):
            raise ConfigError("all trajectory weights are 0; nothing to average")
        n = len(trajs)  # (1/n) Σ w_i h_i, the coordinator's rule: weights are really applied
        acc = {k: torch.zeros_like(v.detach()) for k, v in self.outer_params.items()}
        for t in trajs:
            if t.weight == 0:
                continue
            h = one(t)
            for k in acc:
                acc[k] += (t.weight / n) * h[k].to(acc[k].dtype)
        return acc


class ImplicitDifferentiation(OuterOptimizer):
    """Outer optimizer with implicit-differentiation hypergradients (CG by default).

    Args:
        outer_params, lr, optimizer: see :class:`OuterOptimizer`.
        method: ``"cg"``, ``"neumann"``, ``"fixed_point"``, ``"direct"`` or a solve callable.
            A named solver is built once and reused by every call (so ``neumann`` /
            ``fixed_point`` with ``alpha="auto"`` estimate ``λ_max`` once, not per outer step).
        max_iter, tol, damping: linear-solve settings
            (see :func:`~chronos.solver.implicit.implicit_hypergradient`).
        warm_start: start each linear solve from the previous call's solution.
        **solver_options: extra solver options (``alpha``, ``momentum``, ``atol``...).

    After :meth:`compute_hypergradient`, :attr:`last_info` holds one
    :class:`~chronos.solver.implicit.HypergradInfo` per trajectory.
    """

    def __init__(
        self,
        outer_params: Mapping[str, Tensor | float],
        lr: float,
        method: str | LinearSolver = "cg",
        optimizer: OptimizerSpec | None = None,
        *,
        max_iter: int = 100,
        tol: float = 1e-10,
        damping: float = 0.0,
        warm_start: bool = False,
        **solver_options: Any,
    ) -> None:
        super().__init__(outer_params, lr, optimizer)
        self.method = method
        self.max_iter = max_iter
        self.tol = tol
        self.damping = damping
        self.warm_start = warm_start
        self.solver_options = dict(solver_options)
        self.last_info: list[HypergradInfo] = []
        self._solution: TensorDict | None = None
        # The linear solver, built once from a method name and reused by every outer step:
        # neumann / fixed_point with alpha="auto" cache their λ_max estimate in it.
        self._solve: tuple[tuple[Any, ...], LinearSolver] | None = None

    def compute_hypergradient(
        self, trajectories: Sequence[Trajectory] | Trajectory, inner_problem: InnerProblem
    ) -> TensorDict:
        """``(1/n) Σ_i w_i dF/dλ`` at each trajectory's ``(final_params, outer_params)``."""
        if not isinstance(inner_problem, InnerProblem):
            raise ChronosTypeError(
                f"inner_problem must be an InnerProblem, got {type(inner_problem).__name__}"
            )
        infos: list[HypergradInfo] = []

        def one(t: Trajectory) -> TensorDict:
            init = self._solution if self.warm_start else None
            if init is not None and init.keys() != t.final_params.keys():
                init = None
            h, info = implicit_hypergradient(
                inner_problem.inner_loss,
                inner_problem.outer_loss,
                t.final_params,
                t.outer_params,
                method=self._linear_solver(),
                max_iter=self.max_iter,
                tol=self.tol,
                damping=self.damping,
                init=init,
                return_info=True,
                **({} if isinstance(self.method, str) else self.solver_options),
            )
            infos.append(info)
            self._solution = info.solution
            return h

        out = self._average(trajectories, one)
        self.last_info = infos
        return out

    def _linear_solver(self) -> str | LinearSolver:
        """The solver for a method name, built once per settings (a callable passes through).

        Damping is left to :func:`implicit_hypergradient`, which adds it to the matvec of a
        ready solver: the same operator ``H + δI``.
        """
        if not isinstance(self.method, str):
            return self.method
        key = (self.method, self.max_iter, self.tol, tuple(sorted(self.solver_options.items())))
        if self._solve is None or self._solve[0] != key:
            self._solve = key, _solver(self.method, self.max_iter, self.tol, 0.0,
                                       self.solver_options)
        return self._solve[1]


class UnrolledDifferentiation(OuterOptimizer):
    """Outer optimizer with unrolled (optionally truncated) differentiation.

    Each trajectory is re-run differentiably for ``steps`` gradient-descent steps of size
    ``inner_lr`` (a float or the name of an outer parameter, e.g. ``"lr"`` to learn it):

    * ``start="init"`` (default): from the trajectory's first recorded iterate when it has one
      (``record_every > 0``), else from ``inner_problem.init_params()``;
    * ``start="final"``: from the trajectory's ``final_params`` (differentiates ``steps``
      extra steps taken at the end of the solve: truncated backpropagation without
      re-running the solve).

    Args:
        outer_params, lr, optimizer: see :class:`OuterOptimizer`.
        steps: steps to unroll (default: ``inner_problem.num_steps``).
        inner_lr: inner step size (default: ``inner_problem.inner_lr``).
        truncate, momentum: see :func:`~chronos.solver.unrolled.unrolled_hypergradient`.

    Example:
        >>> import torch
        >>> from chronos.core import InnerProblem
        >>> prob = InnerProblem.from_functions(
        ...     inner_loss=lambda p, h: 0.5 * ((p["x"] - 3.0) ** 2).sum(),
        ...     outer_loss=lambda p, h: ((p["x"] - 3.0) ** 2).sum(),
        ...     init_params={"x": torch.zeros(1)})
        >>> opt = UnrolledDifferentiation({"lr": 0.1}, lr=0.01, steps=5, inner_lr="lr")
        >>> _, traj = prob.solve(opt.outer_params, num_steps=5)
        >>> opt.step(opt.compute_hypergradient([traj], prob))
        >>> float(opt.outer_params["lr"].detach()) > 0.1        # learned: take bigger steps
        True
    """

    def __init__(
        self,
        outer_params: Mapping[str, Tensor | float],
        lr: float,
        steps: int | None = None,
        inner_lr: float | str | None = None,
        truncate: int | None = None,
        momentum: float = 0.0,
        optimizer: OptimizerSpec | None = None,
        *,
        start: Literal["init", "final"] = "init",
    ) -> None:
        super().__init__(outer_params, lr, optimizer)
        if start not in ("init", "final"):
            raise ConfigError(f"start must be 'init' or 'final', got {start!r}")
        if isinstance(inner_lr, str) and inner_lr not in self.outer_params:
            raise ConfigError(
                f"inner_lr={inner_lr!r} names no outer parameter; outer parameters are "
                f"{sorted(self.outer_params)}"
            )
        self.steps = steps
        self.inner_lr = inner_lr
        self.truncate = truncate
        self.momentum = momentum
        self.start = start
        self.last_info: list[UnrollInfo] = []

    def compute_hypergradient(
        self, trajectories: Sequence[Trajectory] | Trajectory, inner_problem: InnerProblem
    ) -> TensorDict:
        """``(1/n) Σ_i w_i`` unrolled ``dF/dλ`` of each trajectory (at its own λ)."""
        if not isinstance(inner_problem, InnerProblem):
            raise ChronosTypeError(
                f"inner_problem must be an InnerProblem, got {type(inner_problem).__name__}"
            )
        steps = inner_problem.num_steps if self.steps is None else self.steps
        step_size = inner_problem.inner_lr if self.inner_lr is None else self.inner_lr
        infos: list[UnrollInfo] = []

        def one(t: Trajectory) -> TensorDict:
            if self.start == "final":
                init = t.final_params
            else:
                init = t.steps[0] if t.steps else inner_problem.init_params()
            h, info = unrolled_hypergradient(
                inner_problem.inner_loss,
                inner_problem.outer_loss,
                init,
                t.outer_params,
                steps=steps,
                lr=step_size,
                truncate=self.truncate,
                momentum=self.momentum,
                return_info=True,
            )
            infos.append(info)
            return h

        out = self._average(trajectories, one)
        self.last_info = infos
        return out
