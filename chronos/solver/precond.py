"""Kronecker-factored (K-FAC) preconditioner for linear layers with softmax / squared outputs.

Model: logits ``Z = X W + 1bᵀ`` (``X`` n×d, ``W`` d×c, ``b`` c), inner loss

    ``f(W, b) = (1/n) Σ_i w_i ℓ(z_i, y_i) + ½ Σ_j r_j ‖Θ_j‖²``,   ``Θ = [W; bᵀ]`` ((d+1)×c)

with per-sample weights ``w_i >= 0``, ``ℓ`` softmax cross-entropy, squared error
``½‖z − y‖²`` or (``c = 1``) logistic loss, and a ridge ``r_j`` per row of ``Θ`` (``reg`` for
the rows of ``W`` — a number or one per input feature — and ``bias_reg`` for ``b``). With
``x̃_i = (x_i, 1)`` and ``H_i = ∇²_z ℓ(z_i)`` (softmax: ``diag(p_i) − p_i p_iᵀ``) the Hessian
acts on ``V`` ((d+1)×c) as

    ``H[V] = (1/n) Σ_i w_i x̃_i x̃_iᵀ V H_i + diag(r) V``.

K-FAC replaces the sum of Kronecker products by one product. With ``t_i = tr(H_i)/c``:

    ``A = (1/n) Σ_i w_i t_i x̃_i x̃_iᵀ``,   ``G = Σ_i w_i H_i / Σ_i w_i t_i``,
    ``K[V] = A V G + diag(r + δ) V``,

which is exact whenever every ``H_i`` is a multiple of one matrix (squared error, any single
output, ``G`` constant). ``K`` is inverted exactly, damping included: with
``S = diag(r + δ)^{-1/2}``, ``S A S = Q diag(μ) Qᵀ``, ``G = U diag(γ) Uᵀ`` and ``B = S Q``,

    ``K⁻¹[R] = B ((Bᵀ R U) ⊘ (μ γᵀ + 1)) Uᵀ``,

so one application costs two (d+1)×(d+1)×c products (plus c×c ones). Building the factors
costs one weighted ``X̃ᵀ X̃`` and one symmetric eigendecomposition of size d+1; they stay
valid as a preconditioner when θ and w drift (CG's answer does not depend on it, only its
iteration count), so build once and :meth:`KFACPreconditioner.update` every few outer steps.

Example (squared loss, one output: the Hessian is exactly Kronecker, CG needs 1 step):
    >>> import torch
    >>> from chronos.solver import cg
    >>> g = torch.Generator().manual_seed(0)
    >>> X = torch.randn(50, 4, generator=g, dtype=torch.float64)
    >>> params = {"W": torch.zeros(4, 1, dtype=torch.float64),
    ...           "b": torch.zeros(1, dtype=torch.float64)}
    >>> pc = KFACPreconditioner.linear(X, params, loss="squared", reg=0.1)
    >>> Xt = torch.cat([X, torch.ones(50, 1, dtype=torch.float64)], 1)
    >>> H = Xt.T @ Xt / 50 + 0.1 * torch.eye(5, dtype=torch.float64)
    >>> def hvp(v):
    ...     out = H @ torch.cat([v["W"], v["b"][None]])
    ...     return {"W": out[:4], "b": out[4]}
    >>> rhs = {"W": torch.ones(4, 1, dtype=torch.float64), "b": torch.ones(1, dtype=torch.float64)}
    >>> x, info = cg(tol=1e-12, preconditioner=pc)(hvp, rhs)
    >>> info.iterations
    1
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, cast

import torch
from torch import Tensor

from chronos.core.errors import ConfigError, NonFiniteError, ShapeMismatchError
from chronos.core.tensordict import TensorDict

__all__ = ["LOSSES", "KFACPreconditioner"]

LOSSES = ("cross_entropy", "squared", "logistic")
"""Output losses :class:`KFACPreconditioner` knows the curvature of."""

Loss = Literal["cross_entropy", "squared", "logistic"]


def _number_or_vector(value: float | Tensor, size: int, what: str, like: Tensor) -> Tensor:
    if isinstance(value, Tensor):
        t = value.detach().to(dtype=like.dtype, device=like.device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(size)
        elif t.numel() != size:
            raise ShapeMismatchError(
                f"{what} must be a number or have one entry per input feature ({size}), got "
                f"shape {tuple(value.shape)}"
            )
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        t = torch.full((size,), float(value), dtype=like.dtype, device=like.device)
    else:
        raise ConfigError(f"{what} must be a number or a tensor, got {type(value).__name__}")
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise ConfigError(f"{what} must be finite and >= 0")
    return t


def _eigh(m: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric eigendecomposition in ``m``'s dtype, retried in float64 when LAPACK fails
    (float32 on a rank-deficient matrix with many repeated eigenvalues can)."""
    m = 0.5 * (m + m.t())
    try:
        return cast(tuple[Tensor, Tensor], tuple(torch.linalg.eigh(m)))
    except RuntimeError:  # torch.linalg.LinAlgError derives from RuntimeError
        if m.dtype == torch.float64:
            raise
        vals, vecs = torch.linalg.eigh(m.double())
        return vals.to(m.dtype), vecs.to(m.dtype)


