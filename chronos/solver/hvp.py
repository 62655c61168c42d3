"""The inner gradient, linearized once: Hessian-vector and mixed second-derivative products.

For an inner objective ``f(θ, λ)`` at a point ``(θ, λ)``, :func:`linearize_inner` evaluates
``g(θ, λ) = ∇θ f(θ, λ)`` once with its autograd graph kept. Every product after that is one
reverse pass through that same graph, with nothing re-traced:

* ``hvp(v) = (∂g/∂θ)ᵀ v = ∇²_θθ f · v`` (the Hessian is symmetric, so a VJP is an HVP),
* ``mixed(v) = (∂g/∂λ)ᵀ v = ∇²_λθ f · v`` (shape of λ), the term implicit differentiation
  subtracts at the end.

Building the graph of ``g`` costs about one forward + one backward of ``f``; each product costs
about one more backward. Re-running forward-over-reverse ``jvp(grad(f))`` per product instead
re-does the forward and backward every time (several times slower in a trial on this machine).

Example:
    >>> import torch
    >>> f = lambda p, h: h["c"] * (p["x"] ** 2).sum()          # ∇²f = 2c·I, ∂²f/∂c∂x = 2x
    >>> lin = linearize_inner(f, {"x": torch.tensor([1.0, 2.0])}, {"c": torch.tensor(3.0)})
    >>> lin.hvp({"x": torch.tensor([1.0, 0.0])})["x"].tolist()
    [6.0, 0.0]
    >>> float(lin.mixed({"x": torch.tensor([1.0, 1.0])})["c"])
    6.0
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from chronos.core import tensordict as td
from chronos.core.errors import ChronosTypeError, ConfigError, NonFiniteError
from chronos.core.tensordict import TensorDict

__all__ = ["InnerLinearization", "linearize_inner", "make_leaves"]

Loss = Callable[[TensorDict, TensorDict], Tensor]


def make_leaves(params: Mapping[str, Tensor | float], what: str) -> TensorDict:
    """Fresh leaves that require grad and share storage with ``params`` (which stay untouched).

    Numbers become 0-d tensors; integer / boolean tensors are refused (they cannot carry
    gradients).
    """
    tensors = td.as_tensor_dict(params, what=what)
    if not tensors:
        raise ConfigError(f"{what} is empty; give at least one tensor")
    out: TensorDict = {}
    for k, v in tensors.items():
        if not (v.is_floating_point() or v.is_complex()):
            raise ChronosTypeError(
                f"{what}[{k!r}] has dtype {v.dtype}; differentiable parameters must be floating "
                "point (convert with .float() or .double())"
            )
        out[k] = v.detach().requires_grad_(True)
    return out


def scalar_loss(value: object, what: str) -> Tensor:
    """Check that a loss function returned a finite scalar tensor and return it."""
    if not isinstance(value, Tensor):
        raise ChronosTypeError(
            f"{what} must return a scalar torch.Tensor, got {type(value).__name__}"
        )
    if value.numel() != 1:
        raise ChronosTypeError(
            f"{what} must return a scalar tensor, got shape {tuple(value.shape)}; reduce it "
            "with .mean() or .sum()"
        )
    number = float(value.detach())
    if not math.isfinite(number):
        raise NonFiniteError(
            f"{what} is {number} at the given parameters; check for log(0), division by zero "
            "or an inner solve that diverged (lower its learning rate)"
        )
    return value.reshape(())


def _fill(grads: tuple[Tensor | None, ...], like: list[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, like, strict=True)]


class InnerLinearization:
    """``∇θ f`` at one point with its graph kept; see the module docstring.

    Attributes:
        params, outer_params: the leaves the graph was built from (detached copies).
        grad: ``∇θ f`` values (detached).
        loss: ``f(θ, λ)`` as a float.
    """

    def __init__(self, inner_loss: Loss, params: TensorDict, outer_params: TensorDict) -> None:
        self.params = params
        self.outer_params = outer_params
        self._theta = list(params.values())
        self._lam = list(outer_params.values())
        with torch.enable_grad():
            f = scalar_loss(inner_loss(params, outer_params), "inner_loss")
            raw = torch.autograd.grad(f, self._theta, create_graph=True, allow_unused=True)
        self.loss = float(f.detach())
        grads = _fill(raw, self._theta)
        self.grad: TensorDict = {k: g.detach() for k, g in zip(params, grads, strict=True)}
        if not td.is_finite(self.grad):
            bad = sorted(k for k, g in self.grad.items() if not bool(torch.isfinite(g).all()))
            raise NonFiniteError(
                f"the inner gradient has NaN/Inf in {bad}; the inner loss is not differentiable "
                "at these parameters (check for sqrt/log at 0 or a diverged inner solve)"
            )
        # Entries of g with no graph (f linear or constant in that block) have zero curvature.
        self._active = [i for i, g in enumerate(grads) if g.requires_grad]
        self._g = [grads[i] for i in self._active]
        self._keys = list(params)
        self.hvp_calls = 0
        self.unreached: set[str] = set()

    def grad_norm(self) -> float:
        """``‖∇θ f‖₂``: how far the given θ is from stationarity."""
        return float(td.norm(self.grad))

    def _vjp(
        self, v: Mapping[str, Tensor], inputs: list[Tensor], retain: bool
    ) -> tuple[Tensor | None, ...]:
        if not self._g:
            return (None,) * len(inputs)
        cotangents = [v[self._keys[i]] for i in self._active]
        return torch.autograd.grad(
            self._g, inputs, grad_outputs=cotangents, retain_graph=retain, allow_unused=True
        )

    def hvp(self, v: Mapping[str, Tensor]) -> TensorDict:
        """``∇²_θθ f · v`` (same keys and shapes as θ)."""
        self.hvp_calls += 1
        out = _fill(self._vjp(v, self._theta, True), self._theta)
        return dict(zip(self._keys, out, strict=True))

    def mixed(self, v: Mapping[str, Tensor], release: bool = True) -> TensorDict:
        """``∇²_λθ f · v`` (keys and shapes of λ); ``release`` frees the graph afterwards.

        λ entries that ``∇θ f`` does not depend on get zeros and are listed in
        :attr:`unreached`.
        """
        raw = self._vjp(v, self._lam, not release)
        if release:
            self._g = []
        self.unreached = {k for k, g in zip(self.outer_params, raw, strict=True) if g is None}
        return dict(zip(self.outer_params, _fill(raw, self._lam), strict=True))


def linearize_inner(
    inner_loss: Loss,
    params: Mapping[str, Tensor],
    outer_params: Mapping[str, Tensor | float],
) -> InnerLinearization:
    """Build ``∇θ f(θ, λ)`` once with its graph; the inputs stay untouched (copies are used)."""
    if not callable(inner_loss):
        raise ChronosTypeError(f"inner_loss must be callable, got {type(inner_loss).__name__}")
    return InnerLinearization(
        inner_loss, make_leaves(params, "inner_params"), make_leaves(outer_params, "outer_params")
    )
