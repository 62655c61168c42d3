"""Linear solvers over tensor dicts: conjugate gradient, Neumann series, fixed point, direct.

Implicit differentiation needs ``x`` with ``(A + δI) x = b`` where ``A`` is only available as a
matrix-vector product ``matvec(v) = A v`` (a Hessian-vector product) and ``x``, ``b`` are tensor
dicts shaped like the inner parameters. Every solver here is a small factory returning

    ``solve(matvec, b, init=None) -> (x, SolveInfo)``

* :func:`cg` — conjugate gradient for symmetric positive-definite ``A``; converges in at most
  ``n`` steps in exact arithmetic, error shrinking like ``((√κ−1)/(√κ+1))^k``. With
  ``preconditioner=M`` (``M ≈ A⁻¹``, e.g. :class:`~chronos.solver.precond.KFACPreconditioner`)
  ``κ`` becomes that of ``MA``.
* :func:`neumann` — truncated Neumann series ``x_K = x_0 + α Σ_{k<K} (I − αA)^k r_0``, i.e.
  ``A⁻¹ ≈ α Σ_k (I − αA)^k``; converges when ``0 < α < 2/λ_max(A)``.
* :func:`fixed_point` — the fixed-point map ``x ← x − α (A x − b)`` with optional heavy-ball
  momentum ``β``; with ``β = 0`` it computes exactly the Neumann partial sums.
* :func:`direct` — materializes ``A`` with ``n`` matvecs and calls ``torch.linalg.solve``;
  for small problems and as a test reference.

Convergence means ``‖b − (A + δI) x‖₂ <= max(tol · ‖b‖₂, atol)`` (relative to ``b``, like
SciPy's ``rtol`` and TorchOpt's ``rtol``). A solver that stops at ``max_iter`` returns the best
iterate it saw (CG: its last one, since CG lowers the energy ``½xᵀAx − bᵀx``, i.e. the
``A``-norm error, at every step; on breakdown the one before; the others: smallest residual),
says so in its :class:`SolveInfo` and issues one
:class:`~chronos.core.errors.ConvergenceWarning` (its text does not change between calls, so
Python's default filter shows it once per call site).

Example:
    >>> import torch
    >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> solve = cg(max_iter=10, tol=1e-12)
    >>> x, info = solve(lambda v: {"x": A @ v["x"]}, {"x": torch.tensor([1.0, 2.0],
    ...                                                               dtype=torch.float64)})
    >>> [round(float(t), 6) for t in x["x"]], info.iterations, info.converged
    ([0.090909, 0.636364], 2, True)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from chronos.core import tensordict as td
from chronos.core.errors import (
    ConfigError,
    ConvergenceWarning,
    NonFiniteError,
    ShapeMismatchError,
)
from chronos.core.tensordict import TensorDict
from chronos.solver.spectral import power_iteration, safe_step

__all__ = [
    "METHODS",
    "LinearSolver",
    "Matvec",
    "Preconditioner",
    "SolveInfo",
    "cg",
    "direct",
    "fixed_point",
    "make_solver",
    "neumann",
]

Matvec = Callable[[TensorDict], TensorDict]
"""``v -> A v`` over tensor dicts shaped like ``b``."""

Preconditioner = Callable[[TensorDict], TensorDict]
"""``r -> z ≈ A⁻¹ r`` over tensor dicts shaped like ``b`` (symmetric positive definite)."""


class LinearSolver(Protocol):
    """``solve(matvec, b, init=None) -> (x, info)``."""

    def __call__(
        self, matvec: Matvec, b: Mapping[str, Tensor], init: Mapping[str, Tensor] | None = None
    ) -> tuple[TensorDict, SolveInfo]: ...


@dataclass(frozen=True)
class SolveInfo:
    """What a linear solve did.

    Attributes:
        method: solver name.
        iterations: matrix-vector products used.
        residual: ``‖b − (A + δI) x‖₂`` of the returned ``x`` (CG: its recursively updated
            residual, equal up to rounding; with ``check_every > 1``, the last checked).
        b_norm: ``‖b‖₂``.
        converged: whether ``residual <= max(tol · b_norm, atol)``.
        status: ``"converged"``, ``"max_iter"``, ``"breakdown"`` (CG met a direction of
            non-positive curvature: ``A`` is not positive definite, add damping),
            ``"singular"`` (direct fell back to least squares) or ``"diverged"``
            (neumann / fixed_point: the residual grew, the step ``alpha`` is too large).
        initial_residual: ``‖b − (A + δI) x_0‖₂`` of the starting point (``‖b‖`` without
            ``init``): how much a warm start helped.
        alpha: the step neumann / fixed_point used (the estimated one for ``alpha="auto"``;
            status ``"diverged"``: it exceeded ``2/λ_max``); ``None`` for the other solvers.
    """

    method: str
    iterations: int
    residual: float
    b_norm: float
    converged: bool
    status: str = "converged"
    initial_residual: float = math.nan
    alpha: float | None = None

    @property
    def relative_residual(self) -> float:
        """``residual / ‖b‖`` (0 when ``b`` is zero)."""
        return self.residual / self.b_norm if self.b_norm > 0 else 0.0


# -- flat-vector plumbing -------------------------------------------------------------------------


class _Flat:
    """Maps tensor dicts with a fixed key order to one 1-d vector and back.

    Set up once per solve. With a single dtype, :meth:`unflat` returns views of the flat
    vector (no copy) and :meth:`flat` is one ``torch.cat`` (none for a single tensor).
    """

    def __init__(self, b: Mapping[str, Tensor]) -> None:
        td.check_same_structure(b, b, "b")
        if not b:
            raise ConfigError("b is empty; a linear solve needs at least one tensor")
        self.ref = b
        vec, self.spec = td.flatten(b)
        self.vec = vec.detach()  # the solvers are not differentiable
        self.keys = self.spec.keys
        self.single_dtype = len(set(self.spec.dtypes)) == 1
        self._slices: list[tuple[str, int, int, torch.Size]] = []
        offset = 0
        for k, shape in zip(self.keys, self.spec.shapes, strict=True):
            n = math.prod(shape)
            self._slices.append((k, offset, offset + n, torch.Size(shape)))
            offset += n

    def flat(self, d: Mapping[str, Tensor], what: str) -> Tensor:
        if not isinstance(d, Mapping) or d.keys() != self.ref.keys():
            td.check_same_structure(self.ref, d, f"b and {what}")
        parts = []
        for k, _, _, shape in self._slices:
            t = d[k]
            if t.shape != shape:
                raise ShapeMismatchError(
                    f"{what}[{k!r}] has shape {tuple(t.shape)}, expected {tuple(shape)} (as b)"
                )
            parts.append(t.reshape(-1))
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        if out.dtype != self.vec.dtype:
            out = out.to(self.vec.dtype)
        return out.detach()

    def unflat(self, v: Tensor) -> TensorDict:
        if self.single_dtype:
            return {k: v[lo:hi].view(shape) for k, lo, hi, shape in self._slices}
        return td.unflatten(v, self.spec)


def _check_params(max_iter: int, tol: float, atol: float, damping: float) -> None:
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ConfigError(f"max_iter must be an int >= 1, got {max_iter!r}")
    for name, value in (("tol", tol), ("atol", atol), ("damping", damping)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ConfigError(f"{name} must be a number >= 0, got {value!r}")


def _warn_not_converged(method: str, max_iter: int, tol: float, status: str) -> None:
    if status == "breakdown":
        msg = (f"{method}: the matrix is not positive definite (non-positive curvature met); "
               "returning the best iterate. Add damping (e.g. damping=1e-4) or use "
               "method='direct'; see info.residual")
    else:
        msg = (f"{method} did not reach tol={tol:g} within max_iter={max_iter}; returning the "
               "best iterate (see info.residual). Raise max_iter, loosen tol, add damping, "
               "or warm-start with init=")
    warnings.warn(ConvergenceWarning(msg), stacklevel=3)


def _wrap(flat: _Flat, matvec: Matvec, damping: float) -> Callable[[Tensor], Tensor]:
    def mv(v: Tensor) -> Tensor:
        out = flat.flat(matvec(flat.unflat(v)), "matvec(v)")
        return out.add(v, alpha=damping) if damping else out

    return mv


def _setup(
    b: Mapping[str, Tensor],
    matvec: Matvec,
    init: Mapping[str, Tensor] | None,
    damping: float,
    tol: float,
    atol: float,
) -> tuple[_Flat, Callable[[Tensor], Tensor], float, float, tuple[Tensor, Tensor, int]]:
    """What every iterative solver starts with: the flattened system, its damped matvec,
    ``‖b‖``, the stopping threshold ``max(tol·‖b‖, atol)`` and :func:`_start`'s first iterate."""
    flat = _Flat(b)
    mv = _wrap(flat, matvec, damping)
    b_norm = float(torch.linalg.vector_norm(flat.vec))
    return flat, mv, b_norm, max(tol * b_norm, atol), _start(flat, mv, init)


