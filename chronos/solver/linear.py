"""Linear solvers over tensor dicts: conjugate gradient, Neumann series, fixed point, direct.

Implicit differentiation needs ``x`` with ``(A + δI) x = b`` where ``A`` is only available as a
matrix-vector product ``matvec(v) = A v`` (a Hessian-vector product) and ``x``, ``b`` are tensor
dicts shaped like the inner parameters. Every solver here is a small factory returning

    ``solve(matvec, b, init=None) -> (x, SolveInfo)``

* :func:`cg` — conjugate gradient for symmetric positive-definite ``A``; converges in at most
  ``n`` steps in exact arithmetic, error shrinking like ``((√κ−1)/(√κ+1))^k``.
* :func:`neumann` — truncated Neumann series ``x_K = x_0 + α Σ_{k<K} (I − αA)^k r_0``, i.e.
  ``A⁻¹ ≈ α Σ_k (I − αA)^k``; converges when ``0 < α < 2/λ_max(A)``.
* :func:`fixed_point` — the fixed-point map ``x ← x − α (A x − b)`` with optional heavy-ball
  momentum ``β``; with ``β = 0`` it computes exactly the Neumann partial sums.
* :func:`direct` — materializes ``A`` with ``n`` matvecs and calls ``torch.linalg.solve``;
  for small problems and as a test reference.

Convergence means ``‖b − (A + δI) x‖₂ <= max(tol · ‖b‖₂, atol)`` (relative to ``b``, like
SciPy's ``rtol`` and TorchOpt's ``rtol``). A solver that stops at ``max_iter`` returns the best
iterate it saw (CG: lowest energy ``½xᵀAx − bᵀx``, i.e. smallest ``A``-norm error, which is
what CG minimizes; the others: smallest residual), says so in its :class:`SolveInfo` and
issues one
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

__all__ = [
    "METHODS",
    "LinearSolver",
    "Matvec",
    "SolveInfo",
    "cg",
    "direct",
    "fixed_point",
    "make_solver",
    "neumann",
]

Matvec = Callable[[TensorDict], TensorDict]
"""``v -> A v`` over tensor dicts shaped like ``b``."""


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
            residual, equal up to rounding).
        b_norm: ``‖b‖₂``.
        converged: whether ``residual <= max(tol · b_norm, atol)``.
        status: ``"converged"``, ``"max_iter"``, ``"breakdown"`` (CG met a direction of
            non-positive curvature: ``A`` is not positive definite, add damping) or
            ``"singular"`` (direct fell back to least squares).
        initial_residual: ``‖b − (A + δI) x_0‖₂`` of the starting point (``‖b‖`` without
            ``init``): how much a warm start helped.
    """

    method: str
    iterations: int
    residual: float
    b_norm: float
    converged: bool
    status: str = "converged"
    initial_residual: float = math.nan

    @property
    def relative_residual(self) -> float:
        """``residual / ‖b‖`` (0 when ``b`` is zero)."""
        return self.residual / self.b_norm if self.b_norm > 0 else 0.0


# -- flat-vector plumbing -------------------------------------------------------------------------


