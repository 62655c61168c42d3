"""Matmul orientation autotuning for Hessian-vector products on CPU.

Implicit hypergradients spend almost all their time in a few matrix products repeated at
every linear-solver iteration: for a linear model ``Z = X W`` with ``X`` of shape ``n×d`` and a
thin ``W`` (``d×c``, ``c`` small), each Hessian-vector product computes ``X V`` and
``Xᵀ G``. A product and its transpose, ``A B = (Bᵀ Aᵀ)ᵀ``, are the same numbers, but BLAS
libraries do not run both orientations equally fast: on this project's machine (MKL on an AMD
EPYC, one thread) ``X V`` with ``X`` 2000×784 and ``V`` 784×10 takes ~3.6 ms while
``(Vᵀ Xᵀ)ᵀ`` takes ~0.7 ms.

:class:`MatmulAutotuner` is a ``TorchDispatchMode`` that sits below autograd, so it sees the
``aten.mm`` / ``aten.addmm`` calls of forward *and* backward passes. The first time it meets a
product signature (shapes, strides, dtype) on CPU it times both orientations (a few runs each)
and remembers the faster one; afterwards it only looks the choice up. The swapped form returns
a contiguous tensor of the same shape, equal up to floating-point summation order (the
transpose copy costs ``m·n``, negligible next to the ``m·k·n`` product). Products below
``min_flops`` and non-CPU tensors are never touched (GPU BLAS handles both orientations
well). Choices live in a process-wide cache (:func:`clear_cache`).

Example:
    >>> import torch
    >>> X, V = torch.randn(300, 200), torch.randn(200, 3)
    >>> with MatmulAutotuner(min_flops=0) as tuner:
    ...     out = X @ V
    >>> bool(torch.allclose(out, X @ V, atol=1e-4)), tuner.calls
    (True, 1)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["MatmulAutotuner", "cache_info", "clear_cache"]

_aten = torch.ops.aten
_CACHE: dict[tuple[Any, ...], tuple[float, float]] = {}  # signature -> (t_plain, t_swapped)


def clear_cache() -> None:
    """Forget every orientation choice (they are re-measured on next use)."""
    _CACHE.clear()


def cache_info(margin: float = 0.8) -> dict[str, int]:
    """``{"signatures": n, "swapped": k}``: products timed, and how many run transposed."""
    return {
        "signatures": len(_CACHE),
        "swapped": sum(1 for plain, swapped in _CACHE.values() if swapped < margin * plain),
    }


def _best_time(fn: Callable[[], Tensor], runs: int) -> float:
    fn()
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _swapped(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` computed as ``(bᵀ aᵀ)ᵀ``, returned contiguous like ``mm``'s own output."""
    return _aten.mm.default(b.t(), a.t()).t().contiguous()


def _plain(t: object) -> bool:
    return (
        type(t) is Tensor
        and t.layout == torch.strided
        and t.device.type == "cpu"
        and t.dim() == 2
        and t.dtype in (torch.float32, torch.float64)
    )


class MatmulAutotuner(TorchDispatchMode):
    """Run each large CPU matrix product in its faster orientation; see the module docstring.

    Args:
        min_flops: products with ``2·m·k·n`` below this are passed through untouched.
        runs: timed runs per orientation when a signature is first met.
        margin: swap only when the transposed form is at least this much faster
            (``t_swapped < margin · t_plain``), so timing noise does not flip choices.

    Attributes:
        calls: products seen; ``swapped``: products run transposed.
    """

    def __init__(self, min_flops: float = 2e6, runs: int = 3, margin: float = 0.8) -> None:
        super().__init__()
        self.min_flops = min_flops
        self.runs = runs
        self.margin = margin
        self.calls = 0
        self.swapped = 0

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # Plain eager mode: do not wrap __torch_dispatch__ in torch._disable_dynamo, which
        # would import torch._dynamo (seconds) on first use and add overhead to every op.
        return False

    def _choose(self, a: Tensor, b: Tensor) -> bool:
        m, k = a.shape
        n = b.shape[1]
        if 2.0 * m * k * n < self.min_flops:
            return False
        key = (tuple(a.shape), a.stride(), tuple(b.shape), b.stride(), a.dtype)
        times = _CACHE.get(key)
        if times is None:
            plain = _best_time(lambda: _aten.mm.default(a, b), self.runs)
            times = _CACHE[key] = (plain, _best_time(lambda: _swapped(a, b), self.runs))
        return times[1] < self.margin * times[0]

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is _aten.mm.default and not kwargs:
            a, b = args
            if _plain(a) and _plain(b) and a.dtype == b.dtype:
                self.calls += 1
                if self._choose(a, b):
                    self.swapped += 1
                    return _swapped(a, b)
        elif func is _aten.addmm.default and not kwargs:
            bias, a, b = args
            if _plain(a) and _plain(b) and a.dtype == b.dtype and type(bias) is Tensor:
                self.calls += 1
                if self._choose(a, b):
                    self.swapped += 1
                    return _aten.add.Tensor(_swapped(a, b), bias)
        return func(*args, **kwargs)