def _start(
    flat: _Flat, mv: Callable[[Tensor], Tensor], init: Mapping[str, Tensor] | None
) -> tuple[Tensor, Tensor, int]:
    """``(x0, r0 = b − A x0, matvecs used)``.

    A warm start ``init`` is rescaled to ``x0 = α·init`` with ``α = bᵀinit / initᵀA init``, the
    minimizer of the energy ``½xᵀAx − bᵀx`` along ``init``: for symmetric positive-definite
    ``A`` this start is never worse (in ``A``-norm error) than ``init`` itself or than zero, and
    it costs nothing extra (``A·init`` is needed for the residual anyway).
    """
    b = flat.vec
    if init is None:
        return torch.zeros_like(b), b.clone(), 0
    x0 = flat.flat(init, "init").detach().clone()
    if not bool(torch.isfinite(x0).all()):
        raise NonFiniteError("init contains NaN/Inf; pass finite values or init=None")
    ax0 = mv(x0)
    curvature = float(torch.dot(x0, ax0))
    if curvature > 0.0 and math.isfinite(curvature):
        alpha = torch.dot(b, x0) / curvature
        return alpha * x0, b - alpha * ax0, 1
    return x0, b - ax0, 1


def _finish(
    flat: _Flat, x: Tensor, info: SolveInfo, warn: bool, max_iter: int, tol: float
) -> tuple[TensorDict, SolveInfo]:
    if not info.converged and warn:
        _warn_not_converged(info.method, max_iter, tol, info.status)
    return flat.unflat(x), info


