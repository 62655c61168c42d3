"""Helpers for flat parameter dicts, ``dict[str, Tensor]``.

Chronos represents every set of parameters (inner weights, outer hyperparameters,
hypergradients, linear-system solutions) as a flat ``dict[str, Tensor]``: the shape that
:func:`torch.func.functional_call` takes. The helpers here are pure functions; binary
operations require both dicts to have the same keys and, per key, the same shape, and raise
:class:`~chronos.core.errors.KeyMismatchError` / :class:`~chronos.core.errors.ShapeMismatchError`
otherwise.

Math (for dicts ``a``, ``b`` over keys ``K``):
    ``dot(a, b) = Σ_k ⟨a_k, b_k⟩``, ``norm(a) = sqrt(dot(a, a))``,
    ``flatten(a) = concat_k vec(a_k)`` in sorted key order.

Example:
    >>> import torch
    >>> from chronos.core import tensordict as td
    >>> a = {"w": torch.ones(2, 2), "b": torch.zeros(2)}
    >>> float(td.norm(td.scale(a, 3.0)))
    6.0
    >>> vec, spec = td.flatten(a)
    >>> td.unflatten(vec, spec)["w"].shape
    torch.Size([2, 2])
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from chronos.core.errors import ChronosTypeError, KeyMismatchError, ShapeMismatchError

TensorDict = dict[str, Tensor]

__all__ = [
    "FlatSpec",
    "TensorDict",
    "add",
    "as_tensor_dict",
    "axpy",
    "check_same_structure",
    "clone",
    "detach",
    "dot",
    "flatten",
    "is_finite",
    "norm",
    "scale",
    "sub",
    "to",
    "unflatten",
    "zeros_like",
]


def _check_mapping(x: object, what: str) -> Mapping[str, Tensor]:
    if not isinstance(x, Mapping):
        raise ChronosTypeError(
            f"{what} must be a dict[str, Tensor], got {type(x).__name__}; "
            "wrap a single tensor as {'name': tensor}"
        )
    for k, v in x.items():
        if not isinstance(k, str):
            raise ChronosTypeError(f"{what} keys must be str, got {type(k).__name__} ({k!r})")
        if not isinstance(v, Tensor):
            raise ChronosTypeError(
                f"{what}[{k!r}] must be a torch.Tensor, got {type(v).__name__}; "
                "use as_tensor_dict() to convert floats"
            )
    return x


def check_same_structure(
    a: Mapping[str, Tensor], b: Mapping[str, Tensor], what: str = "tensor dicts"
) -> None:
    """Raise unless ``a`` and ``b`` have the same keys and, per key, the same shape."""
    _check_mapping(a, what)
    _check_mapping(b, what)
    if a.keys() != b.keys():
        missing = sorted(set(a) - set(b))
        extra = sorted(set(b) - set(a))
        raise KeyMismatchError(
            f"{what} must have the same keys: only in the first {missing}, "
            f"only in the second {extra}"
        )
    for k in a:
        if a[k].shape != b[k].shape:
            raise ShapeMismatchError(
                f"{what}[{k!r}] shapes differ: {tuple(a[k].shape)} vs {tuple(b[k].shape)}"
            )


def as_tensor_dict(
    x: Mapping[str, Tensor | float | int],
    dtype: torch.dtype | None = None,
    what: str = "params",
) -> TensorDict:
    """Convert a mapping of tensors or Python numbers into a ``dict[str, Tensor]``.

    Python numbers become 0-d tensors (``torch.get_default_dtype()`` unless ``dtype`` is
    given); tensors are kept as they are (cast only when ``dtype`` is given).
    """
    if not isinstance(x, Mapping):
        raise ChronosTypeError(
            f"{what} must be a dict mapping names to tensors or numbers, got {type(x).__name__}"
        )
    out: TensorDict = {}
    for k, v in x.items():
        if not isinstance(k, str):
            raise ChronosTypeError(f"{what} keys must be str, got {type(k).__name__} ({k!r})")
        if isinstance(v, Tensor):
            out[k] = v if dtype is None else v.to(dtype)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = torch.tensor(float(v), dtype=dtype or torch.get_default_dtype())
        else:
            raise ChronosTypeError(
                f"{what}[{k!r}] must be a torch.Tensor or a number, got {type(v).__name__}"
            )
    return out


def add(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> TensorDict:
    """``a + b`` key by key."""
    check_same_structure(a, b, "add()")
    return {k: a[k] + b[k] for k in a}


def sub(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> TensorDict:
    """``a - b`` key by key."""
    check_same_structure(a, b, "sub()")
    return {k: a[k] - b[k] for k in a}


def scale(a: Mapping[str, Tensor], alpha: float | Tensor) -> TensorDict:
    """``alpha * a`` key by key."""
    _check_mapping(a, "scale()")
    return {k: v * alpha for k, v in a.items()}


def axpy(alpha: float | Tensor, x: Mapping[str, Tensor], y: Mapping[str, Tensor]) -> TensorDict:
    """``alpha * x + y`` key by key (the BLAS name)."""
    check_same_structure(x, y, "axpy()")
    return {k: y[k] + alpha * x[k] for k in x}


def dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    """``Σ_k ⟨a_k, b_k⟩`` as a 0-d tensor (differentiable)."""
    check_same_structure(a, b, "dot()")
    if not a:
        return torch.zeros(())
    return torch.stack([(a[k] * b[k]).sum() for k in a]).sum()


def norm(a: Mapping[str, Tensor]) -> Tensor:
    """Euclidean norm of all entries of ``a`` taken together, as a 0-d tensor."""
    _check_mapping(a, "norm()")
    if not a:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v) for v in a.values()]))


def zeros_like(a: Mapping[str, Tensor]) -> TensorDict:
    """A dict of zeros with ``a``'s keys, shapes, dtypes and devices."""
    _check_mapping(a, "zeros_like()")
    return {k: torch.zeros_like(v) for k, v in a.items()}