class _Flat:
    """Maps tensor dicts with a fixed key order to one 1-d vector and back (views, no copies)."""

    def __init__(self, b: Mapping[str, Tensor]) -> None:
        td.check_same_structure(b, b, "b")
        if not b:
            raise ConfigError("b is empty; a linear solve needs at least one tensor")
        self.ref = b
        vec, self.spec = td.flatten(b)
        self.vec = vec.detach()  # the solvers are not differentiable
        self.keys = self.spec.keys
        self.single_dtype = len(set(self.spec.dtypes)) == 1

    def flat(self, d: Mapping[str, Tensor], what: str) -> Tensor:
        if not isinstance(d, Mapping) or d.keys() != self.ref.keys():
            td.check_same_structure(self.ref, d, f"b and {what}")
        parts = []
        for k, shape in zip(self.keys, self.spec.shapes, strict=True):
            t = d[k]
            if t.shape != shape:
                raise ShapeMismatchError(
                    f"{what}[{k!r}] has shape {tuple(t.shape)}, expected {tuple(shape)} (as b)"
                )
            parts.append(t.reshape(-1))
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out.detach().to(self.vec.dtype)

    def unflat(self, v: Tensor) -> TensorDict:
        if self.single_dtype:
            out, offset = {}, 0
            for k, shape in zip(self.keys, self.spec.shapes, strict=True):
                n = math.prod(shape)
                out[k] = v[offset : offset + n].view(shape)
                offset += n
            return out
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
) -> LinearSolver:
    """Conjugate gradient for ``(A + δI) x = b`` with ``A`` symmetric positive (semi)definite.

    Args:
        max_iter: maximum matvecs.
        tol: relative tolerance on the residual, ``‖r‖ <= tol · ‖b‖``.
        atol: absolute tolerance floor.
        damping: ``δ >= 0`` (ridge); makes a semidefinite ``A`` definite.
        warn: issue a :class:`ConvergenceWarning` when not converged.

    Example:
        >>> import torch
        >>> x, info = cg(damping=1.0)(lambda v: v, {"a": torch.ones(3)})  # (I + I) x = 1
        >>> x["a"].tolist(), info.iterations
        ([0.5, 0.5, 0.5], 1)
    """
    _check_params(max_iter, tol, atol, damping)

    def solve(
        matvec: Matvec, b: Mapping[str, Tensor], init: Mapping[str, Tensor] | None = None
    ) -> tuple[TensorDict, SolveInfo]:
        flat, mv, b_norm, threshold, (x, r, used) = _setup(b, matvec, init, damping, tol, atol)
        bvec = flat.vec
        rs = torch.dot(r, r)
        rs_f = float(rs)
        _check_finite(rs_f, "cg", 0)
        # Best iterate = lowest energy φ(x) = ½xᵀAx − bᵀx = −½ xᵀ(b + r), i.e. the smallest
        # A-norm error: the quantity CG minimizes (its residual need not decrease).
        best_x, best, best_phi = x, math.sqrt(rs_f), float(-0.5 * torch.dot(x, bvec + r))
        start = best
        p = r.clone()
        status = "max_iter"
        it = 0
        while math.sqrt(rs_f) > threshold and it < max_iter:
            ap = mv(p)
            it += 1
            pap = torch.dot(p, ap)
            pap_f = float(pap)
            _check_finite(pap_f, "cg", it)
            if pap_f <= 0.0:
                status = "breakdown"
                break
            alpha = rs / pap
            x = x + alpha * p
            r = r - alpha * ap
            rs_new = torch.dot(r, r)
            rs_f = float(rs_new)
            _check_finite(rs_f, "cg", it)
            phi = float(-0.5 * torch.dot(x, bvec + r))
            if phi <= best_phi or math.sqrt(rs_f) <= threshold:
                best_x, best, best_phi = x, math.sqrt(rs_f), phi
            p = r + (rs_new / rs) * p
            rs = rs_new
        converged = best <= threshold
        info = SolveInfo("cg", it + used, best, b_norm, converged,
                         "converged" if converged else status, start)
        return _finish(flat, best_x, info, warn, max_iter, tol)

    return solve


def _richardson(
    name: str,
    alpha: float,
    momentum: float,
    max_iter: int,
    tol: float,
    atol: float,
    damping: float,
    warn: bool,
) -> LinearSolver:
    _check_params(max_iter, tol, atol, damping)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ConfigError(f"alpha must be a number > 0 (below 2/λ_max(A)), got {alpha!r}")
    if not 0.0 <= momentum < 1.0:
        raise ConfigError(f"momentum must be in [0, 1), got {momentum!r}")

    def solve(
        matvec: Matvec, b: Mapping[str, Tensor], init: Mapping[str, Tensor] | None = None
    ) -> tuple[TensorDict, SolveInfo]:
        flat, mv, b_norm, threshold, (x, r, used) = _setup(b, matvec, init, damping, tol, atol)
        rnorm = float(torch.linalg.vector_norm(r))
        _check_finite(rnorm, name, 0)
        best_x, best, start = x, rnorm, rnorm
        velocity = torch.zeros_like(x)
        it = 0
        while rnorm > threshold and it < max_iter:
            # x_{k+1} = x_k + α r_k + β (x_k − x_{k−1});  r_{k+1} = b − A x_{k+1}
            step = alpha * r + momentum * velocity if momentum else alpha * r
            ar_step = mv(step)
            it += 1
            x = x + step
            r = r - ar_step
            velocity = step
            rnorm = float(torch.linalg.vector_norm(r))
            _check_finite(rnorm, name, it)
            if rnorm < best:
                best_x, best = x, rnorm
        converged = best <= threshold
        info = SolveInfo(name, it + used, best, b_norm, converged,
                         "converged" if converged else "max_iter", start)
        return _finish(flat, best_x, info, warn, max_iter, tol)

    return solve


def neumann(
    alpha: float = 1.0,
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

    Example:
        >>> import torch
        >>> x, info = neumann(alpha=0.5, max_iter=60, tol=1e-12)(lambda v: v, {"a": torch.ones(2)})
        >>> x["a"].tolist(), info.converged
        ([1.0, 1.0], True)
    """
    return _richardson("neumann", alpha, 0.0, max_iter, tol, atol, damping, warn)


def fixed_point(
    alpha: float = 1.0,
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