def _check_finite(value: float, method: str, iteration: int) -> None:
    if not math.isfinite(value):
        raise NonFiniteError(
            f"{method}: residual became {value} at iteration {iteration}; the matvec returned "
            "NaN/Inf (check the loss at these parameters) or the iteration diverged (for "
            "neumann/fixed_point use a smaller alpha, below 2/λ_max)"
        )


# -- solvers --------------------------------------------------------------------------------------


def cg(
    max_iter: int = 100,
    tol: float = 1e-10,
    *,
    atol: float = 0.0,
    damping: float = 0.0,
    warn: bool = True,
    preconditioner: Preconditioner | None = None,
    check_every: int = 1,
) -> LinearSolver:
    """(Preconditioned) conjugate gradient for ``(A + δI) x = b``, ``A`` symmetric positive
    (semi)definite.

    With a preconditioner ``M ≈ (A + δI)⁻¹`` (symmetric positive definite) this is PCG:
    ``z_k = M r_k``, ``α_k = r_kᵀz_k / p_kᵀAp_k``, ``x_{k+1} = x_k + α_k p_k``,
    ``r_{k+1} = r_k − α_k Ap_k``, ``p_{k+1} = z_{k+1} + (r_{k+1}ᵀz_{k+1} / r_kᵀz_k) p_k``; its
    error shrinks like ``((√κ−1)/(√κ+1))^k`` with ``κ`` the condition number of ``MA`` instead
    of ``A`` (see :mod:`chronos.solver.precond` for a Kronecker-factored one). Convergence is
    always judged on the true residual norm ``‖r‖`` (not ``rᵀMr``), so a preconditioner
    changes the cost, never the meaning of ``tol``.

    Each iteration costs one matvec (plus one preconditioner application) and a few vector
    operations on one flat buffer; the host reads one small tensor per check (the residual
    norm, plus the curvature ``pᵀAp`` and ``rᵀz`` for breakdown detection). CG decreases the
    energy ``½xᵀAx − bᵀx`` (the ``A``-norm error) at every step, so the iterate returned is the
    last one checked; on breakdown, the last one checked before it.

    Args:
        max_iter: maximum matvecs.
        tol: relative tolerance on the residual, ``‖r‖ <= tol · ‖b‖``.
        atol: absolute tolerance floor.
        damping: ``δ >= 0`` (ridge); makes a semidefinite ``A`` definite.
        warn: issue a :class:`ConvergenceWarning` when not converged.
        preconditioner: ``M(r) -> z ≈ (A + δI)⁻¹ r`` on **tensor dicts** shaped like ``b``
            (same keys and shapes; it must not modify ``r``), symmetric positive definite as
            an operator; ``None`` for plain CG. Applied once per iteration.
        check_every: read the residual (one host synchronization) every this many iterations
            (and at ``max_iter``); > 1 saves synchronizations on GPUs at the price of up to
            ``check_every − 1`` extra iterations past convergence.

    Example:
        >>> import torch
        >>> x, info = cg(damping=1.0)(lambda v: v, {"a": torch.ones(3)})  # (I + I) x = 1
        >>> x["a"].tolist(), info.iterations
        ([0.5, 0.5, 0.5], 1)
        >>> A = torch.diag(torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64))
        >>> jacobi = lambda r: {"a": r["a"] / torch.diagonal(A)}        # exact for diagonal A
        >>> x, info = cg(preconditioner=jacobi)(lambda v: {"a": A @ v["a"]},
        ...                                     {"a": torch.ones(3, dtype=torch.float64)})
        >>> x["a"].tolist(), info.iterations
        ([1.0, 0.1, 0.01], 1)
    """
    _check_params(max_iter, tol, atol, damping)
    if preconditioner is not None and not callable(preconditioner):
        raise ConfigError(
            f"preconditioner must be a callable M(r) -> z on tensor dicts shaped like b, or "
            f"None, got {type(preconditioner).__name__}"
        )
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
        raise ConfigError(f"check_every must be an int >= 1, got {check_every!r}")

    def solve(
        matvec: Matvec, b: Mapping[str, Tensor], init: Mapping[str, Tensor] | None = None
    ) -> tuple[TensorDict, SolveInfo]:
        flat, mv, b_norm, threshold, (x, r, used) = _setup(b, matvec, init, damping, tol, atol)
        rs = torch.dot(r, r)
        start = math.sqrt(_checked(float(rs), 0))
        best_x, best = x, start
        status = "converged"
        it = 0
        if start > threshold:
            status = "max_iter"
            pc = None if preconditioner is None else _wrap_preconditioner(flat, preconditioner)
            z = r if pc is None else pc(r)
            rz = rs if pc is None else torch.dot(r, z)
            if pc is not None:
                _check_preconditioner(float(rz), 0)
            p = z
            low_pap: Tensor | None = None  # min pᵀAp (and rᵀz) since the last check
            low_rz: Tensor | None = None
            while it < max_iter:
                ap = mv(p)
                it += 1
                pap = torch.dot(p, ap)
                alpha = rz / pap
                x = torch.addcmul(x, alpha, p)
                r = torch.addcmul(r, alpha, ap, value=-1.0)
                rs = torch.dot(r, r)
                if pc is None:
                    z, rz_new = r, rs
                else:
                    z = pc(r)
                    rz_new = torch.dot(r, z)
                if check_every > 1:
                    low_pap = pap if low_pap is None else torch.minimum(low_pap, pap)
                    if pc is not None:
                        low_rz = rz_new if low_rz is None else torch.minimum(low_rz, rz_new)
                else:
                    low_pap, low_rz = pap, rz_new
                if it % check_every == 0 or it == max_iter:
                    parts = [rs, pap if low_pap is None else low_pap]
                    if pc is not None:
                        parts.append(rz_new if low_rz is None else low_rz)
                    read = torch.stack(parts).tolist()
                    low_pap = low_rz = None
                    _check_finite(read[1], "cg", it)
                    if read[1] <= 0.0:
                        status = "breakdown"  # keep the last checked iterate
                        break
                    rs_f = _checked(read[0], it)
                    best_x, best = x, math.sqrt(rs_f)
                    if best <= threshold:
                        break
                    if pc is not None:
                        _check_preconditioner(read[2], it)
                p = torch.addcmul(z, rz_new / rz, p)
                rz = rz_new
        converged = best <= threshold
        info = SolveInfo("cg", it + used, best, b_norm, converged,
                         "converged" if converged else status, start)
        return _finish(flat, best_x, info, warn, max_iter, tol)

    return solve