class KFACPreconditioner:
    """``M(r) ≈ H⁻¹ r`` for one linear layer; see the module docstring for the math.

    Build it with :meth:`linear` (or :meth:`linear_softmax`), pass it as
    ``preconditioner=`` to :func:`~chronos.solver.linear.cg` or
    :func:`~chronos.solver.implicit.implicit_hypergradient`, and refresh its factors with
    :meth:`update` every few outer steps. Calling it maps a tensor dict ``{weight: (d, c),
    bias: (c,)}`` (the layout of the params it was built from) to one of the same shapes.

    Attributes:
        updates: how many times the factors were computed.
    """

    def __init__(
        self,
        x: Tensor,
        params: Mapping[str, Tensor],
        *,
        loss: Loss = "cross_entropy",
        targets: Tensor | None = None,
        sample_weights: Tensor | None = None,
        reg: float | Tensor = 0.0,
        bias_reg: float | Tensor | None = None,
        damping: float = 0.0,
        weight: str = "W",
        bias: str | None = "b",
        transposed: bool = False,
        reduction: Literal["mean", "sum"] = "mean",
    ) -> None:
        del targets  # the curvature of these losses does not depend on the labels
        if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
            raise ConfigError(
                "x must be a 2-d floating-point tensor of inputs (n samples × d features), got "
                + (f"shape {tuple(x.shape)}, dtype {x.dtype}" if isinstance(x, Tensor)
                   else type(x).__name__)
            )
        if loss not in LOSSES:
            raise ConfigError(f"loss must be one of {LOSSES}, got {loss!r}")
        if reduction not in ("mean", "sum"):
            raise ConfigError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping >= 0:
            raise ConfigError(f"damping must be a number >= 0, got {damping!r}")
        self.x = x.detach()
        self.loss = loss
        self.weight, self.bias, self.transposed = weight, bias, transposed
        self.reduction = reduction
        self.damping = float(damping)
        self.n, self.d = self.x.shape
        self._check_params(params)
        w = params[weight]
        self.c = int(w.shape[0] if transposed else w.shape[1])
        if loss == "logistic" and self.c != 1:
            raise ConfigError(f"loss='logistic' needs one output, the weight has {self.c}")
        self._reg_w: float | Tensor = reg
        self._reg_b: float | Tensor = reg if bias_reg is None else bias_reg
        self._weights: Tensor | None = None
        self.updates = 0
        self.update(params, sample_weights=sample_weights)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def linear(cls, x: Tensor, params: Mapping[str, Tensor], **options: object
               ) -> KFACPreconditioner:
        """K-FAC for ``Z = X W + b`` (options as in the constructor).

        Args:
            x: inputs, n×d (the training inputs of the inner loss).
            params: current ``{weight: W, bias: b}``: ``W`` is d×c (``Z = X W``), or c×d with
                ``transposed=True`` (``torch.nn.Linear``'s ``weight``, keys ``"weight"`` and
                ``"bias"``); ``bias=None`` for a layer without bias.
            loss: ``"cross_entropy"`` (softmax), ``"squared"`` (``½‖z − y‖²`` per sample) or
                ``"logistic"`` (one output, sigmoid).
            sample_weights: ``w_i >= 0`` (n), e.g. ``σ(s)`` in data hyper-cleaning; ones if
                None.
            reg: ridge on the rows of ``W``: a number or one per input feature (d).
            bias_reg: ridge on ``b`` (defaults to ``reg`` when it is a number).
            damping: ``δ >= 0`` added to every ridge (use the solver's ``damping``); the
                ridges plus ``δ`` must be positive.
            reduction: ``"mean"`` (``1/n`` in front of the sum, default) or ``"sum"``.
        """
        return cls(x, params, **options)  # type: ignore[arg-type]

    @classmethod
    def linear_softmax(cls, x: Tensor, params: Mapping[str, Tensor], **options: object
                       ) -> KFACPreconditioner:
        """:meth:`linear` with ``loss="cross_entropy"``."""
        return cls(x, params, loss="cross_entropy", **options)  # type: ignore[arg-type]

    def _check_params(self, params: Mapping[str, Tensor]) -> None:
        if not isinstance(params, Mapping):
            raise ConfigError(f"params must be a dict of tensors, got {type(params).__name__}")
        expected = {self.weight} | ({self.bias} if self.bias is not None else set())
        if set(params) != expected:
            raise ConfigError(
                f"params must hold exactly the layer's weight and bias {sorted(expected)}, got "
                f"{sorted(params)}; name them with weight=/bias= (bias=None: no bias); K-FAC "
                "here covers one linear layer"
            )
        w = params[self.weight]
        if w.dim() != 2 or w.shape[1 if self.transposed else 0] != self.d:
            layout = "c×d (transposed=True)" if self.transposed else "d×c"
            raise ShapeMismatchError(
                f"params[{self.weight!r}] must be {layout} with d = {self.d} input features, "
                f"got shape {tuple(w.shape)}"
            )
        if self.bias is not None:
            c = w.shape[0 if self.transposed else 1]
            if tuple(params[self.bias].shape) != (c,):
                raise ShapeMismatchError(
                    f"params[{self.bias!r}] must have shape ({c},), got "
                    f"{tuple(params[self.bias].shape)}"
                )

    # -- factors ------------------------------------------------------------------------------

    def update(
        self,
        params: Mapping[str, Tensor] | None = None,
        *,
        sample_weights: Tensor | None = None,
        reg: float | Tensor | None = None,
        bias_reg: float | Tensor | None = None,
    ) -> None:
        """Recompute the factors at new ``params`` / ``sample_weights`` / ridges (what is not
        given keeps its last value; the first call needs ``params``)."""
        x = self.x
        if reg is not None:
            self._reg_w = reg
            if bias_reg is None and not isinstance(self._reg_b, Tensor):
                self._reg_b = reg
        if bias_reg is not None:
            self._reg_b = bias_reg
        if sample_weights is not None:
            sw = sample_weights.detach().to(dtype=x.dtype, device=x.device)
            if sw.shape != (self.n,):
                raise ShapeMismatchError(
                    f"sample_weights must have shape ({self.n},) (one per row of x), got "
                    f"{tuple(sample_weights.shape)}"
                )
            if not bool(torch.isfinite(sw).all()) or bool((sw < 0).any()):
                raise ConfigError("sample_weights must be finite and >= 0")
            self._weights = sw
        if params is not None:
            self._check_params(params)
            self._params = {k: v.detach() for k, v in params.items()}
        rows = _number_or_vector(self._reg_w, self.d, "reg", x)
        bias_rows = (_number_or_vector(self._reg_b, 1, "bias_reg", x)
                     if self.bias is not None else rows[:0])
        ridge = torch.cat([rows, bias_rows]) + self.damping
        if not bool((ridge > 0).all()):
            raise ConfigError(
                "KFACPreconditioner needs reg + damping > 0 for every row (the Kronecker "
                "factors of a softmax Hessian are singular); pass damping= (e.g. 1e-4) or a "
                "positive reg / bias_reg"
            )
        weights = torch.ones(self.n, dtype=x.dtype, device=x.device) if (
            self._weights is None) else self._weights
        scale = 1.0 / self.n if self.reduction == "mean" else 1.0
        a, g = self._factors(weights, scale)
        # exact inverse of K = A ⊗ G + diag(ridge) ⊗ I through S A S = Q diag(μ) Qᵀ
        s = ridge.rsqrt()
        mu, q = _eigh(s[:, None] * a * s[None, :])
        gamma, u = _eigh(g)
        self._b = s[:, None] * q
        self._bt = self._b.t().contiguous()
        self._u = u
        self._inv = 1.0 / (mu.clamp_min(0.0)[:, None] * gamma.clamp_min(0.0)[None, :] + 1.0)
        if not all(bool(torch.isfinite(t).all()) for t in (self._b, self._u, self._inv)):
            raise NonFiniteError("KFACPreconditioner: the factors have NaN/Inf; check x and params")
        self.updates += 1

    def _factors(self, weights: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        x, p = self.x, self._params
        w = p[self.weight]
        z = x @ (w.t() if self.transposed else w)
        if self.bias is not None:
            z = z + p[self.bias]
        c = self.c
        if self.loss == "cross_entropy":
            prob = torch.softmax(z, dim=1)
            t = (1.0 - (prob * prob).sum(1)) / c
            wp = prob * weights[:, None]
            g_sum = torch.diag(wp.sum(0)) - wp.t() @ prob
        elif self.loss == "logistic":
            sig = torch.sigmoid(z[:, 0])
            t = sig * (1.0 - sig)
            g_sum = (weights * t).sum().reshape(1, 1)
        else:
            t = torch.ones(self.n, dtype=x.dtype, device=x.device)
            g_sum = weights.sum() * torch.eye(c, dtype=x.dtype, device=x.device)
        wt = weights * t
        denom = float(wt.sum())
        g = g_sum / denom if denom > 0 else torch.eye(c, dtype=x.dtype, device=x.device)
        coef = wt * scale
        xw = x * coef[:, None]
        a_xx = xw.t() @ x
        if self.bias is None:
            return a_xx, g
        col = xw.sum(0)
        a = torch.empty(self.d + 1, self.d + 1, dtype=x.dtype, device=x.device)
        a[: self.d, : self.d] = a_xx
        a[: self.d, self.d] = col
        a[self.d, : self.d] = col
        a[self.d, self.d] = coef.sum()
        return a, g

    # -- application --------------------------------------------------------------------------

    def __call__(self, r: Mapping[str, Tensor]) -> TensorDict:
        """``K⁻¹ r`` for ``r = {weight: ..., bias: ...}`` (shapes of the params)."""
        w = r[self.weight]
        rw = w.t() if self.transposed else w
        rhs = rw if self.bias is None else torch.cat([rw, r[self.bias].reshape(1, -1)])
        rhs = rhs.to(self._b.dtype)
        y = (self._bt @ rhs) @ self._u if self.c > 1 else self._bt @ rhs
        y = y * self._inv
        out = self._b @ (y @ self._u.t() if self.c > 1 else y)
        out = out.to(w.dtype)
        ow = out[: self.d]
        result = {self.weight: ow.t() if self.transposed else ow}
        if self.bias is not None:
            result[self.bias] = out[self.d]
        return result
