"""Unrolled differentiation: backpropagate through the inner gradient-descent steps themselves.

The inner loop is ``T = steps`` steps of (heavy-ball) gradient descent from ``θ_0``:

    ``b_{t+1} = μ b_t + ∇θ f(θ_t, λ)``,   ``θ_{t+1} = θ_t − η b_{t+1}``

(``μ = momentum``, ``b_0 = 0``)

and the hypergradient is the total derivative ``dF(θ_T(λ), λ)/dλ`` through all of them, with
the step size ``η`` either a fixed number or one of the outer parameters (a learned learning
rate). ``truncate = K`` runs the first ``T − K`` steps without recording a graph and
differentiates only the last ``K`` (truncated backpropagation, Shaban et al. 2019): memory is
``O(K)`` instead of ``O(T)``, and the result ignores how ``λ`` affected ``θ_{T−K}``.
``truncate >= steps`` is full unrolling.

Unlike implicit differentiation this needs no inner optimum and can learn quantities that do
not move the optimum (step sizes), at the price of memory and time linear in ``K``.

Example (learn the inner step size of a 1-d quadratic):
    >>> import torch
    >>> inner = lambda p, h: 0.5 * ((p["x"] - 3.0) ** 2).sum()
    >>> outer = lambda p, h: ((p["x"] - 3.0) ** 2).sum()
    >>> hg = unrolled_hypergradient(inner, outer, {"x": torch.zeros(1)}, {"lr": 0.1},
    ...                             steps=5, lr="lr")
    >>> hg["lr"].item() < 0          # a larger step size gets closer to the optimum
    True
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, overload

import torch
from torch import Tensor

from chronos.core import tensordict as td
from chronos.core.errors import (
    ChronosTypeError,
    ConfigError,
    KeyMismatchError,
    NonFiniteError,
    ShapeMismatchError,
)
from chronos.core.tensordict import TensorDict
from chronos.solver.hvp import make_leaves, scalar_loss
from chronos.solver.matmul import MatmulAutotuner

__all__ = ["UnrollInfo", "unrolled_hypergradient"]

Loss = Callable[[TensorDict, TensorDict], Tensor]


@dataclass(frozen=True)
class UnrollInfo:
    """What :func:`unrolled_hypergradient` did.

    Attributes:
        steps: inner steps taken.
        differentiated_steps: steps backpropagated through (``min(truncate, steps)``).
        final_params: ``θ_T`` (detached).
        inner_losses: ``f(θ_t, λ)`` before every step.
        outer_loss: ``F(θ_T, λ)``.
        unused_outer: outer-parameter names the result does not depend on (zero gradient).
    """

    steps: int
    differentiated_steps: int
    final_params: TensorDict
    inner_losses: tuple[float, ...]
    outer_loss: float
    unused_outer: tuple[str, ...]


def _step_size(lr: float | str, lam: TensorDict) -> Tensor | float:
    if isinstance(lr, str):
        if lr not in lam:
            raise KeyMismatchError(
                f"lr={lr!r} names no outer parameter; outer parameters are {sorted(lam)} "
                "(pass a float for a fixed step size)"
            )
        if lam[lr].numel() != 1:
            raise ShapeMismatchError(
                f"the learned step size outer_params[{lr!r}] must be a scalar, got shape "
                f"{tuple(lam[lr].shape)}"
            )
        return lam[lr].reshape(())
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"lr must be a positive number or an outer-parameter name, got {lr!r}")
    return float(lr)


def _count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


@overload
def unrolled_hypergradient(
    inner_loss: Loss,
    outer_loss: Loss,
    init_params: Mapping[str, Tensor],
    outer_params: Mapping[str, Tensor | float],
    *,
    steps: int,
    lr: float | str,
    truncate: int | None = ...,
    momentum: float = ...,
    return_info: Literal[False] = ...,
    autotune: bool = ...,
) -> TensorDict: ...


@overload
def unrolled_hypergradient(
    inner_loss: Loss,
    outer_loss: Loss,
    init_params: Mapping[str, Tensor],
    outer_params: Mapping[str, Tensor | float],
    *,
    steps: int,
    lr: float | str,
    truncate: int | None = ...,
    momentum: float = ...,
    return_info: Literal[True],
    autotune: bool = ...,
) -> tuple[TensorDict, UnrollInfo]: ...


def unrolled_hypergradient(
    inner_loss: Loss,
    outer_loss: Loss,
    init_params: Mapping[str, Tensor],
    outer_params: Mapping[str, Tensor | float],
    *,
    steps: int,
    lr: float | str,
    truncate: int | None = None,
    momentum: float = 0.0,
    return_info: bool = False,
    autotune: bool = False,
) -> TensorDict | tuple[TensorDict, UnrollInfo]:
    """``dF(θ_T(λ), λ)/dλ`` through ``steps`` gradient-descent steps (see the module docstring).

    Args:
        inner_loss: ``f(params, outer_params) -> scalar``.
        outer_loss: ``F(params, outer_params) -> scalar``.
        init_params: ``θ_0`` (copied; treated as a constant).
        outer_params: λ (tensors or numbers; not modified, never given a ``.grad``).
        steps: number of inner steps ``T >= 0``.
        lr: step size ``η``: a positive float, or the name of a scalar outer parameter.
        truncate: differentiate through the last ``K`` steps only (``None``: all).
        momentum: heavy-ball coefficient ``μ`` in ``[0, 1)`` (PyTorch SGD convention).
        return_info: also return an :class:`UnrollInfo`.
        autotune: run large CPU products in their faster orientation (off by default; see
            :class:`~chronos.solver.matmul.MatmulAutotuner`: it pays only where the BLAS
            library runs one orientation much faster, which `chronos bench hypergrad` shows).

    Returns:
        ``{name: dF/dλ_name}`` (detached, λ's dtypes), and the info when ``return_info``.

    Raises:
        NonFiniteError: an inner or outer loss, or the result, is NaN/Inf (lower ``lr``).
        KeyMismatchError, ShapeMismatchError: ``lr`` names no scalar outer parameter.
        ConfigError: bad ``steps``/``truncate``/``momentum``/``lr``.
    """
    if not callable(inner_loss) or not callable(outer_loss):
        raise ChronosTypeError(
            "inner_loss and outer_loss must be callables (params, outer_params) -> Tensor"
        )
    steps = _count("steps", steps, 0)
    window = steps if truncate is None else min(_count("truncate", truncate, 0), steps)
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise ConfigError(f"momentum must be a number in [0, 1), got {momentum!r}")
    if not 0.0 <= momentum < 1.0:
        raise ConfigError(f"momentum must be in [0, 1), got {momentum}")
    lam = make_leaves(outer_params, "outer_params")
    eta = _step_size(lr, lam)
    theta = {k: v.detach().clone() for k, v in make_leaves(init_params, "init_params").items()}
    keys = list(theta)
    losses: list[float] = []

    def grads(params: TensorDict, outer: TensorDict, create_graph: bool, t: int) -> list[Tensor]:
        f = scalar_loss(inner_loss(params, outer), f"inner_loss at step {t}")
        losses.append(float(f.detach()))
        leaves = [params[k] for k in keys]
        if not f.requires_grad:
            return [torch.zeros_like(x) for x in leaves]
        raw = torch.autograd.grad(f, leaves, create_graph=create_graph, allow_unused=True)
        return [torch.zeros_like(x) if g is None else g for g, x in zip(raw, leaves, strict=True)]

    buf: list[Tensor] | None = None
    with MatmulAutotuner() if autotune else contextlib.nullcontext(), torch.enable_grad():
        # Phase 1: the first T − K steps, no graph kept (memory independent of T).
        lam_const = td.detach(lam)
        eta_const = eta.detach() if isinstance(eta, Tensor) else eta
        for t in range(steps - window):
            params = {k: v.requires_grad_(True) for k, v in theta.items()}
            g = [x.detach() for x in grads(params, lam_const, False, t)]
            with torch.no_grad():
                buf = g if buf is None or not momentum else [momentum * b + x for b, x in
                                                             zip(buf, g, strict=True)]
                theta = {k: theta[k].detach() - eta_const * b for k, b in zip(keys, buf,
                                                                              strict=True)}
        # Phase 2: the last K steps, differentiated.
        params = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
        for t in range(steps - window, steps):
            g = grads(params, lam, True, t)
            buf = g if buf is None or not momentum else [momentum * b + x for b, x in
                                                         zip(buf, g, strict=True)]
            params = {k: params[k] - eta * b for k, b in zip(keys, buf, strict=True)}
        value = scalar_loss(outer_loss(params, lam), "outer_loss")
        lam_list = list(lam.values())
        raw = (
            torch.autograd.grad(value, lam_list, allow_unused=True)
            if value.requires_grad
            else (None,) * len(lam_list)
        )
    hyper = {
        k: (torch.zeros_like(x) if gk is None else gk.detach()).to(x.dtype)
        for (k, x), gk in zip(lam.items(), raw, strict=True)
    }
    if not td.is_finite(hyper):
        raise NonFiniteError(
            "the unrolled hypergradient has NaN/Inf; the inner loop probably diverged: lower lr "
            "or the number of differentiated steps (truncate=)"
        )
    if not return_info:
        return hyper
    info = UnrollInfo(
        steps=steps,
        differentiated_steps=window,
        final_params={k: v.detach().clone() for k, v in params.items()},
        inner_losses=tuple(losses),
        outer_loss=float(value.detach()),
        unused_outer=tuple(sorted(k for k, gk in zip(lam, raw, strict=True) if gk is None)),
    )
    return hyper, info