def _checked(rs: float, iteration: int) -> float:
    _check_finite(rs, "cg", iteration)
    return rs


def _wrap_preconditioner(flat: _Flat, precond: Preconditioner) -> Callable[[Tensor], Tensor]:
    def apply(r: Tensor) -> Tensor:
        return flat.flat(precond(flat.unflat(r)), "preconditioner(r)")

    return apply


def _check_preconditioner(rz: float, iteration: int) -> None:
    if not math.isfinite(rz):
        raise NonFiniteError(
            f"cg: the preconditioner returned NaN/Inf at iteration {iteration}; check its "
            "factors (damping > 0 keeps them invertible)"
        )
    if rz <= 0.0:
        raise ConfigError(
            f"cg: the preconditioner is not positive definite (rᵀM(r) = {rz:.3g} <= 0 at "
            f"iteration {iteration}); M must approximate (A + δI)⁻¹ and be symmetric positive "
            "definite, e.g. add damping to its factors"
        )


_DIVERGE_FACTOR = 1e3
"""A Richardson residual above this multiple of its starting value means divergence."""
_RISE_STREAK = 5
_RISE_FACTOR = 10.0
"""Without momentum (where a convergent residual never grows, for symmetric ``A``): this many
consecutive increases ending this far above the best residual also mean divergence."""
_MAX_REESTIMATES = 2
"""``alpha="auto"``: how often a solve may re-estimate ``λ_max`` after diverging."""


