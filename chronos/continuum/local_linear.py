"""The distance-weighted local linear model of :class:`~chronos.continuum.ContinuumMemory`:
:func:`local_linear_fit` and :class:`LocalLinearModel` (a pure function, float64).

For neighbours ``x_i ∈ R^D`` with values ``g_i ∈ R^P`` at distances ``d_i`` from the query
``q``: weights ``w_i ∝ 1/(d_i + ε)`` with ``ε = 10⁻¹²·(1 + mean d)`` (all positive, normalized
to ``Σw = 1``, so no sum can vanish or change sign); weighted means ``x̄, ḡ``; ``J`` the
minimum-norm weighted least-squares solution of ``g_i − ḡ ≈ J(x_i − x̄)``, from the SVD
``W^{1/2}(X − x̄) = U S Vᵀ`` with singular values below ``rcond·s_max`` dropped:
``J = (W^{1/2}(G − ḡ))ᵀ U S⁻¹ Vᵀ``; prediction ``ĝ(q) = ḡ − J(x̄ − q)``.

* Exact on a linear field ``g(x) = g₀ + Ax`` whenever ``q`` lies in the affine hull of the
  ``x_i`` (always when ``k > D`` and the points are in general position): then
  ``J(x̄ − q) = A(x̄ − q)``.
* Outside that hull the minimum-norm ``J`` is zero along directions the neighbours do not
  span: the model extrapolates as if ``g`` were constant along them (it predicts ``g`` at the
  projection of ``q`` on the hull).
* A neighbour at distance ``≤ ε`` makes ``ĝ(q)`` the plain mean of the values at that
  distance; one neighbour predicts its own value (and ``J = 0``).
* If the result is not finite, ``ĝ(q)`` is the nearest neighbour's value and ``J = 0``.

Example:
    >>> import torch
    >>> x = torch.tensor([[0.0], [1.0], [2.0]], dtype=torch.float64)
    >>> m = local_linear_fit(x, 3 * x + 1, torch.tensor([1.5], dtype=torch.float64),
    ...                      torch.tensor([1.5, 0.5, 0.5], dtype=torch.float64))
    >>> round(float(m.value[0]), 6), round(float(m.jvp(torch.ones(1, dtype=torch.float64))), 6)
    (5.5, 3.0)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LocalLinearModel", "local_linear_fit"]

_F64 = torch.float64


@dataclass(frozen=True)
class LocalLinearModel:
    """``g(x) ≈ value + J(x − q)`` around a query ``q`` (see the module doc).

    ``J = left @ right.T`` is kept factored (``[P, r]`` and ``[D, r]``, ``r ≤ k``).
    """

    value: Tensor
    left: Tensor
    right: Tensor

    def jvp(self, v: Tensor) -> Tensor:
        """``J·v`` for a λ-space vector ``v`` (``[D]``, float64)."""
        return self.left @ (self.right.T @ v)


def local_linear_fit(
    x: Tensor, g: Tensor, q: Tensor, dist: Tensor, rcond: float = 1e-10
) -> LocalLinearModel:
    """Fit the model of the module doc around ``q``, in float64.

    Args:
        x: the neighbours, ``[k, D]``.
        g: their values, ``[k, P]``.
        q: the query, ``[D]``.
        dist: their distances to ``q``, ``[k]`` (``>= 0``).
        rcond: singular values below ``rcond·s_max`` are dropped.
    """
    x, g, q, dist = x.to(_F64), g.to(_F64), q.to(_F64), dist.to(_F64)
    k, p = g.shape
    zero_j = LocalLinearModel(g[0], torch.zeros(p, 0, dtype=_F64), torch.zeros(x.shape[1], 0,
                                                                               dtype=_F64))
    if k == 1:
        return zero_j
    scale = 1.0 + float(dist.mean())
    eps = 1e-12 * scale
    w = 1.0 / (dist + eps)
    w = w / w.sum()
    xbar, gbar = w @ x, w @ g
    sw = w.sqrt()[:, None]
    try:
        u, s, vh = torch.linalg.svd(sw * (x - xbar), full_matrices=False)
    except RuntimeError:  # pragma: no cover - LAPACK did not converge
        return zero_j
    keep = s > rcond * s.max() if float(s.max()) > 0 else torch.zeros_like(s, dtype=torch.bool)
    left = (sw * (g - gbar)).T @ (u[:, keep] / s[keep])
    right = vh[keep].T
    at_zero = dist <= eps
    if bool(at_zero.any()):
        value = g[at_zero].mean(0)
    else:
        value = gbar - left @ (right.T @ (xbar - q))
    if not (bool(torch.isfinite(value).all()) and bool(torch.isfinite(left).all())):
        return LocalLinearModel(g[int(torch.argmin(dist))], zero_j.left, zero_j.right)
    return LocalLinearModel(value, left, right)
