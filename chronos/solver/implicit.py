"""Implicit differentiation: hypergradients at an inner optimum without unrolling.

At an inner optimum ``θ*(λ)`` with ``∇θ f(θ*, λ) = 0`` and ``H = ∇²_θθ f`` invertible, the
implicit function theorem gives ``dθ*/dλ = −H⁻¹ ∇²_θλ f``, hence

    ``dF/dλ = ∂F/∂λ − ∇²_λθ f · v``   where   ``(H + δI) v = ∂F/∂θ``

(``δ`` = ``damping``, 0 for the exact formula). :func:`implicit_hypergradient` linearizes the
inner gradient once (:func:`~chronos.solver.hvp.linearize_inner`), solves for ``v`` with a
linear solver from :mod:`chronos.solver.linear` using one reverse pass per iteration, and gets
the mixed term from one more reverse pass through the same graph. The cost is independent of
how θ* was found (L-BFGS, SGD, a closed form).

Example (ridge regression, λ = log weight decay, closed form to compare with):
    >>> import torch
    >>> torch.manual_seed(0) and None
    >>> X, y = torch.randn(30, 4, dtype=torch.float64), torch.randn(30, dtype=torch.float64)
    >>> Xv, yv = torch.randn(20, 4, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    >>> inner = lambda p, h: 0.5 * ((X @ p["w"] - y) ** 2).sum() \\
    ...     + 0.5 * h["log_wd"].exp() * (p["w"] ** 2).sum()
    >>> outer = lambda p, h: 0.5 * ((Xv @ p["w"] - yv) ** 2).sum()
    >>> lam = torch.tensor(0.5, dtype=torch.float64)
    >>> A = X.T @ X + lam.exp() * torch.eye(4, dtype=torch.float64)
    >>> w = torch.linalg.solve(A, X.T @ y)                                  # θ*(λ)
    >>> hg, info = implicit_hypergradient(inner, outer, {"w": w}, {"log_wd": lam},
    ...                                   return_info=True)
    >>> v = torch.linalg.solve(A, Xv.T @ (Xv @ w - yv))                     # H⁻¹ ∂F/∂θ
    >>> exact = -(lam.exp() * w) @ v                                        # −∇²_λθ f · v
    >>> bool(torch.isclose(hg["log_wd"], exact, rtol=1e-9)), info.converged
    (True, True)
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch
from torch import Tensor

from chronos.core import tensordict as td
from chronos.core.errors import ChronosTypeError, ConfigError, ConvergenceWarning, NonFiniteError
from chronos.core.tensordict import TensorDict
from chronos.solver.hvp import InnerLinearization, make_leaves, scalar_loss
from chronos.solver.linear import LinearSolver, Preconditioner, SolveInfo, make_solver
from chronos.solver.matmul import MatmulAutotuner

__all__ = ["HypergradInfo", "default_tol", "implicit_hypergradient", "outer_gradients"]

Loss = Callable[[TensorDict, TensorDict], Tensor]


@dataclass(frozen=True)
class HypergradInfo:
    """What :func:`implicit_hypergradient` did.

    Attributes:
        solve: the linear solver's :class:`~chronos.solver.linear.SolveInfo`.
        solution: ``v`` with ``(H + δI) v = ∂F/∂θ`` (detached); pass it as ``init=`` to
            warm-start the next solve.
        unused_outer: outer-parameter names that neither loss depends on (their
            hypergradient is zero by construction).
        inner_grad_norm: ``‖∇θ f‖`` at the given inner parameters; the formula assumes it is
            ~0, so a large value means θ is not an inner optimum and the result is biased.
        outer_loss: ``F(θ, λ)``.
        inner_loss: ``f(θ, λ)``.
    """

    solve: SolveInfo
    solution: TensorDict
    unused_outer: tuple[str, ...]
    inner_grad_norm: float
    outer_loss: float
    inner_loss: float

    @property
    def iterations(self) -> int:
        """Matrix-vector products used by the linear solve."""
        return self.solve.iterations

    @property
    def residual(self) -> float:
        """Final residual norm of the linear solve."""
        return self.solve.residual

    @property
    def converged(self) -> bool:
        """Whether the linear solve reached its tolerance."""
        return self.solve.converged


def default_tol(dtype: torch.dtype) -> float:
    """The relative residual a linear solve for a hypergradient in ``dtype`` should reach.

    ``dF/dλ = ∂F/∂λ − ∇²_λθ f · v`` is often a small difference of large terms (``‖∂F/∂θ‖``
    can be 10⁵ times ``‖dF/dλ‖``), so in float64 the residual must be tight: 1e-10. In float32
    or lower it cannot get much below ~1e-6, and a tighter one only burns ``max_iter``: 1e-5.

    >>> default_tol(torch.float64), default_tol(torch.float32)
    (1e-10, 1e-05)
    """
    return 1e-10 if dtype == torch.float64 else 1e-5


def outer_gradients(
    outer_loss: Loss, params: TensorDict, outer_params: TensorDict
) -> tuple[float, TensorDict, TensorDict, set[str]]:
    """``(F, ∂F/∂θ, ∂F/∂λ, names of λ that F does not depend on)`` at leaves ``params``/``λ``."""
    if not callable(outer_loss):
        raise ChronosTypeError(f"outer_loss must be callable, got {type(outer_loss).__name__}")
    theta, lam = list(params.values()), list(outer_params.values())
    with torch.enable_grad():
        value = scalar_loss(outer_loss(params, outer_params), "outer_loss")
        raw: tuple[Tensor | None, ...] = (
            torch.autograd.grad(value, theta + lam, allow_unused=True)
            if value.requires_grad
            else (None,) * (len(theta) + len(lam))
        )
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(raw, theta + lam, strict=True)]
    d_theta = dict(zip(params, grads[: len(theta)], strict=True))
    d_lam = dict(zip(outer_params, grads[len(theta) :], strict=True))
    unreached = {k for k, g in zip(outer_params, raw[len(theta) :], strict=True) if g is None}
    for what, d in (("∂F/∂θ", d_theta), ("∂F/∂λ", d_lam)):
        if not td.is_finite(d):
            raise NonFiniteError(
                f"{what} has NaN/Inf; the outer loss is not differentiable at these parameters"
            )
    return float(value.detach()), d_theta, d_lam, unreached


def _solver(
    method: str | LinearSolver,
    max_iter: int,
    tol: float,
    damping: float,
    options: Mapping[str, Any],
) -> LinearSolver:
    if isinstance(method, str):
        kwargs: dict[str, Any] = {"tol": tol, "damping": damping, "warn": False, **options}
        if method != "direct":
            kwargs["max_iter"] = max_iter
        return make_solver(method, **kwargs)
    if not callable(method):
        raise ConfigError(
            f"method must be a name ('cg', 'neumann', 'fixed_point', 'direct') or a callable "
            f"solve(matvec, b, init=None), got {type(method).__name__}"
        )
    return make_solver(method, **options)


@overload
def implicit_hypergradient(
    inner_loss: Loss,
    outer_loss: Loss,
    inner_params: Mapping[str, Tensor],
    outer_params: Mapping[str, Tensor | float],
    *,
    method: str | LinearSolver = ...,
    max_iter: int = ...,
    tol: float = ...,
    damping: float = ...,
    init: Mapping[str, Tensor] | None = ...,
    return_info: Literal[False] = ...,
    autotune: bool = ...,
    preconditioner: Preconditioner | None = ...,
    **solver_options: Any,
) -> TensorDict: ...


@overload
def implicit_hypergradient(
    inner_loss: Loss,
    outer_loss: Loss,
    inner_params: Mapping[str, Tensor],
    outer_params: Mapping[str, Tensor | float],
    *,
    method: str | LinearSolver = ...,
    max_iter: int = ...,
    tol: float = ...,
    damping: float = ...,
    init: Mapping[str, Tensor] | None = ...,
    return_info: Literal[True],
    autotune: bool = ...,
    preconditioner: Preconditioner | None = ...,
    **solver_options: Any,
) -> tuple[TensorDict, HypergradInfo]: ...


def implicit_hypergradient(
    inner_loss: Loss,
    outer_loss: Loss,
    inner_params: Mapping[str, Tensor],
    outer_params: Mapping[str, Tensor | float],
    *,
    method: str | LinearSolver = "cg",
    max_iter: int = 100,
    tol: float = 1e-10,
    damping: float = 0.0,
    init: Mapping[str, Tensor] | None = None,
    return_info: bool = False,
    autotune: bool = False,
    preconditioner: Preconditioner | None = None,
    **solver_options: Any,
) -> TensorDict | tuple[TensorDict, HypergradInfo]:
    """``dF/dλ`` at an (approximate) inner optimum by implicit differentiation.

    Args:
        inner_loss: ``f(params, outer_params) -> scalar``.
        outer_loss: ``F(params, outer_params) -> scalar``.
        inner_params: θ ≈ θ*(λ) (not modified; no gradient flows into it).
        outer_params: λ (tensors or numbers; not modified and never given a ``.grad``).
        method: ``"cg"`` (default), ``"neumann"``, ``"fixed_point"``, ``"direct"`` or a
            ready ``solve(matvec, b, init=None) -> (x, SolveInfo)``.
        max_iter: iteration cap of the linear solve (ignored by ``"direct"``).
        tol: relative residual tolerance of the linear solve (``‖r‖ <= tol·‖∂F/∂θ‖``).
        damping: ``δ >= 0`` added to the Hessian (regularizes a singular / indefinite H).
        init: warm start for ``v`` (e.g. ``info.solution`` of the previous outer step).
        return_info: also return a :class:`HypergradInfo`.
        autotune: run large CPU matrix products in their faster orientation
            (:class:`~chronos.solver.matmul.MatmulAutotuner`); same values up to rounding.
            Off by default: it only helps on CPUs whose BLAS runs one orientation of a thin
            product much faster than the other (and costs Python dispatch on every operation
            elsewhere); ``python -m chronos.benchmarks.hypergrad`` prints whether it wins on
            yours.
        preconditioner: ``M(r) -> z ≈ (H + δI)⁻¹ r`` on tensor dicts shaped like
            ``inner_params`` (symmetric positive definite), for ``method="cg"``; e.g. a
            :class:`~chronos.solver.precond.KFACPreconditioner` for linear / softmax models,
            built once and refreshed every few outer steps. Cuts CG iterations; the result
            is the same up to the tolerance.
        **solver_options: extra options of the named solver (``alpha`` for ``neumann`` and
            ``fixed_point``, ``momentum`` for ``fixed_point``, ``atol``, ``max_size``).

    Returns:
        ``{name: dF/dλ_name}`` with λ's keys, shapes and dtypes (detached), and the info when
        ``return_info`` is true. Outer parameters that neither loss depends on get zeros and
        are named in ``info.unused_outer``.

    Raises:
        NonFiniteError: a loss, gradient, the linear solve or the result is NaN/Inf.
        KeyMismatchError, ShapeMismatchError: ``init`` does not match ``inner_params``.
        ConfigError: unknown method or bad solver options.

    A linear solve that stops at ``max_iter`` returns its best iterate, reports
    ``info.converged == False`` and issues one :class:`ConvergenceWarning`.
    """
    if not isinstance(damping, (int, float)) or isinstance(damping, bool) or not damping >= 0:
        raise ConfigError(f"damping must be a number >= 0, got {damping!r}")
    if preconditioner is not None:
        if method != "cg":
            raise ConfigError(
                f"preconditioner= is supported by method='cg', got method={method!r}; use "
                "method='cg' or give your own solver its preconditioner"
            )
        solver_options = {**solver_options, "preconditioner": preconditioner}
    solve = _solver(method, max_iter, tol, float(damping), solver_options)
    theta = make_leaves(inner_params, "inner_params")
    lam = make_leaves(outer_params, "outer_params")
    if init is not None:
        td.check_same_structure(theta, init, "init (a previous solution) and inner_params")

    tuner = MatmulAutotuner() if autotune else None

    def tuned() -> contextlib.AbstractContextManager[Any]:
        return tuner if tuner is not None else contextlib.nullcontext()

    with tuned():
        lin = InnerLinearization(inner_loss, theta, lam)
        f_value, d_theta, d_lam, outer_unreached = outer_gradients(outer_loss, theta, lam)
    extra = float(damping) if not isinstance(method, str) else 0.0

    matvec: Callable[[TensorDict], TensorDict]
    if tuner is None and not extra:
        matvec = lin.hvp  # the hot loop: nothing between the solver and the reverse pass
    else:

        def matvec(v: TensorDict) -> TensorDict:
            with tuned():  # only the products; the solver's vector algebra runs outside it
                hv = lin.hvp(v)
            return td.axpy(extra, v, hv) if extra else hv

    v, solve_info = solve(matvec, d_theta, init)
    if not td.is_finite(v):
        raise NonFiniteError(
            f"the linear solve ({solve_info.method}) produced NaN/Inf; the inner Hessian may "
            "be singular or indefinite: add damping, or use method='cg' / a smaller alpha"
        )
    with tuned():
        mixed = lin.mixed(v)
    unused = tuple(sorted(lin.unreached & outer_unreached))
    hyper = {
        k: (d_lam[k] - mixed[k]).detach().to(lam[k].dtype) for k in lam
    }
    if not td.is_finite(hyper):
        raise NonFiniteError("the hypergradient has NaN/Inf; check both losses at these parameters")
    if not solve_info.converged:
        advice = (
            f"the step alpha={solve_info.alpha:.4g} exceeds 2/λ_max of the Hessian (or it is "
            "not positive definite): use alpha='auto', a smaller alpha, method='cg' or damping"
            if solve_info.status == "diverged" and solve_info.alpha is not None
            else "raise max_iter, add damping or warm-start with init=info.solution"
        )
        warnings.warn(
            ConvergenceWarning(
                f"implicit_hypergradient: the {solve_info.method} solve did not converge "
                f"(max_iter={max_iter}, tol={tol:g}, status {solve_info.status!r}); using the "
                f"best iterate. Check info.residual; {advice}"
            ),
            stacklevel=2,
        )
    if not return_info:
        return hyper
    info = HypergradInfo(
        solve=solve_info,
        solution={k: t.detach().clone() for k, t in v.items()},
        unused_outer=unused,
        inner_grad_norm=lin.grad_norm(),
        outer_loss=f_value,
        inner_loss=lin.loss,
    )
    return hyper, info
