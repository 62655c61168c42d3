"""Hypergradients: linear solvers, implicit and unrolled differentiation, outer optimizers.

Example:
    >>> import torch
    >>> from chronos.solver import implicit_hypergradient
    >>> inner = lambda p, h: 0.5 * ((p["w"] - h["c"]) ** 2).sum()      # θ*(c) = c
    >>> outer = lambda p, h: (p["w"] ** 2).sum()                         # F = ‖c‖², dF/dc = 2c
    >>> implicit_hypergradient(inner, outer, {"w": torch.ones(2)}, {"c": torch.ones(2)})["c"]
    tensor([2., 2.])
"""

from chronos.solver.api import ImplicitDifferentiation, OuterOptimizer, UnrolledDifferentiation
from chronos.solver.hvp import InnerLinearization, linearize_inner
from chronos.solver.implicit import (
    HypergradInfo,
    default_tol,
    implicit_hypergradient,
    outer_gradients,
)
from chronos.solver.linear import (
    METHODS,
    LinearSolver,
    Matvec,
    Preconditioner,
    SolveInfo,
    cg,
    direct,
    fixed_point,
    make_solver,
    neumann,
)
from chronos.solver.matmul import MatmulAutotuner
from chronos.solver.precond import KFACPreconditioner
from chronos.solver.unrolled import UnrollInfo, unrolled_hypergradient

__all__ = [
    "METHODS",
    "HypergradInfo",
    "ImplicitDifferentiation",
    "InnerLinearization",
    "KFACPreconditioner",
    "LinearSolver",
    "MatmulAutotuner",
    "Matvec",
    "OuterOptimizer",
    "Preconditioner",
    "SolveInfo",
    "UnrollInfo",
    "UnrolledDifferentiation",
    "cg",
    "default_tol",
    "direct",
    "fixed_point",
    "implicit_hypergradient",
    "linearize_inner",
    "make_solver",
    "neumann",
    "outer_gradients",
    "unrolled_hypergradient",
]