def _check_alpha(alpha: object) -> None:
    if isinstance(alpha, str):
        if alpha != "auto":
            raise ConfigError(
                f"alpha must be 'auto' (estimate λ_max by power iteration) or a number > 0 "
                f"below 2/λ_max(A), got {alpha!r}"
            )
    elif (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
          or not 0 < alpha < math.inf):
        raise ConfigError(
            f"alpha must be 'auto' (estimate λ_max by power iteration) or a finite number > 0 "
            f"below 2/λ_max(A), got {alpha!r}"
        )


def _diverging(rnorm: float, start: float, best: float, rising: int, momentum: float) -> bool:
    if rnorm > _DIVERGE_FACTOR * start:
        return True
    return not momentum and rising >= _RISE_STREAK and rnorm > _RISE_FACTOR * best


def _warn_diverged(
    name: str, alpha: float, momentum: float, curvature: float, it: int, growth: float,
    auto: bool,
) -> None:
    bound = "2(1+momentum)/λ_max" if momentum else "2/λ_max"
    limit = 2.0 * (1.0 + momentum)
    if curvature < 0:
        msg = (f"{name} diverged at iteration {it} (residual {growth:.3g}× the initial): it "
               f"met negative curvature (vᵀAv/vᵀv ≈ {curvature:.3g}), so A is not positive "
               f"definite and no step alpha converges. Add damping (above {-curvature:.3g}) "
               "or use method='direct'; returning the best iterate (see info.residual)")
    else:
        lam = f"λ_max >= {curvature:.4g}, so {bound} <= {limit / curvature:.4g}" if (
            curvature > 0) else "λ_max unknown"
        how = ("alpha='auto' still diverged after re-estimating λ_max (is A symmetric?); use "
               if auto else "Use alpha='auto' (estimates λ_max by power iteration), ")
        msg = (f"{name} diverged at iteration {it} (residual {growth:.3g}× the initial): the "
               f"step alpha={alpha:.4g} exceeds {bound} ({lam}). {how}a smaller alpha, or "
               "method='cg'; returning the best iterate (see info.residual)")
    warnings.warn(ConvergenceWarning(msg), stacklevel=3)


