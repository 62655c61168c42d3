"""Hypergradients of a worker group's inner problem: the Hessian is a sum over shards.

The group's inner objective is ``f = (1/W) Σ_r f_r`` (see :mod:`~chronos.distributed.group`),
so at the inner optimum θ*

    dF/dλ = ∂F/∂λ − (∇²_λθ f) v,     (∇²_θθ f) v = ∂F/∂θ,
    ∇²_θθ f = (1/W) Σ_r ∇²_θθ f_r,   ∇²_λθ f = (1/W) Σ_r ∇²_λθ f_r.

``method="cg"`` — the exact baseline, **distributed CG**: the same conjugate-gradient solver as
a single process (:func:`chronos.solver.linear.cg`), whose matrix-vector product is each
rank's local Hessian-vector product, averaged by one all-reduce (op ``"hvp"``, model-sized).
Every rank holds the same iterates, so the solve equals single-process CG on the union of the
shards (to rounding; the tests check 1e-6 in float64).

``method="pcg"`` — the same solution in fewer rounds of communication: distributed CG
preconditioned by the ranks' **local Hessians**, ``z = (1/W) Σ_r (∇²_θθ f_r)⁻¹ r``, each
inverse applied by ``local_iter`` CG iterations on the rank's own shard (no communication)
and the results averaged by one all-reduce. With shards drawn from one distribution
``∇²f_r ≈ ∇²f``, so ``z`` is close to the Newton direction ``(∇²f)⁻¹ r`` and a few outer
iterations suffice; each costs two all-reduces (``"hvp"`` and ``"precond"``) and
``local_iter`` local Hessian-vector products. A fixed number of inner CG iterations is not a
fixed linear operator, so the outer loop is *flexible* CG (Polak–Ribière
``β = z_{k+1}ᵀ(r_{k+1} − r_k) / z_kᵀr_k``), which tolerates a preconditioner that varies; it
stops on the same true-residual test as ``"cg"``.

``method="local"`` — cheapest: each rank solves its own ``(∇²_θθ f_r) v_r = ∂F/∂θ`` without
communicating, and the ranks average ``v_r`` once (one model-sized all-reduce in all). It is
not exact (``mean_r (∇²f_r)⁻¹ ≠ (∇²f)⁻¹``): :func:`chronos.benchmarks.hybrid` reports its error
against the exact one, which is large when a shard's Hessian is far from the whole one.

λ in two kinds, by name:

* **shared** (a weight decay): the mixed term is all-reduced (op ``"mixed"``, λ-sized), every
  rank gets the whole hypergradient;
* **per-sample** (``sharded_outer``: hyper-cleaning's sample weights): ``∇²_λθ f_r`` is zero
  outside rank r's samples, so each rank computes the hypergradient of its own samples from
  the shared solution ``v`` — no rank ever holds, sends or receives the other ranks' slices.
  Rank r's ``λ[name]`` is its own slice.

The outer loss ``F`` is evaluated on every rank (a validation set each rank holds); with
``reduce_outer=True`` it is a mean over the ranks instead (a sharded validation set) and ``∂F``
is all-reduced too (op ``"outer"``).

Example (one rank: the single-process hypergradient):
    >>> import torch
    >>> from chronos.distributed.group import Group, GroupSpec, free_port
    >>> f = lambda p, h: ((p["w"] - 1.0) ** 2).sum() + h["a"].exp() * (p["w"] ** 2).sum()
    >>> F = lambda p, h: ((p["w"] - 2.0) ** 2).sum()
    >>> with Group(GroupSpec(0, 1, free_port())) as g:
    ...     grad, info = group_hypergradient(f, F, {"w": torch.tensor([0.5])},
    ...                                      {"a": torch.tensor(0.0)}, g)
    >>> # w* = 1/(1+e^a) = 1/2, dw*/da = −e^a/(1+e^a)² = −1/4, dF/da = 2(w*−2)·(−1/4)
    >>> round(float(grad["a"]), 4), info.collectives  # two: one CG iteration, the mixed term
    (0.75, 2)
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from chronos.core import tensordict as td
from chronos.core.errors import ConfigError, NonFiniteError
from chronos.core.tensordict import TensorDict
from chronos.distributed.group import Group
from chronos.solver.hvp import InnerLinearization, make_leaves
from chronos.solver.implicit import default_tol, outer_gradients
from chronos.solver.linear import SolveInfo, cg

__all__ = ["GroupHypergradInfo", "group_hypergradient"]

Loss = Callable[[TensorDict, TensorDict], Tensor]
METHODS = ("cg", "pcg", "local")


@dataclass(frozen=True)
class GroupHypergradInfo:
    """``solve``: the linear solve (distributed CG, or this rank's local one);
    ``solution``: ``v`` (the same on every rank), for warm starts; ``outer_loss``: ``F``;
    ``collectives``: how many all-reduces the hypergradient took."""

    solve: SolveInfo
    solution: TensorDict
    outer_loss: float
    collectives: int


def group_hypergradient(
    inner_loss: Loss,
    outer_loss: Loss,
    inner_params: Mapping[str, Tensor],
    outer_params: Mapping[str, Tensor],
    group: Group,
    *,
    method: str = "cg",
    max_iter: int = 100,
    tol: float | None = None,
    damping: float = 0.0,
    init: Mapping[str, Tensor] | None = None,
    sharded_outer: Collection[str] = (),
    reduce_outer: bool = False,
    local_iter: int = 10,
) -> tuple[TensorDict, GroupHypergradInfo]:
    """``dF/dλ`` of the group's problem at θ (the same θ on every rank).

    Args:
        inner_loss: this rank's ``f_r(θ, λ)``.
        outer_loss: ``F(θ, λ)`` (the same on every rank unless ``reduce_outer``).
        inner_params: θ ≈ θ*(λ), identical on every rank.
        outer_params: λ; names in ``sharded_outer`` hold this rank's slice only.
        group: the joined group; every rank must call this with the same method and options.
        method: ``"cg"`` (exact, one all-reduce per iteration), ``"pcg"`` (exact, two
            all-reduces per iteration, far fewer iterations) or ``"local"`` (approximate, one
            all-reduce).
        max_iter, tol, damping: of the linear solve(s); ``tol`` defaults by θ's dtype
            (:func:`chronos.solver.default_tol`).
        init: warm start for ``v`` (``info.solution`` of the previous call).
        sharded_outer: names of per-sample λ entries (see the module docstring).
        reduce_outer: ``F`` is a mean over the ranks (sharded validation data).
        local_iter: CG iterations of each local preconditioner solve (``"pcg"``).

    Returns:
        ``(hypergradient, info)``; shared entries are equal on every rank, sharded entries are
        this rank's slice.
    """
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    unknown = set(sharded_outer) - set(outer_params)
    if unknown:
        raise ConfigError(f"sharded_outer names {sorted(unknown)} are not outer parameters "
                          f"(have {sorted(outer_params)})")
    theta = make_leaves(inner_params, "inner_params")
    lam = make_leaves(outer_params, "outer_params")
    dtype = next(iter(theta.values())).dtype
    tolerance = default_tol(dtype) if tol is None else tol
    lin = InnerLinearization(inner_loss, theta, lam)
    f_value, d_theta, d_lam, _ = outer_gradients(outer_loss, theta, lam)
    collectives = 0
    if reduce_outer:
        shared_d = {k: v for k, v in d_lam.items() if k not in sharded_outer}
        both = group.all_reduce_mean({**{f"θ/{k}": v for k, v in d_theta.items()},
                                      **{f"λ/{k}": v for k, v in shared_d.items()}}, op="outer")
        d_theta = {k: both[f"θ/{k}"] for k in d_theta}
        d_lam = {**d_lam, **{k: both[f"λ/{k}"] for k in shared_d}}
        f_value = float(group.all_reduce_mean({"F": torch.tensor([f_value])}, op="outer")["F"])
        collectives += 2
    solve = cg(max_iter=max_iter, tol=tolerance, damping=damping, warn=False)
    if method == "pcg":
        v, info, used = _flexible_pcg(lin, group, d_theta, init, max_iter, tolerance,
                                      float(damping), local_iter)
        collectives += used
    elif method == "cg":
        calls = [0]

        def matvec(v: TensorDict) -> TensorDict:
            calls[0] += 1
            return group.all_reduce_mean(lin.hvp(v), op="hvp")

        v, info = solve(matvec, d_theta, init)
        collectives += calls[0]
    else:
        v_local, info = solve(lin.hvp, d_theta, init)
        v = group.all_reduce_mean(v_local, op="hvp")
        collectives += 1
    if not td.is_finite(v):
        raise NonFiniteError("the group's linear solve produced NaN/Inf; the inner Hessian may "
                             "be singular or indefinite: add damping")
    mixed = lin.mixed(v)
    shared = {k: m for k, m in mixed.items() if k not in sharded_outer}
    if shared:
        shared = group.all_reduce_mean(shared, op="mixed")
        collectives += 1
    scale = 1.0 / group.world_size  # f = (1/W) Σ f_r: rank r's samples enter with 1/W
    hyper = {
        k: (d_lam[k] - (shared[k] if k in shared else scale * mixed[k])).detach().to(lam[k].dtype)
        for k in lam
    }
    if not td.is_finite(hyper):
        raise NonFiniteError("the hypergradient has NaN/Inf; check both losses at these parameters")
    return hyper, GroupHypergradInfo(info, td.clone(td.detach(v)), f_value, collectives)


def _flexible_pcg(lin: InnerLinearization, group: Group, b: TensorDict,
                  init: Mapping[str, Tensor] | None, max_iter: int, tol: float, damping: float,
                  local_iter: int) -> tuple[TensorDict, SolveInfo, int]:
    """Flexible PCG for ``(H + δI) v = b``, ``H = mean_r H_r``, preconditioned by averaged
    local solves (see the module docstring). Every rank holds the same iterates."""
    flat_b, spec = td.flatten(b)
    calls = [0]

    def reduce(x: Tensor, op: str) -> Tensor:
        calls[0] += 1
        return group.all_reduce_mean({"x": x}, op=op)["x"]

    def matvec(x: Tensor) -> Tensor:
        hv = td.flatten(lin.hvp(td.unflatten(x, spec)))[0]
        return reduce(hv, "hvp") + damping * x

    local = cg(max_iter=local_iter, tol=1e-12, damping=damping, warn=False)

    def precond(r: Tensor) -> Tensor:
        z, _ = local(lin.hvp, td.unflatten(r, spec))
        return reduce(td.flatten(z)[0], "precond")

    b_norm = float(flat_b.norm())
    x = torch.zeros_like(flat_b) if init is None else td.flatten(dict(init))[0].clone()
    r = flat_b - matvec(x) if init is not None else flat_b.clone()
    initial = float(r.norm())
    target = tol * b_norm
    iterations, status = 0, "max_iter"
    z = precond(r)
    p = z.clone()
    rz = float(torch.dot(r, z))
    best = initial
    while best > target and iterations < max_iter:
        ap = matvec(p)
        iterations += 1
        curvature = float(torch.dot(p, ap))
        if not curvature > 0 or not rz > 0:
            status = "breakdown"
            break
        alpha = rz / curvature
        x = x + alpha * p
        r_new = r - alpha * ap
        best = float(r_new.norm())
        if best <= target:
            r = r_new
            break
        z_new = precond(r_new)
        beta = float(torch.dot(z_new, r_new - r)) / rz  # Polak–Ribière: a varying M is fine
        rz = float(torch.dot(r_new, z_new))
        p = z_new + max(beta, 0.0) * p
        r = r_new
    converged = best <= target
    if converged:
        status = "converged"
    info = SolveInfo(method="pcg", iterations=iterations, residual=best, b_norm=b_norm,
                     converged=converged, status=status, initial_residual=initial)
    return td.unflatten(x, spec), info, calls[0]