def clone(a: Mapping[str, Tensor]) -> TensorDict:
    """Deep copy: ``detach().clone()`` of every tensor (no autograd history)."""
    _check_mapping(a, "clone()")
    return {k: v.detach().clone() for k, v in a.items()}


def detach(a: Mapping[str, Tensor]) -> TensorDict:
    """``detach()`` of every tensor (shares storage)."""
    _check_mapping(a, "detach()")
    return {k: v.detach() for k, v in a.items()}


def to(
    a: Mapping[str, Tensor],
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> TensorDict:
    """Move / cast every tensor."""
    _check_mapping(a, "to()")
    return {k: v.to(device=device, dtype=dtype) for k, v in a.items()}


def is_finite(a: Mapping[str, Tensor]) -> bool:
    """True when no tensor holds a NaN or an Inf."""
    _check_mapping(a, "is_finite()")
    return all(bool(torch.isfinite(v).all()) for v in a.values())


@dataclass(frozen=True)
class FlatSpec:
    """How to cut a flat vector back into a tensor dict: key order, shapes, dtypes."""

    keys: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    dtypes: tuple[torch.dtype, ...]

    @property
    def numel(self) -> int:
        """Total number of entries."""
        total = 0
        for s in self.shapes:
            total += int(torch.Size(s).numel())
        return total


def flatten(a: Mapping[str, Tensor]) -> tuple[Tensor, FlatSpec]:
    """Concatenate all tensors (sorted key order) into one 1-d vector; return it and its spec.

    All tensors are promoted to one dtype (``torch.result_type`` over the dict). The operation
    is differentiable.
    """
    _check_mapping(a, "flatten()")
    keys = tuple(sorted(a))
    spec = FlatSpec(
        keys=keys,
        shapes=tuple(a[k].shape for k in keys),
        dtypes=tuple(a[k].dtype for k in keys),
    )
    if not keys:
        return torch.zeros(0), spec
    dtype = a[keys[0]].dtype
    for k in keys[1:]:
        dtype = torch.promote_types(dtype, a[k].dtype)
    return torch.cat([a[k].reshape(-1).to(dtype) for k in keys]), spec


def unflatten(vec: Tensor, spec: FlatSpec) -> TensorDict:
    """Inverse of :func:`flatten`: cut ``vec`` into tensors of ``spec``'s shapes and dtypes."""
    if not isinstance(vec, Tensor) or vec.dim() != 1:
        raise ChronosTypeError("unflatten() needs a 1-d tensor")
    if vec.numel() != spec.numel:
        raise ShapeMismatchError(
            f"unflatten(): vector has {vec.numel()} entries, spec needs {spec.numel}"
        )
    out: TensorDict = {}
    offset = 0
    for k, shape, dtype in zip(spec.keys, spec.shapes, spec.dtypes, strict=True):
        n = int(torch.Size(shape).numel())
        out[k] = vec[offset : offset + n].reshape(shape).to(dtype)
        offset += n
    return out