def _richardson(
    name: str,
    alpha: float | str,
    momentum: float,
    max_iter: int,
    tol: float,
    atol: float,
    damping: float,
    warn: bool,
) -> LinearSolver:
    _check_params(max_iter, tol, atol, damping)
    _check_alpha(alpha)
    if (isinstance(momentum, bool) or not isinstance(momentum, (int, float))
            or not 0.0 <= momentum < 1.0):
        raise ConfigError(f"momentum must be a number in [0, 1), got {momentum!r}")
    auto = isinstance(alpha, str)
    fixed_alpha = 0.0 if isinstance(alpha, str) else float(alpha)
    # alpha="auto": the step from the last λ_max estimate, kept by this solver (the closure)
    # for later solves of a system of the same size/dtype/device; replaced when a solve
    # diverges with it.
    cache: dict[tuple[int, torch.dtype, torch.device], float] = {}

    def estimate(mv: Callable[[Tensor], Tensor], like: Tensor, start: Tensor | None) -> (
            tuple[float, int]):
        est = power_iteration(mv, like, start=start)
        return safe_step(est.value), est.matvecs

    def solve(
        matvec: Matvec, b: Mapping[str, Tensor], init: Mapping[str, Tensor] | None = None
    ) -> tuple[TensorDict, SolveInfo]:
        flat, mv, b_norm, threshold, (x, r, used) = _setup(b, matvec, init, damping, tol, atol)
        key = (flat.vec.numel(), flat.vec.dtype, flat.vec.device)
        step_alpha: float | None = cache.get(key) if auto else fixed_alpha
        rnorm = float(torch.linalg.vector_norm(r))
        _check_finite(rnorm, name, 0)
        best_x, best_r, best, start = x, r, rnorm, rnorm
        velocity = torch.zeros_like(x)
        it = setup = rising = reestimates = 0
        status = "max_iter"
        while rnorm > threshold and it < max_iter:
            if step_alpha is None:  # alpha="auto", first solve of this size: power iteration
                step_alpha, spent = estimate(mv, flat.vec, None)
                setup += spent
                cache[key] = step_alpha
            # x_{k+1} = x_k + α r_k + β (x_k − x_{k−1});  r_{k+1} = b − A x_{k+1}
            step = step_alpha * r + momentum * velocity if momentum else step_alpha * r
            ar_step = mv(step)
            it += 1
            x = x + step
            r = r - ar_step
            velocity = step
            previous, rnorm = rnorm, float(torch.linalg.vector_norm(r))
            _check_finite(rnorm, name, it)
            if rnorm < best:
                best_x, best_r, best = x, r, rnorm
            rising = rising + 1 if rnorm > previous else 0
            if not _diverging(rnorm, start, best, rising, momentum):
                continue
            if auto and reestimates < _MAX_REESTIMATES:
                # The diverging residual is dominated by the eigenvectors the step was too
                # large for: the best possible start for power iteration. Restart from the
                # best iterate with the new (and at least halved) step.
                new_alpha, spent = estimate(mv, flat.vec, r)
                setup += spent
                reestimates += 1
                step_alpha = cache[key] = min(new_alpha, step_alpha / 2)
                x, r, rnorm = best_x, best_r, best
                velocity = torch.zeros_like(x)
                rising = 0
                continue
            status = "diverged"
            if warn:
                # vᵀAv/vᵀv of the last step, dominated by the diverging direction: a lower
                # bound on λ_max for symmetric A (free: A·step is at hand)
                sq = float(torch.dot(step, step))
                curvature = float(torch.dot(step, ar_step)) / sq if sq > 0 else 0.0
                _warn_diverged(name, step_alpha, momentum, curvature, it, rnorm / start, auto)
            break
        converged = best <= threshold
        info = SolveInfo(name, it + used + setup, best, b_norm, converged,
                         "converged" if converged else status, start, alpha=step_alpha)
        return _finish(flat, best_x, info, warn and status != "diverged", max_iter, tol)

    return solve


