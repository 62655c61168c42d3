"""Amortized hypergradients: warm-started, inexact inner and linear solves along the outer loop.

Each outer step ``t`` of implicit differentiation needs the inner solution ``θ*(λ_t)`` and the
linear-system solution ``v_t = H(λ_t)⁻¹ ∂F/∂θ``, then ``h_t = ∂F/∂λ − ∇²_λθ f · v_t``. The outer
loop moves ``λ`` a little per step, so both are nearly known from the previous steps. Solving
each from scratch to a fixed tight tolerance rediscovers them every time. Amortization (in the
spirit of AmIGO, Arbel & Mairal, ICLR 2022) spends the iterations where they matter:

* **warm starts** (``warm_start``): ``θ`` and ``v`` start from

  - ``"none"`` — ``problem.init_params()`` and ``0`` (the cold, exact baseline);
  - ``"previous"`` — the previous step's solutions;
  - ``"nearest"`` — the solutions stored with the nearest ``λ`` in a
    :class:`~chronos.continuum.memory.ContinuumMemory`;
  - ``"predicted"`` (default) — the memory's local linear model of ``θ*(λ)`` and ``v(λ)``
    evaluated at ``λ_t`` (:meth:`ContinuumMemory.predict`): along a smooth trajectory this
    extrapolates, so the start is ``O(‖Δλ‖²)`` from the answer instead of ``O(‖Δλ‖)``.

* **adaptive tolerances** (``adaptive=True``): the inner solve stops at
  ``‖∇θ f‖ <= ε_in(t)`` with

      ``ε_in(t) = ε_exact · clip(slack · ρ_t, 1, slack)``,   ``ρ_t = ‖h_{t−1}‖ / ‖h_first‖``

  so early steps, whose hypergradients are large and only need a direction, are solved
  loosely (``slack`` times the exact tolerance), and the tolerance tightens in proportion to
  the hypergradient norm as the outer loop converges, down to the exact tolerance once
  ``‖h‖`` has shrunk by ``slack``: near a stationary point the errors vanish with the
  gradient, which is the condition inexact hypergradient methods need to converge to the
  same point as exact ones. The linear solve's relative residual follows the same rule with
  ``linear_slack`` (default 1: kept exact, only warm-started; see
  :class:`AmortizationConfig` for why).

Everything runs in one process, with any outer optimizer:

Example (ridge regression with a learned log weight decay):
    >>> import torch
    >>> from chronos.benchmarks.problems import digits_ridge
    >>> from chronos.solver import ImplicitDifferentiation
    >>> problem = digits_ridge()
    >>> amortized = AmortizedHypergradient(problem)
    >>> opt = ImplicitDifferentiation(problem.default_outer_params(), lr=2.0)
    >>> for _ in range(20):
    ...     h, step = amortized(opt.outer_params)
    ...     opt.step(h)
    >>> abs(opt.outer_params["log_decay"].item() - problem.optimal_log_decay()) < 0.01
    True
    >>> amortized.totals["steps"], amortized.totals["linear_iterations"] < 20 * 65
    (20, True)
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from chronos.continuum.memory import ContinuumMemory
from chronos.core import tensordict as td
from chronos.core.errors import ChronosTypeError, ConfigError, ConvergenceWarning
from chronos.core.problem import InnerProblem
from chronos.core.tensordict import TensorDict
from chronos.core.trajectory import Trajectory
from chronos.solver.implicit import default_tol, implicit_hypergradient
from chronos.solver.linear import Preconditioner

__all__ = ["AmortizationConfig", "AmortizedHypergradient", "AmortizedStep", "WarmStart"]

WarmStart = Literal["none", "previous", "nearest", "predicted"]
_WARM_STARTS = ("none", "previous", "nearest", "predicted")


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@dataclass(frozen=True)
class AmortizationConfig:
    """How :class:`AmortizedHypergradient` starts and stops its solves.

    Args:
        warm_start: ``"none"``, ``"previous"``, ``"nearest"`` or ``"predicted"`` (default; see
            the module docstring).
        adaptive: tie the tolerances to the hypergradient norm (default); ``False`` solves
            every step to the exact tolerances.
        inner_tol: the exact inner tolerance on ``‖∇θ f‖`` (``None``: the problem's own ``tol``,
            or 1e-6 if it has none).
        linear_tol: the exact relative residual of the linear solve (``None``: by the inner
            parameters' dtype, :func:`~chronos.solver.implicit.default_tol`: 1e-10 in float64,
            1e-5 in float32; ``dF/dλ`` is often a small difference of large terms).
        slack: how much looser than exact the first inner solves are (>= 1; default 100).
        linear_slack: the same for the linear solve (>= 1; default 1: not loosened). Its
            stopping rule is a residual, and on an ill-conditioned Hessian a small residual
            can hide a large error in the solution (``‖v − v*‖ <= ‖r‖ / μ_min``), so a loose
            linear tolerance can turn the hypergradient's sign; the warm start alone already
            makes it cheap. Raise it only for well-conditioned problems.
        k: neighbours of the memory's local model (default 3: along a trajectory the nearest
            steps extrapolate best; more neighbours average in older, farther points).
        max_inner_steps: cap on inner optimizer steps per outer step (``None``: the
            problem's ``num_steps``).
        max_iter: cap on linear-solve iterations per outer step (default 500).
        capacity: capacity of the memory built when none is given (default 64: the local
            model only uses the ``k`` nearest entries, and old ones are far behind).

    Example:
        >>> AmortizationConfig().warm_start, AmortizationConfig(adaptive=False).slack
        ('predicted', 100.0)
    """

    warm_start: WarmStart = "predicted"
    adaptive: bool = True
    inner_tol: float | None = None
    linear_tol: float | None = None
    slack: float = 100.0
    linear_slack: float = 1.0
    k: int = 3
    max_inner_steps: int | None = None
    max_iter: int = 500
    capacity: int = 64

    def __post_init__(self) -> None:
        if self.warm_start not in _WARM_STARTS:
            raise ConfigError(
                f"warm_start must be one of {_WARM_STARTS}, got {self.warm_start!r}"
            )
        if self.inner_tol is not None and not _positive(self.inner_tol):
            raise ConfigError(f"inner_tol must be a number > 0 or None, got {self.inner_tol!r}")
        if self.linear_tol is not None and not _positive(self.linear_tol):
            raise ConfigError(f"linear_tol must be a number > 0 or None, got {self.linear_tol!r}")
        for name in ("slack", "linear_slack"):
            value = getattr(self, name)
            if not _positive(value) or value < 1:
                raise ConfigError(f"{name} must be a number >= 1, got {value!r}")
            object.__setattr__(self, name, float(value))
        for name in ("k", "max_iter", "capacity"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        steps = self.max_inner_steps
        if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool)
                                  or steps < 0):
            raise ConfigError(f"max_inner_steps must be an int >= 0 or None, got {steps!r}")


@dataclass(frozen=True)
class AmortizedStep:
    """What one amortized hypergradient cost and where it started.

    Attributes:
        inner_steps: inner optimizer steps taken.
        linear_iterations: matrix-vector products of the linear solve.
        inner_tol, linear_tol: the tolerances used this step.
        warm_start: where ``θ`` and ``v`` started (``"none"`` on the first step of any mode).
        outer_loss: ``F(θ, λ)`` at the (approximate) inner solution.
        inner_grad_norm: ``‖∇θ f‖`` at that solution.
        linear_converged: whether the linear solve met its tolerance within ``max_iter``.
        seconds: wall time of the step (inner + linear solve + bookkeeping).
    """

    inner_steps: int
    linear_iterations: int
    inner_tol: float
    linear_tol: float
    warm_start: str
    outer_loss: float
    inner_grad_norm: float
    linear_converged: bool
    seconds: float


@dataclass(frozen=True)
class _Pending:
    theta: Mapping[str, Tensor]
    v0: TensorDict | None
    started: str
    inner_tol: float
    linear_tol: float
    t0: float


class AmortizedHypergradient:
    """Hypergradients along an outer loop with warm-started, adaptively inexact solves.

    Call it with the current ``λ`` (``h, step = amortized(outer_params)``) and hand ``h`` to
    any outer optimizer. It keeps what it learned in :attr:`memory` (one entry per call:
    ``λ``, ``h``, the validation loss, and the extras ``inner_solution`` and ``cg_solution``).

    Args:
        problem: the :class:`~chronos.core.InnerProblem`.
        config: an :class:`AmortizationConfig` (default: predicted warm starts, adaptive).
        memory: a :class:`~chronos.continuum.memory.ContinuumMemory` to read and write (e.g.
            one restored from disk); default: a fresh one of ``config.capacity``.
        method, damping, preconditioner: the linear solve (see
            :func:`~chronos.solver.implicit.implicit_hypergradient`).

    :attr:`totals` counts ``steps``, ``inner_steps``, ``linear_iterations`` and ``seconds``.
    """

    def __init__(
        self,
        problem: InnerProblem,
        config: AmortizationConfig | None = None,
        *,
        memory: ContinuumMemory | None = None,
        method: str = "cg",
        damping: float = 0.0,
        preconditioner: Preconditioner | None = None,
    ) -> None:
        if not isinstance(problem, InnerProblem):
            raise ChronosTypeError(
                f"problem must be an InnerProblem, got {type(problem).__name__}"
            )
        self.problem = problem
        self.config = AmortizationConfig() if config is None else config
        if not isinstance(self.config, AmortizationConfig):
            raise ChronosTypeError(
                f"config must be an AmortizationConfig, got {type(self.config).__name__}"
            )
        if memory is not None and not isinstance(memory, ContinuumMemory):
            raise ChronosTypeError(f"memory must be a ContinuumMemory, got {type(memory).__name__}")
        self.memory = ContinuumMemory(capacity=self.config.capacity) if memory is None else memory
        self.method = method
        self.damping = damping
        self.preconditioner = preconditioner
        self.totals: dict[str, float] = {
            "steps": 0, "inner_steps": 0, "linear_iterations": 0, "seconds": 0.0
        }
        self._previous: tuple[TensorDict, TensorDict] | None = None  # (θ, v) of the last call
        self._pending: _Pending | None = None  # from solve(), for hypergradient()
        self._dtype: torch.dtype | None = None  # of θ, for the default linear tolerance
        self._first_norm: float | None = None
        self._last_norm: float | None = None

    # -- tolerances -------------------------------------------------------------------------

    def _exact_inner_tol(self) -> float:
        if self.config.inner_tol is not None:
            return self.config.inner_tol
        tol = getattr(self.problem, "tol", 0.0)
        return float(tol) if _positive(tol) else 1e-6

    def _exact_linear_tol(self) -> float:
        if self.config.linear_tol is not None:
            return self.config.linear_tol
        if self._dtype is None:
            dtypes = [v.dtype for v in self.problem.init_params().values()
                      if v.is_floating_point()]
            self._dtype = dtypes[0] if dtypes else torch.float64
        return default_tol(self._dtype)

    def tolerances(self) -> tuple[float, float]:
        """``(inner_tol, linear_tol)`` for the next step (see the module docstring)."""
        inner, linear = self._exact_inner_tol(), self._exact_linear_tol()
        if not self.config.adaptive:
            return inner, linear
        rho = 1.0
        if self._first_norm and self._last_norm is not None:
            rho = self._last_norm / self._first_norm

        def factor(slack: float) -> float:
            return min(max(slack * rho, 1.0), slack)

        return inner * factor(self.config.slack), min(linear * factor(self.config.linear_slack),
                                                      0.5)

    # -- warm starts ------------------------------------------------------------------------

    def _start(self, outer: TensorDict) -> tuple[TensorDict | None, TensorDict | None, str]:
        mode = self.config.warm_start
        if mode == "none":
            return None, None, "none"
        if mode == "previous" or len(self.memory) == 0:
            if self._previous is None:
                return None, None, "none"
            return self._previous[0], self._previous[1], "previous"
        if mode == "nearest":
            entry = self.memory.retrieve_similar(outer, k=1)[0]
            return entry.extra["inner_solution"], entry.extra["cg_solution"], "nearest"
        k = self.config.k
        theta = self.memory.predict(outer, key="inner_solution", k=k)
        v = self.memory.predict(outer, key="cg_solution", k=k)
        return theta, v, "predicted"

    # -- the step ---------------------------------------------------------------------------

    def __call__(
        self, outer_params: Mapping[str, Tensor | float], **solve_options: Any
    ) -> tuple[TensorDict, AmortizedStep]:
        """``(h, step)``: the hypergradient at ``outer_params`` and what it cost
        (:meth:`solve` then :meth:`hypergradient`).

        ``solve_options`` go to ``problem.solve`` (e.g. ``callback=``, ``version=``).
        """
        theta, traj = self.solve(outer_params, **solve_options)
        return self.hypergradient(theta, outer_params, traj)

    def solve(
        self, outer_params: Mapping[str, Tensor | float], **solve_options: Any
    ) -> tuple[TensorDict, Trajectory]:
        """The warm-started, adaptively inexact inner solve at ``outer_params``."""
        t0 = time.perf_counter()
        outer = td.detach(td.as_tensor_dict(outer_params, what="outer_params"))
        theta0, v0, started = self._start(outer)
        inner_tol, linear_tol = self.tolerances()
        steps = self.config.max_inner_steps
        theta, traj = self.problem.solve(
            outer, init_params=theta0, tol=inner_tol,
            num_steps=self.problem.num_steps if steps is None else steps, **solve_options,
        )
        self._pending = _Pending(theta, v0, started, inner_tol, linear_tol, t0)
        return theta, traj

    def hypergradient(
        self,
        theta: Mapping[str, Tensor],
        outer_params: Mapping[str, Tensor | float],
        traj: Trajectory | None = None,
    ) -> tuple[TensorDict, AmortizedStep]:
        """The warm-started linear solve and ``h`` at ``(theta, outer_params)``; stores the step
        in the memory. ``theta`` should come from :meth:`solve` (its warm start and tolerances
        are used when it did; otherwise the next ones are)."""
        outer = td.detach(td.as_tensor_dict(outer_params, what="outer_params"))
        pending = self._pending
        self._pending = None
        if pending is None or pending.theta is not theta:
            _, v0, started = self._start(outer)
            inner_tol, linear_tol = self.tolerances()
            pending = _Pending(dict(theta), v0, started, inner_tol, linear_tol,
                               time.perf_counter())
        v0 = pending.v0
        if v0 is not None and v0.keys() != theta.keys():
            v0 = None
        with warnings.catch_warnings():
            # an inexact solve is the point here: its status goes into AmortizedStep instead
            warnings.simplefilter("ignore", ConvergenceWarning)
            h, info = implicit_hypergradient(
                self.problem.inner_loss, self.problem.outer_loss, theta, outer,
                method=self.method, max_iter=self.config.max_iter, tol=pending.linear_tol,
                damping=self.damping, init=v0, return_info=True,
                preconditioner=self.preconditioner,
            )
        norm = float(td.norm(h))
        if self._first_norm is None and norm > 0:
            self._first_norm = norm
        self._last_norm = norm
        solved = td.detach(theta)
        self._previous = (solved, info.solution)
        if self.config.warm_start in ("nearest", "predicted"):
            self.memory.store(
                outer, h, info.outer_loss, int(self.totals["steps"]),
                inner_solution=solved, cg_solution=info.solution,
            )
        seconds = time.perf_counter() - pending.t0
        inner_steps = traj.num_steps if traj is not None else 0
        step = AmortizedStep(
            inner_steps=inner_steps,
            linear_iterations=info.iterations,
            inner_tol=pending.inner_tol,
            linear_tol=pending.linear_tol,
            warm_start=pending.started,
            outer_loss=info.outer_loss,
            inner_grad_norm=info.inner_grad_norm,
            linear_converged=info.converged,
            seconds=seconds,
        )
        self.totals["steps"] += 1
        self.totals["inner_steps"] += inner_steps
        self.totals["linear_iterations"] += info.iterations
        self.totals["seconds"] += seconds
        return h, step

    def reset(self) -> None:
        """Forget the previous step and the tolerance schedule (the memory is kept)."""
        self._previous = None
        self._pending = None
        self._first_norm = self._last_norm = None