def neumann(
    alpha: float | str = "auto",
    max_iter: int = 100,
    tol: float = 1e-10,
    *,
    atol: float = 0.0,
    damping: float = 0.0,
    warn: bool = True,
) -> LinearSolver:
    """Truncated Neumann series ``x = x_0 + α Σ_{k=0}^{K−1} (I − αA)^k (b − A x_0)``.

    ``A⁻¹ = α Σ_k (I − αA)^k`` when the spectral radius of ``I − αA`` is below one, i.e.
    ``0 < α < 2/λ_max(A)``; ``K`` terms leave the residual ``(I − αA)^K r_0``. Each term costs
    one matvec; the residual comes for free (it is the next term).

    Args:
        alpha: the step ``α``, or ``"auto"`` (default): ``α = 1/λ̂`` with ``λ̂`` from a few
            power iterations on ``A + δI`` (:mod:`chronos.solver.spectral`; at most
            :data:`~chronos.solver.spectral.DEFAULT_POWER_ITERS` matvecs, counted in
            ``info.iterations``), safe while ``λ̂ > λ_max/2``. The step is cached by the
            returned solver and reused by its later solves of a system of the same size, so
            build the solver once and call it each outer step; a solve that diverges with it
            re-estimates (from the diverging residual) and retries from its best iterate. (A
            step cached for a larger ``λ_max`` than today's is safe, only slower: build a new
            solver when the operator changes a lot.) ``info.alpha`` reports the step used.
        max_iter: maximum number of terms (matvecs, not counting the power iteration).
        tol, atol: stop when ``‖r‖ <= max(tol·‖b‖, atol)``.
        damping: ``δ >= 0`` added to ``A``.
        warn: issue a :class:`ConvergenceWarning` when not converged.

    A residual that grows (more than 1000× its start, or — the residual of a convergent
    Neumann series never grows — 5 times in a row to 10× its best) stops the solve with status
    ``"diverged"``: ``α`` is above ``2/λ_max``, and the warning says so (more iterations would
    not help).

    Example:
        >>> import torch
        >>> x, info = neumann(alpha=0.5, max_iter=60, tol=1e-12)(lambda v: v, {"a": torch.ones(2)})
        >>> x["a"].tolist(), info.converged
        ([1.0, 1.0], True)
        >>> A = torch.diag(torch.tensor([2.7, 1.0, 0.3], dtype=torch.float64))  # 2/λ_max < 1
        >>> x, info = neumann(max_iter=200)(lambda v: {"a": A @ v["a"]},
        ...                                 {"a": torch.ones(3, dtype=torch.float64)})
        >>> [round(float(t), 6) for t in x["a"]], info.converged, round(info.alpha, 3)
        ([0.37037, 1.0, 3.333333], True, 0.37)
    """
    return _richardson("neumann", alpha, 0.0, max_iter, tol, atol, damping, warn)


def fixed_point(
    alpha: float | str = "auto",
    max_iter: int = 100,
    tol: float = 1e-10,
    *,
    momentum: float = 0.0,
    atol: float = 0.0,
    damping: float = 0.0,
    warn: bool = True,
) -> LinearSolver:
    """Fixed-point iteration ``x ← x − α ((A + δI) x − b) + β (x − x_prev)``.

    This is gradient descent on ``½ xᵀAx − bᵀx`` (heavy ball when ``β = momentum > 0``). With
    ``β = 0`` its iterates equal :func:`neumann`'s partial sums; for ``A`` with eigenvalues in
    ``[μ, L]``, ``α = 4/(√L + √μ)²`` and ``β = ((√κ − 1)/(√κ + 1))²`` give CG-like rates.
    It converges for ``0 < αλ < 2(1 + β)`` over ``A``'s eigenvalues ``λ``.

    ``alpha="auto"`` (default), divergence detection and the other options are as in
    :func:`neumann` (with momentum, only a residual above 1000× its start counts as
    divergence: heavy-ball residuals oscillate). ``momentum`` is never chosen
    automatically: the good value needs ``λ_min`` too, which power iteration does not give.

    Example:
        >>> import torch
        >>> A = torch.diag(torch.tensor([1.0, 10.0], dtype=torch.float64))
        >>> x, info = fixed_point(alpha=0.18, momentum=0.27, max_iter=200, tol=1e-10)(
        ...     lambda v: {"a": A @ v["a"]}, {"a": torch.ones(2, dtype=torch.float64)})
        >>> [round(float(t), 6) for t in x["a"]], info.converged
        ([1.0, 0.1], True)
    """
    return _richardson("fixed_point", alpha, momentum, max_iter, tol, atol, damping, warn)


def direct(
    damping: float = 0.0,
    *,
    max_size: int = 4096,
    tol: float = 1e-10,
    atol: float = 0.0,
    warn: bool = True,
) -> LinearSolver:
    """Materialize ``A`` (``n`` matvecs, ``n`` = total size of ``b``) and solve densely.

    Falls back to least squares (minimum-norm solution, status ``"singular"``) when
    ``A + δI`` is singular. ``max_size`` guards against materializing a huge matrix.

    Example:
        >>> import torch
        >>> x, info = direct()(lambda v: {"a": 2 * v["a"]}, {"a": torch.ones(3)})
        >>> x["a"].tolist(), info.iterations
        ([0.5, 0.5, 0.5], 3)
    """
    _check_params(1, tol, atol, damping)
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
        raise ConfigError(f"max_size must be an int >= 1, got {max_size!r}")

    def solve(
        matvec: Matvec, b: Mapping[str, Tensor], init: Mapping[str, Tensor] | None = None
    ) -> tuple[TensorDict, SolveInfo]:
        del init  # a dense solve needs no starting point
        flat = _Flat(b)
        n = flat.vec.numel()
        if n > max_size:
            raise ConfigError(
                f"direct would materialize a {n}x{n} matrix (max_size={max_size}); use "
                "method='cg' for large problems or raise max_size"
            )
        mv = _wrap(flat, matvec, damping)
        eye = torch.eye(n, dtype=flat.vec.dtype, device=flat.vec.device)
        a = torch.stack([mv(eye[i]) for i in range(n)], dim=1)
        if not bool(torch.isfinite(a).all()):
            raise NonFiniteError("direct: the materialized matrix has NaN/Inf entries")
        bvec = flat.vec
        status = "converged"
        try:
            x = torch.linalg.solve(a, bvec)
        except RuntimeError:  # torch.linalg.LinAlgError derives from RuntimeError
            x = torch.linalg.lstsq(a, bvec.unsqueeze(1), driver="gelsd").solution.squeeze(1)
            status = "singular"
        if not bool(torch.isfinite(x).all()):
            x = torch.linalg.lstsq(a, bvec.unsqueeze(1), driver="gelsd").solution.squeeze(1)
            status = "singular"
        b_norm = float(torch.linalg.vector_norm(bvec))
        residual = float(torch.linalg.vector_norm(bvec - a @ x))
        converged = residual <= max(tol * b_norm, atol) or status == "converged"
        info = SolveInfo("direct", n, residual, b_norm, converged, status, b_norm)
        return _finish(flat, x, info, warn and status != "converged", 1, tol)

    return solve


METHODS: dict[str, Callable[..., LinearSolver]] = {
    "cg": cg,
    "neumann": neumann,
    "fixed_point": fixed_point,
    "direct": direct,
}
"""Solver factories by name."""


def make_solver(method: str | LinearSolver, **kwargs: Any) -> LinearSolver:
    """A solver from its name (``"cg"``, ``"neumann"``, ``"fixed_point"``, ``"direct"``) and
    keyword options, or a ready ``solve`` callable passed through unchanged.

    Example:
        >>> make_solver("neumann", alpha=0.1, max_iter=5) is not None
        True
    """
    if callable(method) and not isinstance(method, str):
        if kwargs:
            raise ConfigError(
                f"solver options {sorted(kwargs)} cannot be applied to a ready solve callable; "
                "configure the callable itself or pass a method name"
            )
        return method
    if method not in METHODS:
        raise ConfigError(
            f"unknown linear solver {method!r}; use one of {sorted(METHODS)} or a callable "
            "solve(matvec, b, init=None) -> (x, SolveInfo)"
        )
    try:
        return METHODS[method](**kwargs)
    except TypeError as e:
        raise ConfigError(f"bad options for {method!r}: {e}") from None
